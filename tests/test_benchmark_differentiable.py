"""benchmarks/differentiable.py runs end to end with --quick on both spaces (one strategy, to keep it to two compiled
programs) and its JSON holds the comparison's numbers, consistent with each other."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("space", ["nb201", "macro"])
def test_differentiable_benchmark_quick_writes_the_comparison_as_json(tmp_path, space):
    out_json = tmp_path / "differentiable.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "differentiable.py"), "--quick", "--strategies", "darts",
         "--space", space, "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert {"config", "seeds", "retrain_seeds", "retrain_seconds", "strategies", "random", "evolution"} <= set(result)
    assert list(result["strategies"]) == ["darts"] and result["evolution"] is None  # --quick leaves evolution out
    darts = result["strategies"]["darts"]
    assert {"runs", "search_seconds_mean", "test_accuracy_mean", "test_accuracy_std", "n", "macs_mean"} <= set(darts)
    (run,) = darts["runs"]
    assert {"seed", "arch", "search_seconds", "param_free_share", "alpha_entropy", "epochs",
            "test_accuracy"} <= set(run)
    assert result["space"] == space and run["search_seconds"] > 0
    if space == "nb201":
        assert run["arch"].count("~") == 6 and 0 <= run["param_free_share"] <= 1
    else:
        assert run["arch"].split("|")[0] in {"cnn", "resnet", "mobilenet"} and run["param_free_share"] is None
    assert darts["test_accuracy_mean"] == pytest.approx(np.mean(run["test_accuracy"]))
    assert darts["macs_mean"] > 0 and result["random"]["macs_mean"] > 0
    random = result["random"]
    assert len(random["archs"]) == 2 and random["n"] == 2
    assert random["best_by_validation"]["arch"] in {a["arch"] for a in random["archs"]}
    assert all(0 <= t <= 1 for a in random["archs"] for t in a["test_accuracy"])
    assert "random, best by val." in done.stdout and "darts" in done.stdout


def test_differentiable_benchmark_refuses_an_unknown_strategy():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "differentiable.py"), "--strategies", "enas"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--strategies takes darts, pc_darts, gdas (got enas)" in done.stderr
