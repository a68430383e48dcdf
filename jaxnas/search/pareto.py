"""Multi-objective bookkeeping of a search run: Pareto fronts, hypervolume, and picking one architecture.

Numpy only: it runs on the host after each generation, over the archive of evaluated candidates (N rows of
M objective values, M <= 4 and N up to a few thousand in NAS), so nothing here needs to be jitted.

An `Objective` is a column name and a direction, ``"max"`` (accuracy) or ``"min"`` (params, MACs,
latency). Every function takes values in the objectives' own units, float ``[N, M]`` with one column per
objective in the order of ``objectives``, and converts them internally with `to_minimisation` (max columns
negated) so that smaller is better everywhere. A row holding NaN or +-inf anywhere is a failed or
infeasible evaluation: it is never on a front, never counts towards a hypervolume and is never chosen.

    objectives = [parse_objective("val_accuracy"), parse_objective("params:min")]
    front = pareto_mask(values, objectives)                        # bool [N]
    reference = default_reference(values, objectives)              # fixed at the first generation
    hv = hypervolume(values, objectives, reference)                # float, accuracy x params
    knee = knee_point(values, objectives)                          # row index
    pick = choose_by_preference(values, objectives, "params", {"val_accuracy": 0.97})  # row index or None
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

DIRECTIONS = ("max", "min")
"""The directions an objective may have."""

_BLOCK_ELEMENTS = 1 << 22
"""Largest [B, N, M] comparison `_non_dominated` builds at once (a few MB), so N in the thousands fits."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """One column of a multi-objective search and whether larger or smaller values are better.

    Attributes:
      name: the metric's name, as in ``history.csv`` (e.g. ``"val_accuracy"``, ``"params"``).
      direction: ``"max"`` if larger is better, ``"min"`` if smaller is better.
    """

    name: str
    direction: Literal["max", "min"] = "max"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"an objective needs a non-empty metric name, got {self.name!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"objective {self.name!r}: direction must be 'max' or 'min', got {self.direction!r} "
                f"(e.g. Objective('val_accuracy', 'max') or Objective('params', 'min'))"
            )

    def __str__(self) -> str:
        """The spec `parse_objective` reads back, e.g. ``"params:min"``."""
        return f"{self.name}:{self.direction}"


def parse_objective(spec: str) -> Objective:
    """Objective from ``"name"`` (maximised) or ``"name:max"`` / ``"name:min"``, e.g. ``"params:min"``."""
    if not isinstance(spec, str):
        raise TypeError(f"an objective spec is a string such as 'params:min', got {type(spec).__name__} {spec!r}")
    name, sep, direction = spec.strip().partition(":")
    name, direction = name.strip(), direction.strip().lower()
    if not name:
        raise ValueError(f"objective spec {spec!r} has no metric name; write e.g. 'val_accuracy' or 'params:min'")
    if not sep:
        return Objective(name, "max")
    if direction not in DIRECTIONS:
        raise ValueError(
            f"objective spec {spec!r}: the direction after ':' must be 'max' or 'min', got {direction!r}; "
            f"write e.g. '{name}:min' to minimise it or '{name}' (or '{name}:max') to maximise it"
        )
    return Objective(name, direction)


def to_minimisation(values: ArrayLike, objectives: Sequence[Objective | str]) -> np.ndarray:
    """float64 ``[N, M]``: ``values`` float ``[N, M]`` with the max objectives' columns negated (smaller is better)."""
    objectives = _objectives(objectives)
    values = _values(values, objectives)
    return np.where(_max_columns(objectives), -values, values)


def pareto_mask(values: ArrayLike, objectives: Sequence[Objective | str]) -> np.ndarray:
    """bool ``[N]``: which rows of ``values`` float ``[N, M]`` no other row dominates.

    Row j dominates row i when it is at least as good in every objective and better in one. Rows holding
    NaN or +-inf are never on the front and dominate nothing. Equal rows do not dominate each other, so
    every copy of a non-dominated row is kept (a cached re-evaluation stays on the front with its first
    evaluation).
    """
    costs = to_minimisation(values, objectives)
    finite = np.all(np.isfinite(costs), axis=1)
    mask = np.zeros(len(costs), dtype=bool)
    mask[finite] = _non_dominated(costs[finite])
    return mask


