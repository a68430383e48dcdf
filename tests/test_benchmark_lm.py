"""benchmarks/lm.py runs end to end with --quick (search, equal-budget retraining against the GPT-2-like grid,
interleaved decode latency, PyTorch eager training) and its JSON holds the comparison, consistent with itself."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lm  # noqa: E402


def test_lm_benchmark_quick_writes_the_comparison_as_json(tmp_path, capsys):
    out_json = tmp_path / "lm.json"
    script = str(ROOT / "benchmarks" / "lm.py")
    # the smallest comparison that exercises every part: one searched network against one baseline
    done = subprocess.run([sys.executable, script, "--quick", "--front", "1", "--grid-widths", "32", "--skip-torch",
                           "--json", str(out_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out_json.read_text())["torch"] is None and "torch / jaxnas" not in done.stdout
    # the PyTorch comparison on that report's networks, added to it
    torch_done = subprocess.run([sys.executable, script, "--quick", "--torch-only", str(out_json)],
                                cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert torch_done.returncode == 0, torch_done.stderr[-3000:]
    r = json.loads(out_json.read_text())
    assert r["config"]["space"]["name"] == "lm" and r["config"]["data"]["name"] == "text:pydoc"
    assert len(r["searched"]) == 1 and len(r["baselines"]) == 1 and r["search_evaluations"] >= 1
    for row in r["searched"] + r["baselines"]:
        assert row["params"] > 0 and row["latency_ms"] > 0
        assert row["val_ppl"] == pytest.approx(np.mean(row["val_ppl_seeds"]))
        assert 1 < row["val_ppl"] < 256 and 1 < row["test_ppl"] < 256  # better than uniform over 256 bytes
    for row in r["baselines"]:
        assert all(part in row["arch"] for part in ("mixer=attention", "norm=layernorm", "position=learned"))
        assert row["search_values"] is None
    assert all(row["search_values"] is not None for row in r["searched"])
    # the derived numbers follow from the rows
    assert r["dominated_count"] == sum(bool(d["dominated_by"]) for d in r["dominance"])
    assert r["dominated_beyond_noise_count"] == sum(bool(d["beyond_noise_by"]) for d in r["dominance"])
    recomputed = lm.dominated(r["searched"], r["baselines"])
    assert recomputed == r["dominance"]
    for row in r["equal_params"]:
        if row["searched"] is not None:
            assert row["searched_params"] <= row["baseline_params"]
            assert row["searched_wins"] == (row["searched_val_ppl"] < row["baseline_val_ppl"])
    t = r["torch"]
    assert t["population"] == len({x["arch"] for x in r["searched"] + r["baselines"]})
    assert t["jax_epoch"]["median"] > 0 and t["torch_epoch"]["median"] > 0
    assert t["torch_over_jax_steady"] == pytest.approx(t["torch_epoch"]["median"] / t["jax_epoch"]["median"])
    assert 0 < t["padded_fraction"] <= 1 and t["sized_epoch"]["median"] > 0
    assert t["torch_over_sized_steady"] == pytest.approx(t["torch_epoch"]["median"] / t["sized_epoch"]["median"])
    np.testing.assert_allclose(t["sized_train_loss"], t["jax_train_loss"], rtol=1e-4)
    # both sides did the same work: same initial weights, batches and optimiser -> close losses after one epoch
    np.testing.assert_allclose(t["torch_train_loss"], t["jax_train_loss"], rtol=0.02)
    np.testing.assert_allclose(t["torch_val_loss"], t["jax_val_loss"], rtol=0.02)
    assert "the searched front dominates" in done.stdout and "torch / jaxnas" in torch_done.stdout

    # a report of another space is refused
    assert lm.main(["--quick", "--torch-only", str(out_json), "space.max_layers=2"]) == 2
    assert "its space differs from this run's" in capsys.readouterr().err


def test_dominance_and_equal_parameter_comparisons():
    searched = [{"arch": "a", "val_ppl": 5.0, "latency_ms": 0.10, "params": 100},
                {"arch": "b", "val_ppl": 7.0, "latency_ms": 0.05, "params": 50}]
    baselines = [{"arch": "x", "val_ppl": 6.0, "latency_ms": 0.10, "params": 120},   # dominated by a
                 {"arch": "y", "val_ppl": 7.0, "latency_ms": 0.05, "params": 40},    # equal to b: not dominated
                 {"arch": "z", "val_ppl": 8.0, "latency_ms": 0.20, "params": 60}]    # dominated by a and b
    assert [d["dominated_by"] for d in lm.dominated(searched, baselines)] == [["a"], [], ["a", "b"]]
    # beyond the latency noise: lower perplexity and the whole latency CI at or below the baseline's
    assert [d["beyond_noise_by"] for d in lm.dominated(searched, baselines)] == [["a"], [], ["a", "b"]]
    noisy = [{**b, "latency_ci95": 0.08} for b in baselines]
    assert [d["beyond_noise_by"] for d in lm.dominated(searched, noisy)] == [[], [], ["a", "b"]]
    noisier = [{**s, "latency_ci95": 0.04} for s in searched]
    assert [d["beyond_noise_by"] for d in lm.dominated(noisier, noisy)] == [[], [], ["b"]]
    rows = lm.at_equal_params(searched, baselines)
    assert [(r["searched"], r["searched_wins"]) for r in rows] == [("a", True), (None, False), ("b", True)]


def test_gpt2_like_baselines_are_architectures_of_the_space_and_bad_sizes_are_refused(capsys):
    from interop.config import load_config
    from jaxnas.config import RunConfig
    from jaxnas.search.models import build_space

    cfg = load_config(RunConfig, None, [*lm.BASE, *lm.FULL])
    space = build_space(cfg.space)
    arch = lm.gpt2_like(space, 2, 64)
    assert arch == ("layers=2;hidden=64;norm=layernorm;activation=gelu;mixer=attention;position=learned;"
                    "layer1.heads=4;layer1.kv_heads=4;layer1.ffn_mult=4;layer2.heads=4;layer2.kv_heads=4;"
                    "layer2.ffn_mult=4")
    assert lm.main(["--grid-widths", "48"]) == 2
    assert "grid and headline sizes must be options of the space" in capsys.readouterr().err
