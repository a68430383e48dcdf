"""Calibration of a SeqGate policy, on validation text only.

1. **Static importance** per layer and block (:func:`static_importance`): over the calibration windows,
   mean |intermediate activation| of each neuron times the L2 norm of its down-projection column,
   summed over the block's neurons.
2. **Layer tolerance** (:func:`layer_tolerance`): ΔPPL on the calibration windows when only that layer
   loses its ``drop_fraction`` lowest-importance blocks. The ``n_gated`` most tolerant layers are gated
   (any layers, not necessarily consecutive).
3. **Experiences** (:func:`collect_experiences`): for each calibration window, the probe (first
   ``probe_tokens`` tokens, every layer recorded: sentinel ratios), the fingerprint, the whole-window
   block scores of the gated layers (the memory payload), and the *outcome*: the largest fraction of
   ``Bg`` (of :data:`LEVELS`) at which gating that window from its own probe kept its perplexity on the
   tokens after the probe within ``1 + guardrail`` of the full model's.
4. **Sentinel and threshold** (:func:`choose_sentinel`, :func:`choose_tau`): the sentinel is the layer
   whose probe ratio is most negatively rank-correlated with the outcome (a large MLP contribution
   means a sequence that needs its MLPs); ``tau`` gates the windows with ratio ≤ tau, chosen to maximise
   (#tolerant − #intolerant) among the gated calibration windows. :func:`choose_level` also picks the
   budget level (of :data:`LEVELS`, a window is tolerant at a level if its outcome reached it) whose
   threshold maximises level × balance, so a starting ``Bg`` that no window tolerates in full still
   gates at the fraction of it that windows do tolerate.
5. **Memory** (:func:`build_memory`): one entry per calibration window: fingerprint, outcome record,
   block-score payload per gated layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm.auto import tqdm

from interop import ExperienceMemory
from torch_gating.adapters import ModelAdapter
from torch_gating.kv_cache import forward_cached, rewind
from torch_gating.seqgate.policy import FINGERPRINT_DIM, SeqGatePolicy, block_sums, down_column_norms, layer_key

# Fractions of the global budget Bg tried per calibration window (the outcome is the largest that held).
LEVELS = (0.25, 0.5, 1.0)


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL (nats per token) of ``model`` over the windows ``[n, L]``, one window at a time."""
    total, count = 0.0, 0
    for row in range(windows.shape[0]):
        ids = windows[row : row + 1]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def static_importance(adapter: ModelAdapter, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer ``[n_blocks]`` static block importance over the calibration windows ``[n, L]``.

    Per neuron: mean over windows and tokens of |activation| times its down-column L2 norm; per block: sum.
    """
    layers = list(range(adapter.n_layers))
    sums = {l: torch.zeros(adapter.mlp_width) for l in layers}
    adapter.reset()
    for row in range(windows.shape[0]):
        with adapter.record(layers, what=("unit_abs_mean",)) as rec:
            adapter.model(input_ids=windows[row : row + 1], use_cache=False)
        for l in layers:
            sums[l] += rec[l]["unit_abs_mean"][0]
    return {
        l: block_sums(sums[l] / windows.shape[0] * down_column_norms(adapter, l), adapter.block) for l in layers
    }


def lowest_blocks_dropped(importance: torch.Tensor, n_drop: int) -> list[int]:
    """Kept block indices (ascending) after dropping the ``n_drop`` lowest-importance blocks."""
    dropped = set(torch.argsort(importance, stable=True)[:n_drop].tolist())
    return [b for b in range(importance.numel()) if b not in dropped]


@torch.no_grad()
def layer_tolerance(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    importance: dict[int, torch.Tensor],
    *,
    drop_fraction: float = 0.25,
    progress: bool = False,
) -> dict[int, float]:
    """Per layer: ΔPPL (0.01 = +1%) on ``windows`` when only that layer drops ``drop_fraction`` of its
    blocks (the lowest-importance ones, at least one)."""
    adapter.reset()
    base = mean_nll(adapter.model, windows)
    tolerance = {}
    for l in tqdm(range(adapter.n_layers), desc="layer tolerance", disable=not progress):
        n_drop = max(1, math.floor(drop_fraction * importance[l].numel()))
        adapter.set_kept({l: lowest_blocks_dropped(importance[l], n_drop)})
        tolerance[l] = math.exp(mean_nll(adapter.model, windows) - base) - 1.0
        adapter.reset()
    return tolerance


def most_tolerant(tolerance: dict[int, float], n_gated: int) -> list[int]:
    """The ``n_gated`` layers with the smallest ΔPPL, ascending layer order."""
    return sorted(sorted(tolerance, key=lambda l: (tolerance[l], l))[:n_gated])


@dataclass
class Experience:
    """One calibration window: its probe fingerprint ``[64]``, every layer's probe ratio, its outcome (a
    fraction of Bg, 0 if even the smallest level broke the per-sequence guardrail) and its whole-window
    block scores per gated layer (``[n_blocks]``)."""

    fingerprint: torch.Tensor
    ratios: dict[int, float]
    outcome: float
    payload: dict[int, torch.Tensor]


def _rest_nll(logits: torch.Tensor, ids: torch.Tensor, n_probe: int) -> float:
    """Mean NLL of tokens ``n_probe + 1 ..`` of ``ids`` ``[1, L]`` from the rest's logits ``[1, L - n_probe, V]``."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, n_probe + 1 :]).item()