def hypervolume(values: ArrayLike, objectives: Sequence[Objective | str], reference: ArrayLike) -> float:
    """Exact hypervolume dominated by the rows of ``values`` float ``[N, M]`` and bounded by ``reference`` [M].

    ``reference`` is in the objectives' own units (e.g. ``[0.0, 2e6]`` for val_accuracy:max, params:min); the
    result is in the product of the columns' units (accuracy x params). A row contributes only the part of
    its dominated box that is better than the reference in every objective, so a row worse than the
    reference in any objective contributes nothing, and so do rows holding NaN or +-inf.

    Exact for any M: 1-D is a difference, 2-D a sorted sweep, and M >= 3 slices along the last objective
    into (M-1)-D problems (HSO, While et al. 2006), which is plenty for NAS fronts (M <= 4, N in the
    hundreds).
    """
    objectives = _objectives(objectives)
    costs = to_minimisation(values, objectives)
    reference = np.asarray(reference, dtype=np.float64)
    names = [o.name for o in objectives]
    if reference.shape != (len(objectives),):
        raise ValueError(
            f"reference must have one value per objective {names}, i.e. shape ({len(objectives)},), "
            f"got shape {reference.shape}"
        )
    if not np.all(np.isfinite(reference)):
        raise ValueError(
            f"reference {reference.tolist()} for objectives {names} must be finite; "
            f"use default_reference(values, objectives) for a documented choice"
        )
    ref = np.where(_max_columns(objectives), -reference, reference)
    inside = np.all(np.isfinite(costs), axis=1) & np.all(costs < ref, axis=1)
    points = costs[inside]
    if len(points) == 0:
        return 0.0
    points = np.unique(points[_non_dominated(points)], axis=0)
    return float(_hypervolume_min(points, ref))


def default_reference(values: ArrayLike, objectives: Sequence[Objective | str]) -> np.ndarray:
    """float64 ``[M]``: a hypervolume reference point for ``values`` float ``[N, M]``, in the objectives' units.

    Rule, per objective, over its finite values: take the worst one (the smallest of a max objective, the
    largest of a min objective); the reference is 1.1 x that worst value, or 0 if 0 is worse. So an
    accuracy-like max objective (never negative) gets 0, a cost such as params or MACs gets 1.1 x the
    largest seen, and every candidate seen with a non-zero worst value lies strictly inside the
    reference. The rule is a pure function of the values given: a search computes it once from its first
    generation and keeps it, so that hypervolumes of later generations are comparable (later candidates
    worse than it then contribute nothing).
    """
    objectives = _objectives(objectives)
    costs = to_minimisation(values, objectives)
    reference = np.empty(len(objectives))
    for k, objective in enumerate(objectives):
        column = costs[:, k][np.isfinite(costs[:, k])]
        if len(column) == 0:
            raise ValueError(
                f"cannot choose a hypervolume reference for objective {objective.name!r}: none of the "
                f"{len(costs)} rows has a finite value for it (all evaluations failed?); pass a reference "
                f"explicitly to hypervolume()"
            )
        # In minimisation form "worse" is "larger" for every column; 1.1 x moves away from the front.
        reference[k] = max(0.0, 1.1 * float(column.max()))
    return np.where(_max_columns(objectives), -reference, reference) + 0.0  # + 0.0 turns -0.0 into 0.0


def knee_point(values: ArrayLike, objectives: Sequence[Objective | str]) -> int:
    """Row index into ``values`` float ``[N, M]`` of the knee of its Pareto front: the best trade-off.

    The front is normalised to [0, 1] per objective (0: the front's best value, an objective that is equal
    along the front is ignored). With 2 objectives the knee is the front point farthest from the line
    joining the two extremes on the side of the ideal point (0, 0) -- where giving up a little of one
    objective buys the most of the other; with M > 2 objectives, or if no point lies on that side of the
    line (a straight or concave front), it is the point closest (Euclidean) to the ideal point. Ties go
    to the lowest row index.
    """
    objectives = _objectives(objectives)
    front = np.flatnonzero(pareto_mask(values, objectives))
    if len(front) == 0:
        raise ValueError(
            "knee_point: no row has finite values for every objective "
            f"{[o.name for o in objectives]}, so there is no Pareto front to choose from"
        )
    costs = to_minimisation(values, objectives)[front]
    low, span = costs.min(axis=0), np.ptp(costs, axis=0)
    normalised = np.divide(costs - low, span, out=np.zeros_like(costs), where=span > 0)
    if costs.shape[1] == 2 and np.all(span > 0):
        # The extremes are (0, 1) and (1, 0) after normalisation, so the signed distance to the line
        # joining them, towards the ideal, is (1 - x - y) / sqrt(2).
        bulge = 1.0 - normalised.sum(axis=1)
        if bulge.max() > 0:
            return int(front[np.argmax(bulge)])
    return int(front[np.argmin(np.linalg.norm(normalised, axis=1))])


