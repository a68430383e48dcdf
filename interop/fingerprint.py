"""Layer-wise activation fingerprints: pooled activations under a fixed random projection.

A fingerprint summarises the context a network is running in (one sequence, one image batch) as a
``[dim]`` unit vector, so that similar contexts can be retrieved from an
:class:`~interop.memory.ExperienceMemory` by cosine similarity. With a Gaussian random projection,
inner products of pooled activations are approximately preserved (Johnson–Lindenstrauss), and the
same seed gives the same projection — hence comparable fingerprints — in numpy, jax and torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from interop import _xp
from interop._xp import Array


class Fingerprinter:
    """Mean-pool activations, project them with a seeded Gaussian matrix, L2-normalise.

    ``fp(x) = normalize(mean_pool(x) @ P)`` with ``P ~ N(0, 1)^[in_features, dim] / sqrt(dim)``.

    ``P`` is drawn once with ``numpy.random.default_rng(seed)`` in float64, so every framework
    projects with the same matrix; it is converted to each (namespace, device, dtype) it meets once
    and cached. The activations themselves never leave their framework or device.

    Args:
      in_features: ``C``, the channel / hidden size of the activations.
      dim: fingerprint size ``d`` (64 in ExNAS).
      seed: seed of the projection; fingerprints are comparable only under the same seed.
    """

    def __init__(self, in_features: int, dim: int = 64, seed: int = 0):
        for name, value in (("in_features", in_features), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Fingerprinter: {name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.dim = dim
        self.seed = seed
        projection = np.random.default_rng(seed).standard_normal((in_features, dim)) / math.sqrt(dim)
        projection.setflags(write=False)
        self._projection = projection
        self._converted: dict[tuple[str, str, str], Array] = {}

    @property
    def projection(self) -> np.ndarray:
        """``P``: ``[in_features, dim]`` float64, read-only."""
        return self._projection

    def _projection_like(self, x: Array) -> Array:
        """``P`` in ``x``'s namespace, device and dtype (converted once, then cached)."""
        xp = _xp.namespace(x)
        device = _xp.device_of(x)
        key = (xp.__name__, str(device), str(x.dtype))
        if key not in self._converted:
            converted = _xp.constant(self._projection, x)
            if device is None:
                # A traced jax value has no device: converting here is fine, caching a value
                # created under a trace is not.
                return converted
            self._converted[key] = converted
        return self._converted[key]

    def __call__(self, x: Array, *, pool_axes: Sequence[int] = (-2,), mask: Array | None = None) -> Array:
        """Fingerprints of activations ``x``.

        Args:
          x: ``[..., N, C]`` activations (tokens × hidden), or e.g. NHWC ``[B, H, W, C]`` with
            ``pool_axes=(1, 2)``. The last axis must be ``C = in_features``.
          pool_axes: axes averaged over; they must not include the last (channel) axis.
          mask: optional weights (0/1) over positions, broadcastable to ``x.shape[:-1]`` (the channel
            axis is left out), e.g. an attention mask ``[B, N]``. Masked-out positions (padding) do
            not count: the pool is ``sum(m·x) / sum(m)``; a fully masked row pools to zeros.

        Returns:
          ``[*kept_axes, dim]`` unit vectors, where ``kept_axes`` are the axes of ``x`` other than
          ``pool_axes`` and the channel axis; the dtype of ``x`` if it is floating (else the
          namespace's default float); zero activations give a zero fingerprint, never NaN.
        """
        xp = _xp.namespace(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Fingerprinter: expected activations [..., {self.in_features}] (last axis = in_features), "
                f"got shape {tuple(x.shape)}"
            )
        axes = self._normalized_pool_axes(pool_axes, x.ndim)
        x = xp.astype(x, _xp.float_dtype(xp, x), copy=False)
        if mask is None:
            pooled = xp.mean(x, axis=axes)
        else:
            m = xp.asarray(mask, dtype=x.dtype, device=_xp.device_of(x))
            try:
                m = xp.broadcast_to(m, tuple(x.shape[:-1]))
            except (ValueError, RuntimeError) as err:
                raise ValueError(
                    f"Fingerprinter: mask of shape {tuple(m.shape)} does not broadcast to the positions "
                    f"{tuple(x.shape[:-1])} of x (x.shape without its channel axis)"
                ) from err
            m = m[..., None]
            total = xp.sum(m, axis=axes)
            pooled = xp.sum(x * m, axis=axes) / xp.where(total > 0, total, xp.ones_like(total))
        return _xp.l2_normalize(xp, xp.matmul(pooled, self._projection_like(pooled)))

    @staticmethod
    def _normalized_pool_axes(pool_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
        axes = tuple(sorted({a % ndim if -ndim <= a < ndim else ndim for a in pool_axes}))
        if not axes or axes[-1] >= ndim - 1:
            raise ValueError(
                f"Fingerprinter: pool_axes must be non-empty axes of x other than the last (channel) axis; "
                f"got {tuple(pool_axes)} for an array with {ndim} axes"
            )
        return axes

    @staticmethod
    def combine(fingerprints: Sequence[Array]) -> Array:
        """One context fingerprint from several layers' fingerprints.

        ``normalize(mean_l fp_l)``. The per-layer fingerprints are unit vectors, so every layer
        counts equally whatever its width or activation scale.

        Args:
          fingerprints: ``L`` arrays of one shape ``[..., dim]`` (e.g. from one ``Fingerprinter``
            per layer, each with its own ``in_features``) and one framework.

        Returns:
          ``[..., dim]`` unit vector (zeros if the mean is zero).
        """
        if len(fingerprints) == 0:
            raise ValueError("Fingerprinter.combine: expected at least one fingerprint, got none")
        xp = _xp.namespace(*fingerprints)
        shapes = {tuple(f.shape) for f in fingerprints}
        if len(shapes) != 1:
            raise ValueError(f"Fingerprinter.combine: fingerprints must share one shape, got {sorted(shapes)}")
        return _xp.l2_normalize(xp, xp.mean(xp.stack(list(fingerprints), axis=0), axis=0))

    def __repr__(self) -> str:
        return f"Fingerprinter(in_features={self.in_features}, dim={self.dim}, seed={self.seed})"


__all__ = ["Fingerprinter"]