@torch.no_grad()
def collect_experiences(
    policy: SeqGatePolicy, windows: torch.Tensor, *, guardrail: float, progress: bool = False
) -> list[Experience]:
    """Probe, fingerprint, score and test each calibration window ``[n, L]`` (see the module docstring).

    The level tests use the window's own probe evidence (no memory yet) and ``policy.Bg`` scaled by each
    of :data:`LEVELS`, in increasing order, stopping at the first that breaks ``guardrail``.
    """
    adapter, model = policy.adapter, policy.model
    all_layers = list(range(adapter.n_layers))
    n_probe = policy.probe_tokens
    if windows.shape[1] < n_probe + 2:
        raise ValueError(
            f"Calibration windows of {windows.shape[1]} tokens leave nothing after a probe of {n_probe} tokens; "
            "use a longer window or fewer probe tokens."
        )
    experiences = []
    for row in tqdm(range(windows.shape[0]), desc="experiences", disable=not progress):
        ids = windows[row : row + 1]
        probe = policy.probe(ids[:, :n_probe], layers=all_layers)
        with adapter.record(policy.gated_layers, what=("unit_abs_mean",)) as rec:
            rest = forward_cached(model, ids[:, n_probe:], probe.cache).logits
        rewind(probe.cache, n_probe)
        base = _rest_nll(rest, ids, n_probe)
        n_rest = ids.shape[1] - n_probe
        payload = {}
        for l in policy.gated_layers:
            # Whole-window mean |activation|: the probe's and the rest's token means, weighted by length.
            probe_mean = probe.evidence[l]
            rest_mean = policy.block_scores(l, rec[l]["unit_abs_mean"][0])
            payload[l] = (n_probe * probe_mean + n_rest * rest_mean) / ids.shape[1]
        outcome = 0.0
        for level in LEVELS:
            adapter.set_kept(policy.select(probe, Bg=level * policy.Bg))
            gated = forward_cached(model, ids[:, n_probe:], probe.cache).logits
            adapter.reset()
            rewind(probe.cache, n_probe)
            if math.exp(_rest_nll(gated, ids, n_probe) - base) - 1.0 > guardrail:
                break
            outcome = level
        experiences.append(Experience(policy.fingerprint(probe), probe.ratio, outcome, payload))
    return experiences


def choose_sentinel(experiences: list[Experience], fallback: int) -> int:
    """The layer whose probe ratio has the most negative Spearman correlation with the outcome.

    ``fallback`` when the outcomes (or every layer's ratios) do not vary, so no correlation exists.
    """
    outcomes = np.array([e.outcome for e in experiences])
    if len(experiences) < 3 or np.ptp(outcomes) == 0:
        return fallback
    best, best_rho = fallback, 0.0
    for layer in experiences[0].ratios:
        ratios = np.array([e.ratios[layer] for e in experiences])
        if np.ptp(ratios) == 0:
            continue
        rho = stats.spearmanr(ratios, outcomes).statistic
        if np.isfinite(rho) and rho < best_rho:
            best, best_rho = layer, float(rho)
    return best


def choose_tau(ratios: list[float], tolerant: list[bool]) -> float:
    """Threshold maximising (#tolerant − #intolerant) among sequences with ratio ≤ tau.

    Thresholds lie midway between consecutive sorted ratios; ties prefer more gating; ``-inf`` (never
    gate) when no threshold has a positive balance, ``+inf`` when gating everything is best.
    """
    order = np.argsort(ratios, kind="stable")
    sorted_ratios = np.asarray(ratios, dtype=float)[order]
    balance = np.cumsum(np.where(np.asarray(tolerant)[order], 1, -1))
    if balance.size == 0 or balance.max() <= 0:
        return -math.inf
    cut = int(np.flatnonzero(balance == balance.max())[-1])
    if cut == len(sorted_ratios) - 1:
        return math.inf
    return float((sorted_ratios[cut] + sorted_ratios[cut + 1]) / 2)


def _balance(ratios: list[float], tolerant: list[bool], tau: float) -> int:
    """#tolerant − #intolerant among the sequences with ratio ≤ ``tau``."""
    gated = np.asarray(ratios, dtype=float) <= tau
    return int(np.sum(np.where(np.asarray(tolerant)[gated], 1, -1)))


def choose_level(ratios: list[float], outcomes: list[float], levels: tuple[float, ...] = LEVELS) -> tuple[float, float]:
    """``(level, tau)``: the fraction of ``Bg`` to gate at and its threshold (:func:`choose_tau` with
    "tolerant" = outcome ≥ level), maximising ``level × balance``; ties prefer the larger level.
    ``(max(levels), -inf)`` when no level has a positive balance (never gate)."""
    best = (max(levels), -math.inf, 0.0)
    for level in sorted(levels):
        tolerant = [o >= level for o in outcomes]
        tau = choose_tau(ratios, tolerant)
        value = level * _balance(ratios, tolerant, tau) if tau > -math.inf else 0.0
        if value > 0 and value >= best[2]:
            best = (level, tau, value)
    return best[0], best[1]


def build_memory(experiences: list[Experience], gated_layers: list[int], sentinel: int) -> ExperienceMemory:
    """An :class:`ExperienceMemory` with one entry per experience: fingerprint, ``{"outcome", "ratio"}``
    record and a ``[n_blocks]`` block-score payload per gated layer (named by ``layer_key``)."""
    memory = ExperienceMemory(dim=FINGERPRINT_DIM, capacity=max(1, len(experiences)))
    for e in experiences:
        memory.add(
            e.fingerprint,
            {"outcome": e.outcome, "ratio": e.ratios[sentinel]},
            {layer_key(l): e.payload[l] for l in gated_layers},
        )
    return memory
