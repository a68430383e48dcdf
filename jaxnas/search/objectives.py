"""Objectives and hard constraints of a search: parsing, cheap analytic metrics, latency on the twin.

Metric names (what ``objectives.objectives`` and ``objectives.constraints`` may name):

    val_accuracy, val_loss      from training / evaluation (modes train, oneshot)
    params, macs, size_bytes    analytic, computed before anything is trained (cheap)
    latency_ms                  measured on the standalone twin (jit, warm-up, median of repeated calls)
    avg_macs                    MACs per image with early exits (space.name=macro): exit heads trained on the
                                candidate's trained (or inherited) weights, thresholds calibrated on validation under
                                objectives.exit_max_drop (`jaxnas.adaptive.exits.fit_exits`); a network no exit helps,
                                and an mlp, costs its macs
    signal, report              table mode: the configured columns

Language-model runs (space.name=lm) measure their own (`metric_names`):

    val_ppl, val_loss           exp of the mean validation token NLL, and that NLL
    params, macs_per_token      analytic (MACs averaged over a window of seq_len tokens)
    kv_bytes_per_token          what the decoding cache grows by per token (float32; 0 for linear / recurrent)
    size_bytes                  the twin's stored weights at objectives.quant (`jaxnas.quant.stored_bytes`)
    latency_ms_per_token        measured: one jitted `TwinLM.decode_step` with a cache, after a warm-up, median

Cheap metrics are computed first; a candidate that violates a constraint on them is marked ``infeasible`` and
never trained or evaluated, and infeasible candidates never become the best.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np
from flax import nnx

from jaxnas.search.pareto import Objective, parse_objective

IMAGE_CHEAP = ("params", "macs", "size_bytes")
IMAGE_MEASURED = ("latency_ms",)
IMAGE_TRAINED = ("val_accuracy", "val_loss")
EXITS = "avg_macs"  # measured after training, only when an objective or constraint names it (`needs_exits`)
LM_CHEAP = ("params", "macs_per_token", "kv_bytes_per_token", "size_bytes")
LM_MEASURED = ("latency_ms_per_token",)
LM_TRAINED = ("val_ppl", "val_loss")
TABLE = ("signal", "report")
# Every name a mode train / oneshot run may measure, whatever its space (the config refuses image metrics for
# space.name=lm and language-model metrics for the others); `metric_names` gives one space's.
CHEAP = tuple(dict.fromkeys(IMAGE_CHEAP + LM_CHEAP))
MEASURED = IMAGE_MEASURED + LM_MEASURED
TRAINED = tuple(dict.fromkeys(IMAGE_TRAINED + LM_TRAINED + (EXITS,)))


def metric_names(space_name: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(trained, cheap, measured) metric names of a search over ``space_name`` (modes train / oneshot), in the
    order of history.csv's columns."""
    if space_name == "lm":
        return LM_TRAINED, LM_CHEAP, LM_MEASURED
    return IMAGE_TRAINED, IMAGE_CHEAP, IMAGE_MEASURED


def needs_exits(cfg) -> bool:
    """Whether a run's objectives or constraints name ``avg_macs`` (then every trained candidate gets exits)."""
    return EXITS in {metric for _, metric in cfg.named_metrics()}


def fit_candidate_exits(twin, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], cfg):
    """`jaxnas.adaptive.exits.fit_exits` of a candidate's ``twin`` with the run's objectives.exit_* settings, or
    None if it is not a conv network or has a single block (nowhere to exit: it costs its macs)."""
    from jaxnas.adaptive.exits import fit_exits
    from jaxnas.supernet.conv import TwinConvNet

    if not isinstance(twin, TwinConvNet) or len(twin.blocks) < 2:
        return None
    o = cfg.objectives
    return fit_exits(twin, train, validation, epochs=o.exit_epochs, grid=o.exit_grid, max_drop=o.exit_max_drop,
                     z=o.exit_guardrail_z, seed=cfg.seed)


def exit_avg_macs(model, twin, enc, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                  cfg) -> float:
    """``avg_macs`` of candidate ``enc`` with its ``twin`` (trained or inherited weights) on validation
    (`fit_candidate_exits`); the twin's macs where no exit can be attached."""
    fitted = fit_candidate_exits(twin, train, validation, cfg)
    return float(model.macs(enc)) if fitted is None else float(fitted.validation["avg_macs"])


def exit_report(model, twin, enc, train, validation, test, cfg) -> dict:
    """The final winner's early exits: fitted and guarded on validation as during the search, then read on test
    (policy accuracy, its drop against the twin's own head, exit rates and average MACs)."""
    from jaxnas.adaptive.exits import average_macs, exit_rates, logits_by_exit, policy_accuracy

    macs = float(model.macs(enc))
    fitted = fit_candidate_exits(twin, train, validation, cfg)
    if fitted is None:
        return {"exits_after_blocks": [], "avg_macs_validation": macs, "avg_macs": macs, "macs_saved_fraction": 0.0}
    logits = logits_by_exit(fitted.net, test[0], 256)
    full = 100.0 * float(np.mean(logits[-1].argmax(-1) == test[1]))
    acc, where = policy_accuracy(logits, test[1], fitted.net.thresholds)
    avg = average_macs(where, fitted.segment_macs)
    return {
        "exits_after_blocks": fitted.net.exits, "thresholds": fitted.net.thresholds,
        "validation": fitted.validation, "avg_macs_validation": fitted.validation["avg_macs"],
        "test_accuracy_full": full, "test_accuracy": acc, "test_accuracy_drop": full - acc,
        "exit_rates": exit_rates(where, len(fitted.net.exits)),
        "avg_macs": avg, "macs_saved_fraction": 1 - avg / macs,
    }


