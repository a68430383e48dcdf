"""Objectives and hard constraints of a search: parsing, cheap analytic metrics, latency on the twin.

Metric names (what ``objectives.objectives`` and ``objectives.constraints`` may name):

    val_accuracy, val_loss      from training / evaluation (modes train, oneshot)
    params, macs, size_bytes    analytic, computed before anything is trained (cheap)
    latency_ms                  measured on the standalone twin (jit, warm-up, median of repeated calls)
    signal, report              table mode: the configured columns

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

CHEAP = ("params", "macs", "size_bytes")
MEASURED = ("latency_ms",)
TRAINED = ("val_accuracy", "val_loss")
TABLE = ("signal", "report")
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


def cheap_metrics(model, enc) -> dict[str, float]:
    """Analytic params, MACs per example and float32 size in bytes of candidate ``enc``."""
    params = model.param_count(enc)
    return {"params": float(params), "macs": float(model.macs(enc)), "size_bytes": float(4 * params)}


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
