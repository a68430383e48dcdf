"""benchmarks/population.py runs end to end with --quick, MLP and CNN arms, and prints its tables and ratios
(never timings)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+\.[0-9]+"
FAMILIES = ("mlp", "cnn")


def test_population_benchmark_quick_prints_every_arm_ratio_and_equal_accuracies(tmp_path):
    out_json = tmp_path / "population.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "population.py"), "--quick", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(rf"matmul peak f32 .*jnp {NUMBER} GFLOP/s, torch {NUMBER} GFLOP/s", text)
    mlp, cnn = text.split("=== MLP family, P = 4 ===")[1].split("=== CNN family, P = 4 ===")
    assert re.search(r"stem stride 2 .*channels \(4, 8\), kernels \(1, 3\), <= 2 stages x <= 1 blocks", cnn)
    common = (
        "exact layer programs, first call",
        "exact, then a new population of P others",
        "exact layer programs, steady state",
        "per-arch compiled twin (extract + jit)",
        "PyTorch eager, one by one",
        "vmapped train_population, first call",
        "vmapped train_population, steady epoch",
        "PyTorch eager, one after another",
    )
    vmapped = {mlp: "vmapped evaluate_shared", cnn: "vmapped recalibrate_bn + evaluate_population"}
    for section, name in vmapped.items():
        for label in (f"{name}, first call", f"{name}, steady state", *common):
            assert re.search(rf"^  {re.escape(label)} +{NUMBER}", section, flags=re.M), label
        for ratio in (
            "vmapped (steady) vs per-arch compile",
            "vmapped (first call) vs per-arch compile",
            "vmapped (steady) vs PyTorch eager",
            "exact (steady) vs vmapped (steady)",
            "exact (steady) vs per-arch compile",
            "exact (new population) vs per-arch compile",
            "exact (steady) vs PyTorch eager",
            "vmapped (steady) vs PyTorch sequential",
            "vmapped (first call) vs PyTorch sequential",
        ):
            assert re.search(rf"ratio {re.escape(ratio)}: {NUMBER}x", section), ratio
        assert len(re.findall(r"useful FLOP/s \(% of matmul peak\)", section)) == 2
        assert len(re.findall(rf"padded fraction \(candidate MACs / max-width MACs\): {NUMBER}", section)) == 2
        # The three evaluation arms score the same networks with the same weights (and, for the CNN, the same
        # BatchNorm statistics, each arm recalibrating its own): equal accuracies.
        assert re.search(r"accuracy mean: vmapped (\S+), exact \1, twin \1, torch \1 \(max \|diff\| 0\.0000", section)
    for section in (mlp, cnn):  # every family has the exact training arm
        for label in ("exact train_population_sized, first call (compiles)",
                      "exact train_population_sized, steady epoch"):
            assert re.search(rf"^  {re.escape(label)} +{NUMBER}", section, flags=re.M), label
        for ratio in ("exact (steady) vs PyTorch sequential", "exact (first call) vs PyTorch sequential",
                      "exact (steady) vs vmapped (steady)"):
            assert re.search(rf"ratio {re.escape(ratio)}: {NUMBER}x", section), ratio
    assert "BatchNorm recalibration on 256 training images" in cnn

    results = json.loads(out_json.read_text())
    for family in FAMILIES:
        evaluation, training = results[family]["4"]["evaluation"], results[family]["4"]["training"]
        assert set(evaluation["times"]) == {"vmapped", "exact", "twin", "torch"}
        assert set(training["times"]) == {"vmapped", "exact", "torch"}
        assert all(len(acc) == 4 for acc in training["accuracy"].values())
        assert len(set(results[family]["4"]["architectures"])) == 4
        assert 0 < evaluation["padded_fraction"] <= 1
        accuracy = evaluation["accuracy"]
        assert accuracy["vmapped"] == pytest.approx(accuracy["twin"], abs=1e-6)
        assert accuracy["vmapped"] == pytest.approx(accuracy["torch"], abs=1e-6)
    for family in FAMILIES:  # exact and vmapped train the same networks
        trained = results[family]["4"]["training"]["accuracy"]
        assert np.abs(np.subtract(trained["exact"], trained["vmapped"])).max() <= 0.1, family
    assert all(a.startswith("cnn|") for a in results["cnn"]["4"]["architectures"])
    assert results["cnn"]["4"]["evaluation"]["torch_vs_twin_max_logit_diff"] <= 1e-4
    assert results["cnn"]["4"]["evaluation"]["bn_recalibration_examples"] == 256
