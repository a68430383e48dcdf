"""benchmarks/ranking.py runs end to end with --quick: the stand-alone reference is trained once and then read
from its cache, and the JSON holds rank correlations that agree with its own per-architecture numbers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnas.search import fidelity

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, name):
    out_json = tmp_path / f"{name}.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ranking.py"), "--quick", "--cache", str(tmp_path / "cache.json"),
         "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads(out_json.read_text())


def test_ranking_benchmark_quick_reports_correlations_and_reuses_its_reference(tmp_path):
    first, result = _run(tmp_path, "first")
    assert "trained 7 architectures x 2 seeds stand-alone" in first
    test = np.asarray(result["standalone_test"])
    assert test.shape == (2, 7) and np.all((0 <= test) & (test <= 1))
    rows = result["correlations"]
    shot = rows["one-shot (supernet seed 0)"]
    assert len(shot["scores"]) == 7
    expected = fidelity.rank_correlation(shot["scores"], test.mean(0))
    assert shot["kendall_tau"] == pytest.approx(expected["kendall_tau"], nan_ok=True)
    assert rows["stand-alone seed 1 vs seed 2"]["kendall_tau"] == pytest.approx(
        fidelity.rank_correlation(test[0], test[1])["kendall_tau"], nan_ok=True)
    for name in ("grad_norm", "snip"):
        row = rows[f"zero-cost {name} (at init)"]
        assert len(row["scores"]) == 7 and all(v > 0 for v in row["scores"])
        assert row["kendall_tau"] == pytest.approx(fidelity.rank_correlation(row["scores"], test.mean(0))["kendall_tau"])
    for name in ("params", "macs", "one-shot (supernet seed 0)", "zero-cost snip (at init)"):
        assert rows[name]["top_quarter_recall"] == fidelity.top_recall(rows[name]["scores"], test.mean(0), 0.5, 0.25)
    assert result["archs"][-1].count("|s") == 2  # the largest of the 2-stage space comes last
    again, second = _run(tmp_path, "second")
    assert "from " in again and "trained 7" not in again
    assert second["standalone_test"] == result["standalone_test"]
