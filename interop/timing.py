"""Throughput measurement, framework-neutral (numpy, jax and torch workloads alike): interleaved arms in one
process, warm-up, at least 5 repeats, Student-t 95% CIs.

The rules: every side of a comparison is measured in the same process, the arms interleaved, after untimed
warm-up, over at least :data:`MIN_REPEATS` timed repeats, and reported with Student-t 95% confidence intervals.

An *arm* is a callable that runs one workload (including any gating decision it makes) and returns the
number of items it actually processed or produced - tokens for a language model, images for a classifier (the
fields below say "tokens", their first use). :func:`interleaved_benchmark` times whole calls, so everything the
callable does is inside the timed region.

Order. Repeat r runs the arms in the given order when r is even and in reverse order when r is odd
(A B C, C B A, A B C, …). Neighbouring repeats mirror each other, so a slow linear drift of the
machine's speed (thermal, other tenants) adds the same average time to every arm over each pair of
repeats. Warm-up rounds (``warmup`` calls of every arm, same alternation) run first and are not timed.

Statistics. Per arm: tokens/s of every repeat, their mean and a Student-t 95% CI of the mean
(mean ± t₀.₉₇₅,ₙ₋₁ · s / √n, s the sample standard deviation). Per non-baseline arm: the paired ratios
rᵢ = (tokens/s of the arm in repeat i) / (tokens/s of the baseline in repeat i), whose mean and Student-t
95% CI estimate the speed ratio; the relative gain is ratio − 1. Pairing within a repeat cancels the
drift that both arms of one repeat share.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from scipy import stats
from tqdm.auto import tqdm

Arm = Callable[[], int]
MIN_REPEATS = 5  # the fewest timed repeats per arm (the measurement rules above)


@dataclass(frozen=True)
class ArmResult:
    """One arm's timed repeats: ``tokens`` per call, ``seconds`` per call (s), their ratio in tokens/s."""

    name: str
    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    tokens_per_s: tuple[float, ...]
    mean: float
    ci95: tuple[float, float]


@dataclass(frozen=True)
class Gain:
    """Speed of ``arm`` relative to ``baseline`` from paired per-repeat ratios (1.05 = 5% more tokens/s)."""

    arm: str
    baseline: str
    ratios: tuple[float, ...]
    mean_ratio: float
    ratio_ci95: tuple[float, float]

    @property
    def gain(self) -> float:
        """Relative gain in tokens/s: ``mean_ratio − 1`` (0.05 = +5%)."""
        return self.mean_ratio - 1.0

    @property
    def gain_ci95(self) -> tuple[float, float]:
        """Student-t 95% CI of the relative gain."""
        return (self.ratio_ci95[0] - 1.0, self.ratio_ci95[1] - 1.0)


@dataclass(frozen=True)
class BenchmarkResult:
    """Everything one :func:`interleaved_benchmark` run measured; ``gains`` has every arm but the baseline."""

    arms: dict[str, ArmResult]
    gains: dict[str, Gain]
    baseline: str
    repeats: int
    warmup: int

    def to_dict(self) -> dict:
        """A JSON-ready dict, with each gain's ``gain`` and ``gain_ci95`` spelled out."""
        out = asdict(self)
        for name, gain in self.gains.items():
            out["gains"][name].update(gain=gain.gain, gain_ci95=gain.gain_ci95)
        return out


def student_t_ci(samples: Iterable[float], confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean of ``samples`` and its two-sided Student-t confidence interval: ``(mean, (low, high))``."""
    values = [float(v) for v in samples]
    n = len(values)
    if n < 2:
        raise ValueError(f"A confidence interval needs at least 2 samples, got {n}.")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def interleaved_order(names: list[str], repeats: int) -> list[list[str]]:
    """The arm order of each repeat: ``names`` forward in even repeats, reversed in odd ones."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(repeats)]


def interleaved_benchmark(
    arms: Mapping[str, Arm],
    *,
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    baseline: str | None = None,
    progress: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchmarkResult:
    """Time every arm ``repeats`` times, interleaved, after ``warmup`` untimed rounds (see module docstring).

    ``arms`` maps a name to a callable returning the number of tokens it processed (a positive int).
    ``baseline`` (default: the first arm) is what the other arms' gains are relative to. ``clock``
    returns seconds; it is a parameter so tests can drive the harness with a fake clock.
    """
    names = list(arms)
    if len(names) < 1:
        raise ValueError("Pass at least one arm to benchmark.")
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be >= {MIN_REPEATS} (the fewest timed repeats per arm), got {repeats}.")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (every arm is warmed up before timing), got {warmup}.")
    baseline = names[0] if baseline is None else baseline
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {names}.")

    with tqdm(total=(warmup + repeats) * len(names), desc="timing", unit="call", disable=not progress) as bar:
        for order in interleaved_order(names, warmup):
            for name in order:
                _count_tokens(name, arms[name]())
                bar.update()
        tokens: dict[str, list[int]] = {name: [] for name in names}
        seconds: dict[str, list[float]] = {name: [] for name in names}
        # Everything alive after warm-up (a loaded model: ~10^5 objects) moves to the permanent generation, so the
        # collection before each call scans only what the calls themselves left (0.3 s per call otherwise).
        gc.collect()
        gc.freeze()
        try:
            for order in interleaved_order(names, repeats):
                for name in order:
                    # Collect garbage outside the timed region so one arm's leftovers are not billed to the next.
                    gc.collect()
                    start = clock()
                    n = arms[name]()
                    elapsed = clock() - start
                    tokens[name].append(_count_tokens(name, n))
                    seconds[name].append(elapsed)
                    bar.update()
        finally:
            gc.unfreeze()

    results = {}
    for name in names:
        tps = tuple(n / s for n, s in zip(tokens[name], seconds[name]))
        mean, ci = student_t_ci(tps)
        results[name] = ArmResult(name, tuple(tokens[name]), tuple(seconds[name]), tps, mean, ci)
    gains = {}
    for name in names:
        if name != baseline:
            ratios = tuple(a / b for a, b in zip(results[name].tokens_per_s, results[baseline].tokens_per_s))
            mean, ci = student_t_ci(ratios)
            gains[name] = Gain(name, baseline, ratios, mean, ci)
    return BenchmarkResult(arms=results, gains=gains, baseline=baseline, repeats=repeats, warmup=warmup)


def _count_tokens(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"Arm {name!r} returned {n!r}; an arm must return the number of tokens it processed, a positive int."
        )
    return n


def format_table(result: BenchmarkResult, unit: str = "tokens/s") -> str:
    """A plain-text table: per arm the mean, its 95% CI and the gain over the baseline with its 95% CI."""
    header = ("arm", unit, "95% CI", f"vs {result.baseline}", "95% CI of gain")
    rows = [header]
    for name, arm in result.arms.items():
        row = [name, f"{arm.mean:.1f}", f"[{arm.ci95[0]:.1f}, {arm.ci95[1]:.1f}]"]
        if name in result.gains:
            gain = result.gains[name]
            row += [f"{gain.gain:+.2%}", f"[{gain.gain_ci95[0]:+.2%}, {gain.gain_ci95[1]:+.2%}]"]
        else:
            row += ["baseline", ""]
        rows.append(tuple(row))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    footer = f"{result.repeats} interleaved repeats after {result.warmup} warm-up round(s); Student-t 95% CIs"
    return "\n".join(lines + [footer])


__all__ = ["MIN_REPEATS", "Arm", "ArmResult", "BenchmarkResult", "Gain", "format_table", "interleaved_benchmark",
           "interleaved_order", "student_t_ci"]
