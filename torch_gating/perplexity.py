"""Sliding-window perplexity, as in the Hugging Face perplexity guide, with every token scored exactly once.

Windows of ``window`` tokens start every ``stride`` tokens (``stride < window``). In each window only the
tokens not scored by an earlier window are targets; the earlier ones are context (label -100). Token 0
has no context and is never scored, so a text of N tokens has N − 1 scored tokens. Each target is
predicted from between ``window − stride`` and ``window − 1`` tokens of context (fewer at the start).

    nll_sum = Σ_scored −log p(x_t | x_begin..t−1)      (nats)
    ppl     = exp(nll_sum / n_tokens)

The NLL is summed from the logits here (not averaged by the model), so windows batched together give
the same total as windows run one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# forward(input_ids [B, L] int64) -> logits [B, L, V]
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PPLResult:
    """Perplexity ``ppl`` = exp(``nll_sum`` / ``n_tokens``); ``nll_sum`` in nats over ``n_tokens`` scored tokens."""

    ppl: float
    nll_sum: float
    n_tokens: int


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; tokens ``[first_target, end)`` are scored."""

    begin: int
    end: int
    first_target: int


def sliding_windows(n_tokens: int, *, window: int, stride: int) -> list[Window]:
    """The windows that score each of tokens 1 … ``n_tokens`` − 1 exactly once (see the module docstring)."""
    if not 1 <= stride < window:
        raise ValueError(
            f"Need 1 <= stride < window so that every window after the first has context; got window={window}, "
            f"stride={stride}. A typical choice is stride = window // 2."
        )
    if n_tokens < 2:
        raise ValueError(f"Perplexity needs at least 2 tokens (one context, one target), got {n_tokens}.")
    windows, scored_until = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin=begin, end=end, first_target=scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def sliding_window_ppl(
    model: torch.nn.Module | None,
    input_ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 1,
    forward: Forward | None = None,
    progress: bool = False,
) -> PPLResult:
    """Sliding-window perplexity of ``input_ids`` (``[N]`` or ``[1, N]`` int64).

    ``forward(ids [B, L]) -> logits [B, L, V]`` replaces ``model(ids).logits`` when given (e.g. a gated
    model deciding per window); ``model`` may then be ``None``. Up to ``batch_size`` windows of equal
    length run in one call. Inputs go to the device of ``model``'s parameters, if a model is given.
    """
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [N] or [1, N] token ids, got shape {tuple(input_ids.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if forward is None:
        if model is None:
            raise ValueError("Pass a model, or a forward(input_ids) -> logits function.")
        forward = _logits_of(model)
    ids = input_ids.long() if model is None else input_ids.to(device=next(model.parameters()).device, dtype=torch.long)

    windows = sliding_windows(ids.numel(), window=window, stride=stride)
    # Only the last window can be shorter than the others; batches never mix lengths, so no padding.
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].end - batches[-1][0].begin == w.end - w.begin:
            batches[-1].append(w)
        else:
            batches.append([w])

    nll_sum, n_scored = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        logits = forward(torch.stack([ids[w.begin : w.end] for w in batch]))
        for row, w in enumerate(batch):
            # The logit at position p predicts token p + 1.
            predictors = logits[row, w.first_target - w.begin - 1 : w.end - w.begin - 1].float()
            targets = ids[w.first_target : w.end]
            nll_sum += F.cross_entropy(predictors, targets, reduction="sum").item()
            n_scored += targets.numel()
    return PPLResult(ppl=math.exp(nll_sum / n_scored), nll_sum=nll_sum, n_tokens=n_scored)


def delta_ppl(base: PPLResult | float, other: PPLResult | float) -> float:
    """Relative perplexity change of ``other`` over ``base``: ``other / base − 1`` (0.01 = +1%)."""
    base_ppl = base.ppl if isinstance(base, PPLResult) else float(base)
    other_ppl = other.ppl if isinstance(other, PPLResult) else float(other)
    return other_ppl / base_ppl - 1.0


def _logits_of(model: torch.nn.Module) -> Forward:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return forward
