"""Successive halving (train.fidelity=successive_halving): rung schedule, promotion of each rung's best, cost, and a
mode-train run that uses it (history records the epochs each candidate reached; resume replays it exactly)."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

from jaxnas.search.__main__ import main
from jaxnas.search.halving import rungs, successive_halving

ROOT = Path(__file__).resolve().parents[1]


def test_rungs():
    assert rungs(4) == (1, 2, 4)
    assert rungs(5) == (1, 2, 4, 5)
    assert rungs(9, eta=3) == (1, 3, 9)
    assert rungs(1) == (1,)
    assert rungs(6, eta=2, min_epochs=2) == (2, 4, 6)
    with pytest.raises(ValueError, match="eta >= 2"):
        rungs(4, eta=1)


def _fake(quality, calls):
    """A fake trainer: a candidate's score grows with epochs towards its quality (better ones stay better)."""
    def train(indices, epochs):
        calls.append((epochs, tuple(indices)))
        return [(quality[i] * (1 - 0.5 ** epochs), {"i": i, "epochs": epochs}) for i in indices]
    return train


def test_promoted_candidates_are_the_best_of_their_rung():
    quality = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8, 0.6, 0.2]
    calls = []
    out = successive_halving(8, _fake(quality, calls), max_epochs=4, eta=2)
    assert [e for e, _ in calls] == [1, 2, 4]
    assert calls[0][1] == tuple(range(8))
    assert set(calls[1][1]) == {1, 5, 3, 6}  # the best half of rung 0
    assert set(calls[2][1]) == {1, 5}        # the best half of rung 1
    assert out.epochs == (1, 4, 1, 2, 1, 4, 2, 1)
    for i in range(8):
        assert out.scores[i] == pytest.approx(quality[i] * (1 - 0.5 ** out.epochs[i]))
        assert out.rows[i] == {"i": i, "epochs": out.epochs[i]}
    # the budget: 8 x 1 + 4 x 2 + 2 x 4 candidate-epochs instead of 8 x 4
    assert out.cost == 24 < 8 * 4


def test_failed_candidates_are_never_promoted_and_odd_sizes_round_up():
    quality = [0.5, math.nan, 0.4, 0.9, 0.1]
    calls = []
    out = successive_halving(5, _fake(quality, calls), max_epochs=2, eta=2)
    assert set(calls[1][1]) == {3, 0, 2}  # ceil(5 / 2) = 3, the NaN never
    assert math.isnan(out.scores[1]) and out.epochs[1] == 1


TINY = [
    "data.name=digits", "mode=train", "space.families=[mlp]", "space.max_stages=1", "space.max_depth=1",
    "space.units=[8,16,32]", "space.activations=[relu,gelu]", "space.dropouts=[0.0]", "search.population=4",
    "search.budget=8", "train.epochs=4", "train.fidelity=successive_halving", "final.top_k=0", "progress=false",
]


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_run_with_successive_halving_records_the_rungs(tmp_path):
    out = tmp_path / "run"
    assert main([f"output={out}", *TINY]) == 0
    rows = [r for r in _history(out) if r["status"] in ("ok", "early_stopped")]
    assert len(rows) == 8
    for g in ("0", "1"):
        gen = [r for r in rows if r["generation"] == g]
        epochs = sorted(int(r["epochs"]) for r in gen)
        assert epochs == [1, 1, 2, 4], epochs  # 4 candidates: 2 stop at rung 1, 1 at rung 2, 1 reaches 4
        top = max(gen, key=lambda r: int(r["epochs"]))
        survivors = [r for r in gen if int(r["epochs"]) >= 2]
        assert top in survivors


def test_successive_halving_resumes_after_sigkill_to_the_same_history(tmp_path):
    args = [*TINY, "search.budget=12"]
    whole = tmp_path / "whole"
    assert main([f"output={whole}", *args]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxnas.search", f"output={killed}", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "1").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 3, "the run finished before it was killed; kill it earlier"
    assert main(["--resume", str(killed)]) == 0
    for name in ("history.csv", "generations.csv", "best.json"):
        assert (killed / name).read_text() == (whole / name).read_text(), name
