"""torch_gating.perplexity: sliding-window perplexity equals a brute-force per-token reference."""

import math

import pytest
import torch

from torch_gating.models import tiny_random_model
from torch_gating.perplexity import PPLResult, delta_ppl, sliding_window_ppl, sliding_windows

WINDOW, STRIDE = 32, 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def brute_force_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Score each token t >= 1 on its own: context from the start of the first window whose end passes t."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for t in range(1, ids.numel()):
            k = 0 if t < window else (t - window) // stride + 1  # first window k with k*stride + window > t
            context = ids[k * stride : t]
            logits = model(input_ids=context[None]).logits[0, -1]
            total -= torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sliding_window_ppl_equals_brute_force_per_token_reference(family):
    model, tokenizer, _ = tiny_random_model(family, seed=1)
    ids = random_ids(75, len(tokenizer))
    result = sliding_window_ppl(model, ids, window=WINDOW, stride=STRIDE)
    reference, count = brute_force_nll(model, ids, WINDOW, STRIDE)
    assert result.n_tokens == count == ids.numel() - 1
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(reference / count), rel=1e-5)


def test_each_token_is_scored_exactly_once():
    for n in (2, 31, 32, 33, 44, 45, 100):
        windows = sliding_windows(n, window=WINDOW, stride=STRIDE)
        scored = [t for w in windows for t in range(w.first_target, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= WINDOW and w.first_target > w.begin for w in windows)


def test_batched_windows_give_the_same_result():
    model, tokenizer, _ = tiny_random_model("qwen2", seed=2)
    ids = random_ids(101, len(tokenizer), seed=1)
    one = sliding_window_ppl(model, ids, window=WINDOW, stride=STRIDE, batch_size=1)
    batched = sliding_window_ppl(model, ids[None], window=WINDOW, stride=STRIDE, batch_size=3)
    assert batched.n_tokens == one.n_tokens == 100
    assert batched.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)


def test_single_window_matches_transformers_own_loss():
    model, tokenizer, _ = tiny_random_model("gpt2", seed=3)
    ids = random_ids(20, len(tokenizer), seed=2)
    result = sliding_window_ppl(model, ids, window=WINDOW, stride=STRIDE)
    with torch.inference_mode():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()  # mean NLL over 19 shifted targets
    assert result.ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_forward_hook_replaces_the_model():
    vocab = 50
    calls = []

    def uniform(ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return torch.zeros(*ids.shape, vocab)

    ids = random_ids(45, vocab)
    result = sliding_window_ppl(None, ids, window=WINDOW, stride=STRIDE, batch_size=8, forward=uniform)
    # Uniform predictions over V tokens have perplexity exactly V.
    assert result.ppl == pytest.approx(vocab, rel=1e-6)
    assert result.n_tokens == 44
    assert calls == [(2, 32), (1, 21)]  # windows [0,32) [12,44) batched; the short last one [24,45) alone


def test_invalid_windows_are_rejected_with_a_fix():
    with pytest.raises(ValueError, match="stride < window"):
        sliding_windows(100, window=16, stride=16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_windows(1, window=16, stride=8)


def test_delta_ppl_is_the_relative_change():
    base = PPLResult(ppl=20.0, nll_sum=0.0, n_tokens=1)
    assert delta_ppl(base, PPLResult(ppl=20.2, nll_sum=0.0, n_tokens=1)) == pytest.approx(0.01)
    assert delta_ppl(20.0, 19.0) == pytest.approx(-0.05)
