"""torch_gating.timing: interleaving order, CI arithmetic, token counting of the workloads."""

import inspect
import json
import math
import statistics
import warnings

import pytest
import torch

from torch_gating.kv_cache import with_cache
from torch_gating.models import tiny_random_model
from torch_gating.timing import (
    format_table,
    greedy_decode,
    greedy_decode_workload,
    interleaved_benchmark,
    interleaved_order,
    prefill_workload,
    student_t_ci,
)

T_975_DF4 = 2.7764451051977987  # Student-t 97.5% quantile, 4 degrees of freedom (statistical tables)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClock:
    """A clock that only moves when an arm says how long it 'ran'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_arms_are_warmed_up_then_interleaved_with_alternating_start():
    calls = []
    arms = {name: (lambda name=name: calls.append(name) or 10) for name in ("A", "B", "C")}
    result = interleaved_benchmark(arms, repeats=5, warmup=2)
    warmups = ["A", "B", "C", "C", "B", "A"]
    timed = ["A", "B", "C", "C", "B", "A", "A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert calls == warmups + timed
    assert interleaved_order(["A", "B"], 3) == [["A", "B"], ["B", "A"], ["A", "B"]]
    assert result.baseline == "A" and set(result.gains) == {"B", "C"}
    assert all(arm.tokens == (10,) * 5 for arm in result.arms.values())


def test_student_t_ci_matches_hand_computation():
    mean, (low, high) = student_t_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # sample variance of 1..5 is 2.5
    assert mean == 3.0
    assert (low, high) == (pytest.approx(3.0 - half, rel=1e-12), pytest.approx(3.0 + half, rel=1e-12))


def test_tokens_per_second_and_paired_gain_match_hand_computation():
    clock = FakeClock()
    base_seconds = [1.0, 1.1, 0.9, 1.2, 1.0]
    fast_seconds = [0.9, 1.0, 0.85, 1.0, 0.95]
    schedule = {"base": iter([1.0] + base_seconds), "fast": iter([1.0] + fast_seconds)}  # warm-up first

    def arm(name, tokens):
        def run():
            clock.now += next(schedule[name])
            return tokens

        return run

    result = interleaved_benchmark({"base": arm("base", 100), "fast": arm("fast", 100)}, repeats=5, clock=clock)
    base_tps = [100 / s for s in base_seconds]
    fast_tps = [100 / s for s in fast_seconds]
    assert result.arms["base"].tokens_per_s == pytest.approx(base_tps)
    assert result.arms["base"].mean == pytest.approx(statistics.mean(base_tps))
    ratios = [f / b for f, b in zip(fast_tps, base_tps)]
    half = T_975_DF4 * statistics.stdev(ratios) / math.sqrt(5)
    gain = result.gains["fast"]
    assert gain.ratios == pytest.approx(ratios)
    assert gain.gain == pytest.approx(statistics.mean(ratios) - 1)
    assert gain.gain_ci95 == pytest.approx((statistics.mean(ratios) - 1 - half, statistics.mean(ratios) - 1 + half))
    json.dumps(result.to_dict())  # the report is JSON-ready
    table = format_table(result)
    assert "fast" in table and f"{gain.gain:+.2%}" in table and "5 interleaved repeats" in table


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_an_arm_must_report_a_positive_token_count(bad):
    with pytest.raises(ValueError, match="number of tokens"):
        interleaved_benchmark({"a": lambda: bad}, repeats=5)


def test_fewer_than_five_repeats_are_refused():
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        interleaved_benchmark({"a": lambda: 1}, repeats=4)


def test_greedy_decode_matches_transformers_generate():
    model, tokenizer, _ = tiny_random_model("qwen2", seed=4)
    prompt = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    ours = greedy_decode(model, prompt, 12)
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs[0, prompt.shape[1] :].tolist()


def test_decode_counts_only_tokens_produced_before_eos():
    model, tokenizer, _ = tiny_random_model("gpt2", seed=5)
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids[0]
    free = greedy_decode(model, prompt, 10).tolist()
    # Declare the 4th generated token to be EOS: generation must stop right after producing it.
    eos = free[3]
    stop = free.index(eos) + 1
    assert greedy_decode_workload(model, prompt, 10, eos_token_id=eos) == stop <= 4
    assert greedy_decode_workload(model, prompt, 10, eos_token_id=[eos, 10_000]) == stop
    assert greedy_decode_workload(model, prompt, 10) == 10


def test_prefill_counts_every_window_token_and_runs_each_window():
    model, _, _ = tiny_random_model("llama", seed=6)
    shapes = []
    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    model.register_forward_pre_hook(record, with_kwargs=True)
    windows = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    assert prefill_workload(model, windows) == 48
    assert shapes == [(1, 16)] * 3
    assert prefill_workload(model, windows, batch_size=2) == 48
    assert shapes[3:] == [(2, 16), (1, 16)]


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_decoding_passes_the_cache_under_the_installed_transformers_keyword(family):
    """No deprecated keyword (transformers renamed ``past_key_values=`` to ``cache=``); the same tokens either way."""
    model, tokenizer, _ = tiny_random_model(family, seed=7)
    prompt = tokenizer("the cache keyword", return_tensors="pt").input_ids
    keyword = next(iter(with_cache(model, None)))
    assert keyword in inspect.signature(type(model).forward).parameters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated.*")
        ours = greedy_decode(model, prompt, 6)
    theirs = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs[0, prompt.shape[1] :].tolist()
