"""python -m jaxnas.search in table mode on the shipped NB201 table: every strategy, the stable CLI interface,
the cache, constraints on the table's metrics, and resume after a real SIGKILL."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxnas.search.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
TABLE = str(ROOT / "configs" / "nb201_table.yaml")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(tmp_path, name, *overrides):
    out = tmp_path / name
    assert main(["--config", TABLE, f"output={out}", "progress=false", *overrides]) == 0
    return out


@pytest.mark.parametrize("strategy", ["random", "evolution", "genetic", "nsga2", "local", "predictor", "progressive"])
def test_every_strategy_spends_exactly_its_query_budget_and_reports_its_pick(tmp_path, strategy):
    extra = ["objectives.objectives=[signal,report]"] if strategy == "nsga2" else []
    out = _run(tmp_path, strategy, f"search.strategy={strategy}", "search.budget=24", "search.population=6", *extra)
    summary = json.loads((out / "summary.json").read_text())
    history = _rows(out / "history.csv")
    evaluated = [r for r in history if r["status"] == "ok"]
    assert summary["queries"] == len(evaluated) == 24
    assert len({r["arch"] for r in evaluated}) == 24  # never twice
    assert summary["cache_hits"] == sum(r["status"] == "cached" for r in history)
    best = max(evaluated, key=lambda r: float(r["signal"]))
    if strategy != "nsga2":  # nsga2's best is by its first objective too
        assert summary["best_arch"] == best["arch"]
    assert summary["best_signal"] == float(best["signal"])
    assert summary["best_report"] == float(next(r["report"] for r in evaluated if r["arch"] == summary["best_arch"]))
    best_json = json.loads((out / "best.json").read_text())
    assert best_json["arch"] == summary["best_arch"]
    assert (out / "report.html").is_file() and (out / "fitness.png").is_file()


def test_table_interface_writes_the_summary_other_tools_read(tmp_path):
    out = tmp_path / "iface"
    cmd = [sys.executable, "-m", "jaxnas.search", "--config", TABLE, "table.path=nb201_analog",
           "table.signal=baseline_acc", "table.report=analog_drift_1d", "search.strategy=random",
           "search.budget=15", "seed=3", f"output={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"best_arch", "best_signal", "best_report", "queries"} <= set(summary)
    assert summary["queries"] == 15
    assert summary["best_arch"].startswith("|") and summary["best_arch"].count("~") == 6


def test_nsga2_pareto_front_is_non_dominated_and_agrees_with_history(tmp_path):
    out = _run(tmp_path, "front", "search.strategy=nsga2", "search.budget=30", "search.population=10",
               "objectives.objectives=[signal,report:min]")
    pareto = json.loads((out / "pareto.json").read_text())
    evaluated = [r for r in _rows(out / "history.csv") if r["status"] == "ok"]
    points = {(float(r["signal"]), float(r["report"])) for r in evaluated}
    front = {(p["values"]["signal"], p["values"]["report"]) for p in pareto["front"]}
    assert front and front <= points
    for s, r in front:  # nothing evaluated dominates a front member (signal max, report min)
        assert not any(s2 >= s and r2 <= r and (s2, r2) != (s, r) for s2, r2 in points)
    for s, r in points - front:  # and every other point is dominated by a front member
        assert any(s2 >= s and r2 <= r for s2, r2 in front)
    gens = _rows(out / "generations.csv")
    assert all(float(g["hypervolume"]) > 0 for g in gens)
    assert [float(g["hypervolume"]) for g in gens] == sorted(float(g["hypervolume"]) for g in gens)


def test_constraint_on_a_table_metric_keeps_infeasible_candidates_from_becoming_the_best(tmp_path):
    out = _run(tmp_path, "constrained", "search.strategy=random", "search.budget=30", "objectives.constraints=[report<=80]")
    history = _rows(out / "history.csv")
    assert any(r["status"] == "infeasible" for r in history)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_report"] <= 80
    feasible = [r for r in history if r["status"] == "ok"]
    assert all(float(r["report"]) <= 80 for r in feasible)
    assert summary["best_signal"] == max(float(r["signal"]) for r in feasible)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("search.strategy=annealing", "search.strategy"),
        ("search.budgett=3", "search.budgett"),
        ("search.population=0", "search.population"),
        ("objectives.constraints=[params<<3]", "params<<3"),
        ("objectives.objectives=[val_accuracy]", "val_accuracy"),
        ("table.signal=nope", "nope"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(tmp_path, capsys, override, named):
    assert main(["--config", TABLE, f"output={tmp_path / 'bad'}", override]) == 2
    assert named in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_is_refused_and_resume_of_a_missing_run_too(tmp_path, capsys):
    out = _run(tmp_path, "once", "search.budget=10")
    assert main(["--config", TABLE, f"output={out}", "search.budget=10", "progress=false"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def _outputs(out: Path) -> dict:
    return {name: (out / name).read_text() for name in ("history.csv", "generations.csv", "best.json", "pareto.json")}


def test_run_killed_with_sigkill_and_resumed_ends_exactly_as_the_run_left_alone(tmp_path):
    args = ["search.strategy=predictor", "search.budget=60", "search.population=5", "progress=false"]
    whole = _run(tmp_path, "whole", *args)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxnas.search", "--config", TABLE, f"output={killed}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "4").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 12, "the run finished before it was killed; kill it earlier"
    resumed = subprocess.run([sys.executable, "-m", "jaxnas.search", "--resume", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(killed) == _outputs(whole)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    args = ["search.strategy=evolution", "search.budget=30", "search.population=5", "progress=false"]
    whole = _run(tmp_path, "whole", *args)
    broken = _run(tmp_path, "broken", *args)
    latest = max((p for p in (broken / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for f in (latest / "archive").rglob("*"):
        if f.is_file():
            f.write_text("{ not json")
    with pytest.warns(UserWarning, match=f"checkpoint step {latest.name}"):
        assert main(["--resume", str(broken)]) == 0
    assert _outputs(broken) == _outputs(whole)


def test_choose_by_preference_and_by_knee_from_a_finished_run(tmp_path, capsys):
    out = _run(tmp_path, "choose", "search.strategy=nsga2", "search.budget=30", "search.population=10",
               "objectives.objectives=[signal,report:min]")
    capsys.readouterr()
    evaluated = [r for r in _rows(out / "history.csv") if r["status"] == "ok"]
    floor = sorted(float(r["signal"]) for r in evaluated)[len(evaluated) // 2]
    assert main(["--choose", str(out), "--minimise", "report", "--floor", f"signal={floor}"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    qualifying = [r for r in evaluated if float(r["signal"]) >= floor]
    assert float(chosen["report"]) == min(float(r["report"]) for r in qualifying)
    assert main(["--choose", str(out), "--knee"]) == 0
    knee = json.loads(capsys.readouterr().out)
    front = {m["arch"] for m in json.loads((out / "pareto.json").read_text())["front"]}
    assert knee["arch"] in front
    assert main(["--choose", str(out), "--minimise", "report", "--floor", "signal=101"]) == 1
    assert main(["--choose", str(out), "--floor", "signal"]) == 2


def test_help_config_lists_every_section_with_its_help(capsys):
    assert main(["--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("mode", "search.strategy", "search.budget", "objectives.constraints", "table.signal",
                "final.top_k", "space.stem_stride", "train.augment_shift"):
        assert key in text
