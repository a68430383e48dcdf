"""Transversal selection: one importance score per unit, across a chosen set of layers.

"Transversal" because the selected layers need not be consecutive (e.g. the MLPs of blocks 3, 7 and
15): the selector scores each of them from the current run's evidence and the experiential memory's
evidence, on a common scale, so that a :class:`~interop.budget.BudgetController` can compare units
across layers.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from interop import _xp
from interop._xp import Array, Namespace

NORMALIZATIONS = ("rank", "mean", "none")


class TransversalSelector:
    """``score_l = wcur · norm(current_l) + wmem · norm(memory_l)`` for each selected layer ``l``.

    Higher scores mean more important units. A layer without memory evidence (``memory`` is None or
    lacks the layer) is scored from current evidence alone, with the full weight:
    ``score_l = (wcur + wmem) · norm(current_l)``, so layers with and without memory stay on the
    same scale.

    Normalisation (per layer, per source) makes evidence from different layers and sources comparable:

    - ``"rank"``: ``rank / (U − 1)`` in ``[0, 1]``, where ``rank`` is the ascending rank of the unit's
      value (0 for the smallest); tied values share the average of their ranks, so the result does
      not depend on unit order. A layer of one unit gets 0.5 (the value of an all-tied layer).
    - ``"mean"``: ``x / mean(|x|)`` (zeros stay zeros if the layer is all zero).
    - ``"none"``: the values as given.

    Args:
      layers: names of the layers to score, in the order the results are returned.
      wcur: weight of the current run's evidence (0.8 in ExNAS).
      wmem: weight of the memory's evidence (0.2 in ExNAS).
      normalize: ``"rank"``, ``"mean"`` or ``"none"``.
    """

    def __init__(self, layers: Sequence[str], wcur: float = 0.8, wmem: float = 0.2, normalize: str = "rank"):
        if isinstance(layers, str):
            raise TypeError(f"TransversalSelector: layers must be a sequence of layer names, got the string {layers!r}")
        layers = tuple(layers)
        if not layers:
            raise ValueError("TransversalSelector: layers is empty; name at least one layer to score")
        if len(set(layers)) != len(layers):
            raise ValueError(f"TransversalSelector: layers must be unique, got {list(layers)}")
        for name, w in (("wcur", wcur), ("wmem", wmem)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"TransversalSelector: {name} must be a finite number ≥ 0, got {w!r}")
        if wcur == 0 and wmem == 0:
            raise ValueError("TransversalSelector: wcur and wmem are both 0; at least one evidence weight must be > 0")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"TransversalSelector: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.layers = layers
        self.wcur = float(wcur)
        self.wmem = float(wmem)
        self.normalize = normalize

    def scores(
        self, current: Mapping[str, Array], memory: Mapping[str, Array] | None = None
    ) -> dict[str, Array]:
        """Per-unit scores of the selected layers.

        Args:
          current: layer name → ``[U_l]`` current evidence (e.g. mean |activation| of each unit on
            this sequence). Layers not in ``self.layers`` are ignored; every selected layer is required.
          memory: layer name → ``[U_l]`` memory evidence (e.g. from
            :meth:`~interop.memory.ExperienceMemory.payload_evidence`), or None.

        Returns:
          ``{layer: [U_l] scores}`` in ``self.layers`` order, arrays of the input's kind and device, in
          the inputs' (promoted) floating dtype.
        """
        missing = [name for name in self.layers if name not in current]
        if missing:
            raise KeyError(
                f"TransversalSelector.scores: no current evidence for selected layer(s) {missing}; "
                f"got layers {list(current)}. Pass a [U] array for every layer in {list(self.layers)}"
            )
        out = {}
        for name in self.layers:
            cur = current[name]
            mem = None if memory is None else memory.get(name)
            self._check_evidence(name, cur, mem)
            if mem is None:
                out[name] = (self.wcur + self.wmem) * self._normalized(cur)
            else:
                out[name] = self.wcur * self._normalized(cur) + self.wmem * self._normalized(mem)
        return out

    @staticmethod
    def _check_evidence(name: str, cur: Array, mem: Array | None) -> None:
        if cur.ndim != 1:
            raise ValueError(
                f"TransversalSelector.scores: current evidence of layer {name!r} must be [U] (one value per "
                f"unit), got shape {tuple(cur.shape)}"
            )
        if mem is not None:
            _xp.namespace(cur, mem)
            if tuple(mem.shape) != tuple(cur.shape):
                raise ValueError(
                    f"TransversalSelector.scores: memory evidence of layer {name!r} has shape "
                    f"{tuple(mem.shape)}, current evidence {tuple(cur.shape)}; both must be [U] for the same U"
                )

    def _normalized(self, x: Array) -> Array:
        xp = _xp.namespace(x)
        x = xp.astype(x, _xp.float_dtype(xp, x), copy=False)
        if self.normalize == "rank":
            return average_rank(xp, x)
        if self.normalize == "mean":
            scale = xp.mean(xp.abs(x)) if x.shape[0] else xp.zeros((), dtype=x.dtype)
            return x / xp.where(scale > 0, scale, xp.ones_like(scale))
        return x

    def __repr__(self) -> str:
        return (
            f"TransversalSelector(layers={list(self.layers)}, wcur={self.wcur}, wmem={self.wmem}, "
            f"normalize={self.normalize!r})"
        )


def average_rank(xp: Namespace, x: Array) -> Array:
    """``[U]`` ascending ranks of ``x`` scaled to ``[0, 1]`` (``rank / (U − 1)``), ties averaged.

    For each value, ``#(x < v)`` and ``#(x ≤ v)`` come from a binary search in the sorted values;
    the average rank of a tie group is ``(#less + #less_or_equal − 1) / 2``. A one-unit layer gets 0.5.
    """
    u = x.shape[0]
    if u <= 1:
        return xp.full_like(x, 0.5)
    ordered = xp.sort(x)
    less = xp.searchsorted(ordered, x, side="left")
    less_or_equal = xp.searchsorted(ordered, x, side="right")
    return xp.astype(less + less_or_equal - 1, x.dtype) / (2 * (u - 1))


__all__ = ["TransversalSelector", "average_rank", "NORMALIZATIONS"]
