"""Timing for `benchmarks/population.py`: one timed call, the per-arm summary, and the machine's matmul peak.

The arms themselves are interleaved by the driver (A B C, A B C, ... within each repeat); the Student-t 95% CI
of the mean is `torch_gating.timing.student_t_ci`, the one every benchmark of this repository reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from torch_gating.timing import student_t_ci


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of ``fn()``; results are pulled to host inside ``fn`` so async dispatch is waited for."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summary(times: Sequence[float]) -> dict[str, float | int | None]:
    """median / min / mean seconds and the Student-t 95% half-width of the mean (None for a single repeat)."""
    t = np.asarray(times, float)
    half = None
    if t.size > 1:
        mean, (_, high) = student_t_ci(t.tolist())
        half = high - mean
    return {
        "median": float(np.median(t)), "min": float(t.min()), "mean": float(t.mean()), "ci95": half, "n": int(t.size)
    }


def matmul_peak(n: int, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an [n, n] @ [n, n] f32 matmul (median of ``repeats`` after a warm-up), jnp and torch."""
    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    jax_times = [timed(lambda: mm(a, a).block_until_ready())[0] for _ in range(repeats)]
    b = torch.from_numpy(np.array(a))
    torch.mm(b, b)
    torch_times = [timed(lambda: torch.mm(b, b))[0] for _ in range(repeats)]
    return {"jax": flops / float(np.median(jax_times)), "torch": flops / float(np.median(torch_times))}