def choose_by_preference(
    values: ArrayLike,
    objectives: Sequence[Objective | str],
    minimise: str,
    floor: Mapping[str, float],
) -> int | None:
    """Row index into ``values`` float ``[N, M]`` of the best row on ``minimise`` among rows meeting ``floor``.

    ``floor`` maps objective names to bounds in their units that a row must reach: at least the bound
    for a max objective (``{"val_accuracy": 0.97}``), at most it for a min objective
    (``{"params": 1e6}``). ``minimise`` names the objective to optimise, minimised in minimisation
    form: the smallest value of a min objective such as ``"params"`` (the usual use), the largest of a max
    one. Ties on it go to the row better on the other objectives in order (so the row chosen is on the
    Pareto front), then to the lowest index. Rows holding NaN or +-inf are never chosen. Returns None if
    no row meets every bound.
    """
    objectives = _objectives(objectives)
    costs = to_minimisation(values, objectives)
    names = [o.name for o in objectives]
    unknown = sorted({minimise, *floor} - set(names))
    if unknown:
        raise ValueError(
            f"choose_by_preference: {unknown} not among the objectives {names}; minimise and the floor's "
            f"keys must name objectives (the columns of values)"
        )
    ok = np.all(np.isfinite(costs), axis=1)
    for name, bound in floor.items():
        k = names.index(name)
        bound_cost = -float(bound) if objectives[k].direction == "max" else float(bound)
        ok &= costs[:, k] <= bound_cost
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        return None
    first = names.index(minimise)
    keys = [costs[rows, first]] + [costs[rows, k] for k in range(len(names)) if k != first]
    # np.lexsort sorts by its last key first and is stable, so equal rows keep index order.
    return int(rows[np.lexsort(keys[::-1])[0]])


def _objectives(objectives: Sequence[Objective | str]) -> tuple[Objective, ...]:
    if isinstance(objectives, (str, Objective)):
        raise TypeError(
            f"objectives must be a sequence of Objective or spec strings, got a single {objectives!r}; "
            f"wrap it in a list"
        )
    parsed = tuple(o if isinstance(o, Objective) else parse_objective(o) for o in objectives)
    if not parsed:
        raise ValueError("at least one objective is needed, e.g. [parse_objective('val_accuracy')]")
    names = [o.name for o in parsed]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"objectives {names} name {duplicated} more than once; each column must be one objective")
    return parsed


def _values(values: ArrayLike, objectives: tuple[Objective, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != len(objectives):
        raise ValueError(
            f"values must be float [N, {len(objectives)}], one column per objective "
            f"{[o.name for o in objectives]} in that order, got shape {array.shape}"
        )
    return array


def _max_columns(objectives: tuple[Objective, ...]) -> np.ndarray:
    return np.array([o.direction == "max" for o in objectives])


def _non_dominated(costs: np.ndarray) -> np.ndarray:
    """bool [N]: rows of finite ``costs`` float [N, M] (minimised) that no other row dominates."""
    n, m = costs.shape
    mask = np.empty(n, dtype=bool)
    block = max(1, _BLOCK_ELEMENTS // max(n * m, 1))
    for start in range(0, n, block):
        rows = costs[start : start + block, None, :]  # [B, 1, M]
        weakly_better = np.all(costs[None] <= rows, axis=-1)  # [B, N]: row j at least as good as row i
        better = np.any(costs[None] < rows, axis=-1)
        mask[start : start + block] = ~np.any(weakly_better & better, axis=1)
    return mask


def _hypervolume_min(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume of the union of boxes [p, ref] over rows p of ``points`` [N, M], every p < ref."""
    n, m = points.shape
    if m == 1:
        return float(ref[0] - points[:, 0].min())
    if m == 2:
        order = np.lexsort((points[:, 1], points[:, 0]))
        x = points[order, 0]
        # Between x_i and x_{i+1} the covered height reaches down to the lowest y among the first i+1 points.
        lowest_y = np.minimum.accumulate(points[order, 1])
        widths = np.diff(np.append(x, ref[0]))
        return float(np.sum(widths * (ref[1] - lowest_y)))
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    depths = np.diff(np.append(points[:, -1], ref[-1]))
    volume = 0.0
    for i in np.flatnonzero(depths > 0):
        # The slab between the i-th and next last-objective value is covered by the first i+1 points,
        # projected; only their non-dominated ones matter, and dropping the rest keeps deep recursions small.
        slab = points[: i + 1, :-1]
        if m > 3:
            slab = slab[_non_dominated(slab)]
        volume += depths[i] * _hypervolume_min(slab, ref[:-1])
    return volume
