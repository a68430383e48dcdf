"""Convolutions for supernets, in two formulations that compute the same function.

Both take NHWC inputs and HWIO kernels with an odd size K, pad (K - 1) // 2 on every side and give an output of
``ceil(H / stride) x ceil(W / stride)``. Symmetric padding (not lax's "SAME", which pads stride-2 convolutions
asymmetrically) makes a K x K kernel whose outer ring is zero compute exactly the centred k x k convolution, so a
masked elastic kernel and the twin's cropped kernel agree at every output position.

- ``"slices"``: K * K shifted (strided) slices of the padded input concatenated on the channel axis, then one
  matmul. Under `jax.vmap` over per-candidate kernels this becomes a batched matmul; XLA:CPU runs a vmapped
  `lax.conv_general_dilated` as a dense grouped convolution instead (about P times the work, see SPEC.md).
- ``"lax"``: `lax.conv_general_dilated`, the fastest form on GPU / TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORMULATIONS = ("slices", "lax")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _check(kernel: jax.Array, formulation: str) -> int:
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2 == 0:
        raise ValueError(f"kernels must be square with an odd size (centred padding), got shape {kernel.shape}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    return k


def _taps(x: jax.Array, k: int, stride: int) -> list[jax.Array]:
    """The k * k shifted views [B, ceil(H / stride), ceil(W / stride), C] of x [B, H, W, C], row-major in (i, j)."""
    p = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    ho, wo = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    return [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, formulation: str = "slices") -> jax.Array:
    """[B, ceil(H / stride), ceil(W / stride), Co]: x [B, H, W, Ci] convolved with kernel [K, K, Ci, Co] (no bias)."""
    k = _check(kernel, formulation)
    if formulation == "lax":
        p = (k - 1) // 2
        padding = [(p, p), (p, p)]
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS)
    patches = jnp.concatenate(_taps(x, k, stride), axis=-1) if k > 1 else _taps(x, 1, stride)[0]
    # Tap (i, j), channel c sits at column (i * K + j) * Ci + c: the row-major flattening of the HWIO kernel.
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, formulation: str = "slices") -> jax.Array:
    """[B, ceil(H / stride), ceil(W / stride), C]: each channel of x [B, H, W, C] with its own kernel [K, K, 1, C]."""
    k = _check(kernel, formulation)
    if formulation == "lax":
        p = (k - 1) // 2
        padding, groups = [(p, p), (p, p)], x.shape[-1]
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS, feature_group_count=groups
        )
    weights = kernel.reshape(k * k, -1)
    return sum(tap * weights[t] for t, tap in enumerate(_taps(x, k, stride)))
