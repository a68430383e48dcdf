"""Budget controller: from per-unit scores to the units each layer keeps, under per-layer and global budgets.

Removing units (MLP neurons, channels) only speeds a layer up if the kept width suits the hardware's
tiles, so kept counts are aligned to multiples of ``align`` (64/128). Within that grid the controller
removes as many units as the budgets allow, and among those choices the least important units.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from fractions import Fraction
from typing import Mapping

from interop import _xp
from interop._xp import Array


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """How many units each layer keeps.

    Attributes:
      sizes: layer → ``U_l``, the layer's unit count.
      kept: layer → ``k_l``, the number of units it keeps.
    """

    sizes: dict[str, int]
    kept: dict[str, int]

    @property
    def removed(self) -> dict[str, int]:
        """layer → ``U_l − k_l``."""
        return {name: self.sizes[name] - self.kept[name] for name in self.sizes}

    @property
    def removed_fraction(self) -> float:
        """``Σ (U_l − k_l) / Σ U_l`` over all layers (0 for no units)."""
        total = sum(self.sizes.values())
        return sum(self.removed.values()) / total if total else 0.0

    @property
    def layer_removed_fraction(self) -> dict[str, float]:
        """layer → ``(U_l − k_l) / U_l`` (0 for an empty layer)."""
        return {name: (r / self.sizes[name] if self.sizes[name] else 0.0) for name, r in self.removed.items()}


class BudgetController:
    """Choose the units to keep in each layer from per-unit scores (higher = more important).

    Constraints, for layers ``l`` with ``U_l`` units of which ``r_l`` are removed:

    - per-layer budget: ``r_l ≤ floor(bl · U_l)``;
    - global budget: ``Σ r_l ≤ floor(Bg · Σ U_l)``;
    - alignment: the kept count ``U_l − r_l`` is a multiple of ``align``, or the whole layer
      (``r_l = 0``); ``align=1`` disables alignment;
    - floor: ``U_l − r_l ≥ min_keep`` (an int: a unit count; a float: a fraction of ``U_l``, rounded up).

    Budgets are read as the decimals written: ``floor(0.29 · 100) = 29``, not 28 as binary floating
    point would give.

    Algorithm. A layer's removal grows in *chunks*: first ``U_l mod align`` units (``align`` if that
    is 0), then ``align`` at a time, always its lowest-scoring units (ties: lower unit index first).
    Each chunk's *key* is the highest score it would remove — the most important unit lost. The
    controller decides, in this order of priority:

    1. the total removal: ``R*``, the largest total any combination of allowed layer removals
       reaches within the global budget (an exact subset-sum over the layers' options) — the
       budget is used as fully as the alignment grid allows;
    2. the bottleneck: the smallest key ``κ*`` such that chunks with keys ``≤ κ*`` alone still
       reach ``R*`` — the most important unit removed is as unimportant as possible;
    3. the chunks: among chunks with keys ``≤ κ*``, in ascending key order (ties: earlier layer in
       ``scores``), each chunk is taken unless it would make ``R*`` unreachable, until ``R*`` units
       are removed.

    When all chunks have one size (every ``U_l`` a multiple of ``align``, or ``align=1``) step 3 is
    plain greedy and removes the ``R*/size`` chunks with the lowest keys. The key is a single score,
    not a sum, so decisions compare exact input values and are identical in numpy, jax and torch.

    Worked example: two layers of 256 units, ``bl=0.25, Bg=0.125, align=64``. Each layer may lose
    ``floor(0.25·256) = 64`` units — exactly one chunk of 64 — and both together
    ``floor(0.125·512) = 64``, so one layer loses one chunk. Say layer ``"mlp.2"``'s 64 lowest
    scores are ``0.00 … 0.30`` and layer ``"mlp.9"``'s are ``0.00 … 0.10``: the keys are 0.30 and
    0.10, so ``"mlp.9"`` keeps 192 units (its 64 lowest-scoring removed), ``"mlp.2"`` keeps all 256,
    and ``removed_fraction`` is 0.125. With ``bl=0.2`` instead, a layer may lose only 51 units, less
    than one chunk, so nothing is removed.

    Args:
      bl: per-layer budget, the largest fraction of a layer's units that may be removed (0.12 in ExNAS).
      Bg: global budget, the largest fraction of all units that may be removed (0.06 in ExNAS).
      align: kept counts are multiples of this (64 or 128 for GPU/TPU tiles; 1 disables).
      min_keep: fewest units a layer keeps — an int count, or a float fraction of the layer.
    """

    def __init__(self, bl: float = 0.12, Bg: float = 0.06, align: int = 64, min_keep: int | float = 0):
        for name, value in (("bl", bl), ("Bg", Bg)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(
                    f"BudgetController: {name} is the largest fraction of units that may be removed and must "
                    f"be a number in [0, 1], got {value!r}"
                )
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ValueError(
                f"BudgetController: align must be an int ≥ 1 (kept counts are multiples of it; 1 disables "
                f"alignment), got {align!r}"
            )
        if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)):
            raise ValueError(f"BudgetController: min_keep must be an int count or a float fraction, got {min_keep!r}")
        if isinstance(min_keep, int) and min_keep < 0:
            raise ValueError(f"BudgetController: min_keep as a unit count must be ≥ 0, got {min_keep}")
        if isinstance(min_keep, float) and not 0 <= min_keep <= 1:
            raise ValueError(
                f"BudgetController: min_keep as a float is a fraction of each layer and must be in [0, 1], "
                f"got {min_keep}; pass an int for a unit count"
            )
        self.bl = float(bl)
        self.Bg = float(Bg)
        self.align = align
        self.min_keep = min_keep

    def layer_cap(self, units: int) -> int:
        """Most units removable from a layer of ``units`` by ``bl`` and ``min_keep`` (before alignment)."""
        if isinstance(self.min_keep, int):
            floor_keep = min(units, self.min_keep)
        else:
            floor_keep = min(units, math.ceil(_decimal(self.min_keep) * units))
        return min(math.floor(_decimal(self.bl) * units), units - floor_keep)

    def global_cap(self, total_units: int) -> int:
        """Most units removable over all layers together: ``floor(Bg · Σ U_l)``."""
        return math.floor(_decimal(self.Bg) * total_units)

    def removal_options(self, units: int) -> list[int]:
        """Ascending removal counts allowed in a layer of ``units`` by ``bl``, ``min_keep`` and ``align``."""
        first = units % self.align or self.align
        return [0, *range(first, self.layer_cap(units) + 1, self.align)]

    def plan(self, scores: Mapping[str, Array]) -> BudgetPlan:
        """The kept count of each layer for ``scores`` (layer → ``[U_l]``); see the class docstring."""
        return self._plan(scores)[0]

    def select(self, scores: Mapping[str, Array]) -> dict[str, Array]:
        """Indices of the units each layer keeps.

        Args:
          scores: layer → ``[U_l]`` unit scores (higher = more important), arrays of one framework.
            Scores are compared across layers, so put them on one scale (the
            :class:`~interop.selector.TransversalSelector` does).

        Returns:
          layer → ``[k_l]`` ascending, unique unit indices, in the input's namespace and device.

        The kept counts are decided on the host from a few chunk-boundary scores, so ``select`` runs
        eagerly (not inside ``jax.jit``); the indices themselves are computed in the input's namespace.
        """
        plan, orders = self._plan(scores)
        out = {}
        for name, order in orders.items():
            xp = _xp.namespace(order)
            out[name] = xp.sort(order[plan.removed[name] :])
        return out

    def _plan(self, scores: Mapping[str, Array]) -> tuple[BudgetPlan, dict[str, Array]]:
        """The plan, and each layer's units in removal order (ascending score, then index)."""
        names = list(scores)
        if names:
            _xp.namespace(*scores.values())
        sizes, orders, options, keys = {}, {}, {}, {}
        for name in names:
            x = scores[name]
            xp = _xp.namespace(x)
            if x.ndim != 1:
                raise ValueError(
                    f"BudgetController: scores of layer {name!r} must be [U] (one score per unit), got shape "
                    f"{tuple(x.shape)}"
                )
            if xp.isdtype(x.dtype, "real floating") and bool(xp.any(xp.isnan(x))):
                raise ValueError(f"BudgetController: scores of layer {name!r} contain NaN; every unit needs a score")
            order = xp.argsort(x, stable=True)
            sizes[name] = x.shape[0]
            orders[name] = order
            options[name] = self.removal_options(sizes[name])
            if len(options[name]) > 1:
                ends = xp.asarray([r - 1 for r in options[name][1:]], device=_xp.device_of(x))
                # A chunk's key is the score of its last (highest-scoring) unit.
                keys[name] = _xp.to_numpy(xp.take(x, xp.take(order, ends, axis=0), axis=0)).tolist()
            else:
                keys[name] = []
        removal = _choose_removals(names, options, keys, self.global_cap(sum(sizes.values())))
        return BudgetPlan(sizes, {name: sizes[name] - removal[name] for name in names}), orders

    def __repr__(self) -> str:
        return f"BudgetController(bl={self.bl}, Bg={self.Bg}, align={self.align}, min_keep={self.min_keep})"


def _choose_removals(
    names: list[str], options: dict[str, list[int]], keys: dict[str, list[float]], global_cap: int
) -> dict[str, int]:
    """Removal count per layer: the largest feasible total, the smallest bottleneck, then ascending keys."""
    target = _reachable_totals([options[n] for n in names], global_cap).bit_length() - 1

    def options_up_to(kappa: float) -> dict[str, list[int]]:
        # Keys grow along a layer's chunks, so the chunks with key ≤ kappa are a prefix.
        return {n: options[n][: 1 + bisect.bisect_right(keys[n], kappa)] for n in names}

    def reaches_target(opts: dict[str, list[int]]) -> bool:
        return bool(_reachable_totals([opts[n] for n in names], target) >> target & 1)

    # With one chunk size, greedy by key alone removes the target's worth of lowest-key chunks, which
    # already has the smallest bottleneck; with several, some combinations overshoot or strand the
    # remainder, so the bottleneck is searched for and each step must keep the target reachable.
    uniform = len({b - a for n in names for a, b in zip(options[n], options[n][1:])}) <= 1
    if target > 0 and not uniform:
        # The bottleneck: binary search over the keys, as reachability only grows with kappa.
        candidates = sorted({k for n in names for k in keys[n]})
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if reaches_target(options_up_to(candidates[mid])):
                hi = mid
            else:
                lo = mid + 1
        options = options_up_to(candidates[lo])
    taken = {n: 0 for n in names}
    total = 0
    heap = [(keys[n][0], pos, n) for pos, n in enumerate(names) if len(options[n]) > 1]
    heapq.heapify(heap)
    while heap and total < target:
        _, pos, name = heapq.heappop(heap)
        j = taken[name] + 1
        grown = total + options[name][j] - options[name][j - 1]
        # A rejected chunk closes its layer: later chunks of that layer would include it.
        if grown > target:
            continue
        if not uniform:
            floors = [options[n][taken[n] + (n == name)] for n in names]
            if not reaches_target({n: [r for r in options[n] if r >= f] for n, f in zip(names, floors)}):
                continue
        taken[name] = j
        total = grown
        if j + 1 < len(options[name]):
            heapq.heappush(heap, (keys[name][j], pos, name))
    return {n: options[n][taken[n]] for n in names}


def _reachable_totals(options: list[list[int]], cap: int) -> int:
    """Totals ``Σ r_l ≤ cap`` reachable with each ``r_l`` from its layer's options, as a bitset.

    Subset-sum over a Python int: bit ``t`` is set ⇔ total ``t`` is reachable.
    """
    mask = (1 << (cap + 1)) - 1
    reachable = 1
    for layer_options in options:
        grown = 0
        for r in layer_options:
            if r <= cap:
                grown |= reachable << r
        reachable = grown & mask
    return reachable


def _decimal(fraction: float) -> Fraction:
    """The decimal the user wrote (``0.29``), not its binary approximation (``0.28999…``)."""
    return Fraction(repr(float(fraction)))


__all__ = ["BudgetController", "BudgetPlan"]
