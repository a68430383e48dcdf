"""Throughput measurement of torch workloads (prefill, greedy decode); the harness itself (interleaved arms, warm-up,
>= 5 repeats, Student-t 95% CIs) is `interop.timing`, re-exported here.

The rules: every side of a comparison is measured in the same process, the arms interleaved, after untimed
warm-up, over at least :data:`MIN_REPEATS` timed repeats, and reported with Student-t 95% confidence intervals.

An *arm* is a callable that runs one workload (including any gating decision it makes) and returns the
number of tokens it actually processed or produced. :func:`interleaved_benchmark` times whole calls,
so everything the callable does is inside the timed region.

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

from collections.abc import Iterable

import torch

# The harness and its statistics are framework-neutral (jaxnas.adaptive times JAX programs with them).
from interop.timing import (  # noqa: F401  (re-exported: this module's public API since before the move)
    MIN_REPEATS,
    Arm,
    ArmResult,
    BenchmarkResult,
    Gain,
    format_table,
    interleaved_benchmark,
    interleaved_order,
    student_t_ci,
)
from torch_gating.kv_cache import cache_of, forward_cached

@torch.inference_mode()
def prefill_workload(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 1) -> int:
    """Prefill every window (``[n_windows, L]`` int64) as a prompt: KV cache built, last-token logits only.

    This is the work a generation request does before its first new token. Returns the number of
    tokens processed, ``n_windows · L``.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n_windows, L] token ids, got shape {tuple(windows.shape)}.")
    windows = windows.to(next(model.parameters()).device)
    for start in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[start : start + batch_size], use_cache=True, logits_to_keep=1)
    return windows.numel()


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    *,
    eos_token_id: int | Iterable[int] | None = None,
) -> torch.Tensor:
    """Greedy generation, batch 1, with a KV cache: the generated ids ``[n_generated]`` int64.

    ``prompt_ids`` is ``[P]`` or ``[1, P]``. Generation stops after ``new_tokens`` tokens or right after
    an EOS token (which is included), so ``n_generated <= new_tokens``.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}.")
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    ids = prompt_ids.reshape(1, -1).to(next(model.parameters()).device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated = []
    for step in range(new_tokens):
        next_id = out.logits[:, -1].argmax(dim=-1)  # [1]
        generated.append(next_id)
        if (eos and next_id.item() in eos) or step + 1 == new_tokens:
            break
        out = forward_cached(model, next_id[:, None], cache_of(out))
    return torch.cat(generated)


def greedy_decode_workload(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    *,
    eos_token_id: int | Iterable[int] | None = None,
) -> int:
    """Run :func:`greedy_decode` (prompt prefill included) and return the number of tokens it generated."""
    return greedy_decode(model, prompt_ids, new_tokens, eos_token_id=eos_token_id).numel()
