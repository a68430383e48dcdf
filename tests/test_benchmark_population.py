"""benchmarks/population.py runs end to end with --quick and prints its tables and ratios (never timings)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+\.[0-9]+"


def test_population_benchmark_quick_prints_every_arm_ratio_and_equal_accuracies(tmp_path):
    out_json = tmp_path / "population.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "population.py"), "--quick", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(rf"matmul peak f32 .*jnp {NUMBER} GFLOP/s, torch {NUMBER} GFLOP/s", text)
    assert "=== MLP family, P = 4 ===" in text
    for label in (
        "vmapped evaluate_shared, first call",
        "vmapped evaluate_shared, steady state",
        "per-arch compiled twin (extract + jit)",
        "PyTorch eager, one by one",
        "vmapped train_population, first call",
        "vmapped train_population, steady epoch",
        "PyTorch eager, one after another",
    ):
        assert re.search(rf"^  {re.escape(label)} +{NUMBER}", text, flags=re.M), label
    for ratio in (
        "vmapped (steady) vs per-arch compile",
        "vmapped (first call) vs per-arch compile",
        "vmapped (steady) vs PyTorch eager",
        "vmapped (steady) vs PyTorch sequential",
        "vmapped (first call) vs PyTorch sequential",
    ):
        assert re.search(rf"ratio {re.escape(ratio)}: {NUMBER}x", text), ratio
    assert len(re.findall(r"useful FLOP/s \(% of matmul peak\)", text)) == 2
    assert len(re.findall(rf"padded fraction \(candidate MACs / max-width MACs\): {NUMBER}", text)) == 2
    # The three evaluation arms score the same networks with the same weights: equal accuracies.
    assert re.search(r"accuracy mean: vmapped (\S+), twin \1, torch \1 \(max \|diff\| 0\.0000", text)

    results = json.loads(out_json.read_text())
    evaluation, training = results["mlp"]["4"]["evaluation"], results["mlp"]["4"]["training"]
    assert set(evaluation["times"]) == {"vmapped", "twin", "torch"}
    assert set(training["times"]) == {"vmapped", "torch"}
    assert len(training["accuracy"]["vmapped"]) == len(training["accuracy"]["torch"]) == 4
    assert len(set(results["mlp"]["4"]["architectures"])) == 4
    assert 0 < evaluation["padded_fraction"] <= 1
