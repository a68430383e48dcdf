"""benchmarks/population.py runs end to end with --quick (MLP and CNN, P = 4) and its --json output holds every arm,
every ratio and equal accuracies across arms (never a timing's value: only that each is a finite positive time)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mlp", "cnn")
P = "4"
EVALUATION_ARMS = {"masked", "sized", "twin", "torch"}
TRAINING_ARMS = {"masked", "sized", "torch"}
EVALUATION_RATIOS = (
    "masked (steady) vs per-arch compile",
    "masked (first call) vs per-arch compile",
    "masked (steady) vs PyTorch eager",
    "masked (first call) vs PyTorch eager",
    "sized (steady) vs masked (steady)",
    "sized (steady) vs per-arch compile",
    "sized (first call) vs per-arch compile",
    "sized (new population) vs per-arch compile",
    "sized (steady) vs PyTorch eager",
)
TRAINING_RATIOS = (
    "masked (steady) vs PyTorch sequential",
    "masked (first call) vs PyTorch sequential",
    "sized (steady) vs PyTorch sequential",
    "sized (first call) vs PyTorch sequential",
    "sized (steady) vs masked (steady)",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(stdout, parsed JSON) of one ``--quick --json`` run."""
    out_json = tmp_path_factory.mktemp("population") / "population.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "population.py"), "--quick", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads(out_json.read_text())


def positive_time(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def assert_times(times: dict, arms: set[str]) -> None:
    assert set(times) == arms
    for arm, s in times.items():
        assert s["n"] == 1, arm  # --quick: one repeat, so no CI
        assert s["ci95"] is None, arm
        for stat in ("median", "min", "mean"):
            assert positive_time(s[stat]), (arm, stat, s[stat])


def assert_ratios(ratios: dict, names: tuple[str, ...]) -> None:
    assert tuple(ratios) == names
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios


def test_population_benchmark_quick_json_has_every_arm_ratio_and_equal_accuracies(quick_run):
    _, results = quick_run
    assert results["args"]["quick"] and results["args"]["populations"] == [4]
    assert {"jax", "torch"} == set(results["machine"]["matmul_peak_flops"])
    assert all(v > 0 for v in results["machine"]["matmul_peak_flops"].values())
    for family in FAMILIES:
        run = results[family][P]
        assert len(set(run["architectures"])) == 4, family
        evaluation, training = run["evaluation"], run["training"]

        # (a) evaluation: every arm timed, its first calls too, every ratio computed.
        assert_times(evaluation["times"], EVALUATION_ARMS)
        for key in ("masked_first_call_s", "sized_first_call_s", "sized_new_population_s"):
            assert positive_time(evaluation[key]), (family, key)
        assert_ratios(evaluation["ratios"], EVALUATION_RATIOS)
        assert 0 < evaluation["padded_fraction"] <= 1
        assert set(evaluation["useful_flops_per_s"]) == EVALUATION_ARMS | {"masked_first_call", "sized_first_call"}
        # All arms score the same networks with the same weights (and, for the CNN, the same BatchNorm statistics,
        # each arm recalibrating its own): equal accuracies, candidate by candidate.
        accuracy = evaluation["accuracy"]
        assert set(accuracy) == EVALUATION_ARMS
        for arm in EVALUATION_ARMS:
            assert len(accuracy[arm]) == 4
            assert accuracy[arm] == pytest.approx(accuracy["masked"], abs=1e-6), (family, arm)
            assert evaluation["accuracy_mean"][arm] == pytest.approx(evaluation["accuracy_mean"]["masked"], abs=1e-6)
        assert evaluation["accuracy_max_abs_diff"] <= 1e-6

        # (b) training: every arm timed (the sized backend supports both families), every ratio computed.
        assert_times(training["times"], TRAINING_ARMS)
        for key in ("masked_first_call_s", "sized_first_call_s"):
            assert positive_time(training[key]), (family, key)
        assert_ratios(training["ratios"], TRAINING_RATIOS)
        assert set(training["accuracy"]) == TRAINING_ARMS
        assert all(len(acc) == 4 for acc in training["accuracy"].values())
        # masked and sized train the same networks on the same batches; torch's dropout masks differ.
        assert np.abs(np.subtract(training["accuracy"]["sized"], training["accuracy"]["masked"])).max() <= 0.1, family
    cnn = results["cnn"][P]
    assert all(a.startswith("cnn|") for a in cnn["architectures"])
    assert cnn["evaluation"]["torch_vs_twin_max_logit_diff"] <= 1e-4
    assert cnn["evaluation"]["bn_recalibration_examples"] == 256
    assert results["mlp"][P]["evaluation"]["bn_recalibration_examples"] == 0
    assert "stem stride 2" in results["cnn"]["space"] and "channels (4, 8), kernels (1, 3)" in results["cnn"]["space"]


def test_population_benchmark_quick_prints_each_family_and_ratio(quick_run):
    text, results = quick_run
    mlp, cnn = text.split("=== MLP family, P = 4 ===")[1].split("=== CNN family, P = 4 ===")
    for family, section in (("mlp", mlp), ("cnn", cnn)):
        run = results[family][P]
        for name in (*run["evaluation"]["ratios"], *run["training"]["ratios"]):
            assert re.search(rf"^  ratio {re.escape(name)}: [0-9.]+x$", section, flags=re.M), (family, name)
