"""benchmarks/adaptive.py runs end to end with --quick (a tiny winner and a tiny largest network on digits, one
budget pair: widths timed, fine-tuning, calibration, pipelined arms, early exits) and its JSON holds both reports
with every arm."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adaptive_benchmark_quick_reports_both_networks(tmp_path):
    out = tmp_path / "adaptive.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptive.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["bl_grid"] == [0.5] and report["settings"]["repeats"] == 5
    assert report["largest"]["arch"].startswith("cnn|s1:d2,w8") and report["winner"]["arch"].startswith("cnn|")
    for name in ("winner", "largest"):
        r = report[name]
        assert 0 <= r["base"]["accuracy"] <= 100 and r["test_images"] > 0
        (row,) = r["grid"]
        assert (row["bl"], row["Bg"]) == (0.5, 0.5)
        assert r["latency_ms"][0]["widths"] == list(r["gates"].values()) and len(r["latency_ms"]) > 1
        if any(entry["fast"] for entry in r["latency_ms"]):  # the fast widths were fine-tuned for
            assert r["finetune"]["epochs"] == 2 and r["finetune"]["used"] in (True, False)
        else:
            assert r["finetune"] is None
        assert set(row["arms"]) == {"static", "current", "experience"}
        assert set(row["timing"]["arms"]) == {"base", "static", "current", "experience"}
        assert r["early_exit"] is not None
    assert "== winner" in done.stdout and "== largest" in done.stdout


def test_adaptive_benchmark_on_an_unprepared_dataset_fails_at_once_saying_how_to_prepare_it(tmp_path):
    """--config picks the dataset (here CIFAR-10 through tfds, not prepared in an empty TFDS_DATA_DIR)."""
    import os

    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptive.py"), "--config",
                           str(ROOT / "configs" / "cifar10.yaml"), "--winner", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cifar10" in done.stderr and "not prepared" in done.stderr and "Traceback" not in done.stderr