_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``."""

    metric: str
    op: str
    bound: float

    def violation(self, value: float) -> float:
        """0 when it holds; else how far it is off, relative to the bound's size (inf for a missing value)."""
        if value is None or not math.isfinite(value):
            return math.inf
        gap = value - self.bound if self.op == "<=" else self.bound - value
        return max(gap, 0.0) / max(abs(self.bound), 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_constraint(text: str, allowed: tuple[str, ...]) -> Constraint:
    match = _CONSTRAINT.match(text)
    if not match:
        raise ValueError(
            f"constraint {text!r} is malformed: expected 'metric<=value' or 'metric>=value', e.g. 'params<=1e5'"
        )
    metric, op, bound = match.groups()
    if metric not in allowed:
        raise ValueError(f"constraint {text!r} names metric {metric!r}; this mode measures {', '.join(allowed)}")
    try:
        value = float(bound)
    except ValueError:
        raise ValueError(f"constraint {text!r}: {bound!r} is not a number") from None
    return Constraint(metric, op, value)


def parse_objectives(texts: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[Objective, ...]:
    if not texts:
        raise ValueError("objectives is empty; give at least one, e.g. objectives.objectives=[val_accuracy]")
    objectives = tuple(parse_objective(t) for t in texts)
    for o in objectives:
        if o.name not in allowed:
            raise ValueError(f"objective {o.name!r} is not measured in this mode; choose from {', '.join(allowed)}")
    if len({o.name for o in objectives}) != len(objectives):
        raise ValueError(f"objectives name a metric twice: {list(texts)}")
    return objectives


def cheap_metrics(model, enc, quant: str = "fp32") -> dict[str, float]:
    """Analytic params, MACs per example and float32 size in bytes of candidate ``enc``; for a language model
    (`jaxnas.search.models.LMModel`) params, macs_per_token, kv_bytes_per_token and size_bytes at ``quant``."""
    params = model.param_count(enc)
    if getattr(model, "is_lm", False):
        return {"params": float(params), "macs_per_token": float(model.macs(enc)),
                "kv_bytes_per_token": float(model.kv_bytes_per_token(enc)),
                "size_bytes": float(lm_size_bytes(model, enc, quant))}
    return {"params": float(params), "macs": float(model.macs(enc)), "size_bytes": float(4 * params)}


def lm_size_bytes(model, enc, quant: str) -> int:
    """Bytes of the twin's parameters of ``enc`` stored at ``quant`` (`jaxnas.quant.stored_bytes` of their shapes:
    no weights are built)."""
    from jaxnas import quant as q
    from jaxnas.spaces.lm import LMArch
    from jaxnas.supernet.lm import TwinLM

    sn = model.supernet
    arch = LMArch.from_encoding(sn.space, np.asarray(enc))
    twin = nnx.eval_shape(lambda: TwinLM(arch, vocab_size=sn.vocab_size, positions=sn.seq_len, rngs=nnx.Rngs(0)))
    return q.stored_bytes(nnx.state(twin, nnx.Param).to_pure_dict(), quant)


def decode_latency_ms(twin, batch: int, max_len: int, repeats: int) -> float:
    """Median wall time (ms) of one jitted ``twin.decode_step`` (a `TwinLM`: one new token for each of ``batch``
    sequences, with a cache of ``max_len`` positions) after a warm-up call."""
    graph, state = nnx.split(twin)

    @jax.jit
    def step(state, cache, token):
        return nnx.merge(graph, state).decode_step(cache, token)

    cache = twin.init_cache(batch, max_len)
    token = jax.numpy.zeros((batch,), jax.numpy.int32)
    jax.block_until_ready(step(state, cache, token))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(state, cache, token))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def twin_latency_ms(twin: nnx.Module, example: np.ndarray, repeats: int) -> float:
    """Median wall time (ms) of one jitted forward of ``twin`` on ``example`` [B, ...] after a warm-up call."""
    graph, state = nnx.split(twin)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graph, state)(x)

    x = jax.numpy.asarray(example)
    forward(state, x).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(state, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def total_violation(metrics: dict, constraints: tuple[Constraint, ...], only: tuple[str, ...] | None = None) -> float:
    """Sum of the constraints' violations (those on metrics in ``only``, if given); 0: feasible."""
    return float(
        sum(c.violation(metrics.get(c.metric)) for c in constraints if only is None or c.metric in only)
    )
