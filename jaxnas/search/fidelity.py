"""How far a run's cheap scores can be trusted, and what the search bought: rank correlations, control samples,
baselines.

    rank_correlation(a, b)        Kendall tau-b and Spearman rho of two score vectors (scipy), with n
    top_recall(scores, ref, ...)  the share of the reference's best that a score's best fraction keeps (pre-filters)
    control_sample(scores, k)     k indices spread evenly over the ranks of ``scores`` (best and worst included)
    largest_architecture(...)     the largest network of a space (every size choice at its maximum)
    seed_summary(values)          mean, sample standard deviation, min and max of per-seed results

A one-shot run ranks candidates by their accuracy with inherited supernet weights. Whether that ranking means
anything is measured, not assumed: a control sample spread over the one-shot scores is trained stand-alone with
the final recipe, and the rank correlation between the two is reported (``summary.json["ranking"]``). Tau below
`LOW_TAU` gets a warning: the search then ranks little better than chance.
"""

from __future__ import annotations

import math

import numpy as np

LOW_TAU = 0.5  # below this Kendall tau, the report warns that the cheap ranking is unreliable


def _stats():
    """scipy.stats, imported on first use: most searches never rank, and the import is slow."""
    from scipy import stats

    return stats


def rank_correlation(a, b) -> dict:
    """{"kendall_tau", "spearman", "n"} of the finite pairs of ``a`` and ``b`` (NaN when fewer than 3 or constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"rank_correlation needs two vectors of one length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"kendall_tau": math.nan, "spearman": math.nan, "n": int(len(a))}
    return {
        "kendall_tau": float(_stats().kendalltau(a, b).statistic),
        "spearman": float(_stats().spearmanr(a, b).statistic),
        "n": int(len(a)),
    }


def control_sample(scores, k: int) -> list[int]:
    """Indices of ``k`` entries spread evenly over the ranks of ``scores`` (the best and the worst included).

    Deterministic: the entries at evenly spaced positions of the descending order (ties by index). All of them
    when there are at most ``k``.
    """
    scores = np.asarray(scores, float)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if len(order) <= k:
        return order
    if k == 1:
        return order[:1]
    positions = np.unique(np.round(np.linspace(0, len(order) - 1, k)).astype(int))
    return [order[p] for p in positions]


def largest_architecture(space, largest) -> np.ndarray:
    """int32 [n_choices]: the largest network of a space: ``largest`` (the sandwich rule's ``enc -> enc`` map,
    e.g. `ConvSupernet.largest`) applied to the first option of every choice, with on / off choices (norm, skip)
    on. For the macro space: the first family, every stage at its largest depth, width, kernel and expansion,
    norm and skip on, the first activation and dropout listed."""
    enc = np.zeros(len(space.choices), np.int32)  # the first option everywhere (stage 1 always exists)
    enc = np.array(largest(np.asarray(space.canonicalize(enc))[None])[0], np.int32)
    for i, choice in enumerate(space.choices):
        if True in choice.options and set(choice.options) <= {False, True}:
            enc[i] = choice.options.index(True)
    return np.asarray(space.canonicalize(enc), np.int32)


def seed_summary(values) -> dict:
    """{"mean", "std", "min", "max", "seeds"} of per-seed values (std: sample standard deviation; 0 for one)."""
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("seed_summary needs at least one value")
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "seeds": int(v.size),
    }


def top_recall(scores, reference, keep: float = 0.5, top: float = 0.25) -> float:
    """The fraction of the ``top`` best architectures by ``reference`` (ceil, at least 1) that are among the ``keep``
    best by ``scores`` (ceil): how much a pre-filter keeping that fraction would lose. Higher is better for both;
    non-finite scores rank last."""
    s = np.where(np.isfinite(np.asarray(scores, float)), np.asarray(scores, float), -np.inf)
    r = np.asarray(reference, float)
    if len(s) != len(r) or not len(s):
        raise ValueError(f"top_recall needs two equally long, non-empty score vectors, got {len(s)} and {len(r)}")
    best = set(np.argsort(-r, kind="stable")[: max(1, math.ceil(top * len(r)))].tolist())
    kept = set(np.argsort(-s, kind="stable")[: math.ceil(keep * len(s))].tolist())
    return len(best & kept) / len(best)
