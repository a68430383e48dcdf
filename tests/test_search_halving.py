"""Successive halving and Hyperband (train.fidelity=successive_halving | hyperband): rung schedule, promotion of each
rung's best, brackets, cost, and mode-train runs that use them (history records the epochs each candidate reached;
resume replays it exactly)."""

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
from jaxnas.search.halving import brackets, hyperband, rungs, successive_halving

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


def test_a_lone_survivor_is_trained_at_full_fidelity():
    calls = []
    out = successive_halving(3, _fake([0.2, 0.9, 0.5], calls), max_epochs=8, eta=2)
    assert calls == [(1, (0, 1, 2)), (2, (1, 2)), (8, (1,))]  # 3 -> 2 -> 1: rung 4 skipped
    assert out.epochs == (1, 8, 2)
    calls.clear()
    assert successive_halving(1, _fake([0.4], calls), max_epochs=8).epochs == (8,) and calls == [(8, (0,))]


def test_brackets_follow_hyperbands_allocation():
    # s_max = 3 for rungs (1, 2, 4, 8): n_s = ceil(4 / (s + 1) * 2**s) = 8, 6, 4, 4 (sum 22), shared by largest remainder
    assert brackets(22, 8) == [(1, 8), (2, 6), (4, 4), (8, 4)]
    assert brackets(8, 8) == [(1, 3), (2, 2), (4, 2), (8, 1)]
    assert brackets(3, 8) == [(1, 1), (2, 1), (4, 1)]   # brackets without candidates are dropped
    assert brackets(5, 1) == [(1, 5)]                    # one rung: one bracket, plain training
    assert sum(c for _, c in brackets(37, 9, eta=3)) == 37


def test_hyperband_runs_successive_halving_in_each_bracket():
    quality = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8, 0.6, 0.2]
    calls = []
    out = hyperband(8, _fake(quality, calls), max_epochs=8, eta=2)
    # brackets [(1, 3), (2, 2), (4, 2), (8, 1)] over the blocks 0-2, 3-4, 5-6, 7
    assert calls == [(1, (0, 1, 2)), (2, (1, 2)), (8, (1,)),   # a lone survivor goes straight to the last rung
                     (2, (3, 4)), (8, (3,)),
                     (4, (5, 6)), (8, (5,)),
                     (8, (7,))]
    assert out.epochs == (1, 8, 2, 8, 2, 8, 4, 8)
    for i in range(8):
        assert out.scores[i] == pytest.approx(quality[i] * (1 - 0.5 ** out.epochs[i]))
    assert out.cost == sum(e * len(alive) for e, alive in calls) == 3 + 4 + 8 + 4 + 8 + 8 + 8 + 8
    assert out.rounds == tuple(calls)


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


def test_train_run_with_hyperband(tmp_path):
    out = tmp_path / "run"
    assert main([f"output={out}", *TINY, "train.fidelity=hyperband", "search.budget=4"]) == 0
    rows = [r for r in _history(out) if r["status"] in ("ok", "early_stopped")]
    # 4 candidates, rungs (1, 2, 4): brackets [(1, 2), (2, 1), (4, 1)] -> epochs reached 1, 4, 4, 4
    assert sorted(int(r["epochs"]) for r in rows) == [1, 4, 4, 4]


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
