"""Choosing an architecture after a search, from its run folder: by preference or by trade-off.

    python -m jaxnas.search --choose runs/x --minimise params --floor val_accuracy=0.97   # preference
    python -m jaxnas.search --choose runs/x --knee                                        # trade-off

Candidates are the evaluated rows of ``history.csv`` (status ok / early_stopped); objective names and
directions come from ``pareto.json``. Preference: among rows meeting every floor (at least the bound for a max
objective, at most it for a min one), the best on ``minimise``. Trade-off: the knee of the Pareto front.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from jaxnas.search.pareto import Objective, choose_by_preference, knee_point, pareto_mask
from jaxnas.status import EVALUATED


def _candidates(run_dir: Path) -> tuple[list[dict], tuple[Objective, ...]]:
    pareto_file, history_file = run_dir / "pareto.json", run_dir / "history.csv"
    if not pareto_file.is_file() or not history_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished search (expected pareto.json and history.csv there)")
    objectives = tuple(Objective(o["name"], o["direction"]) for o in json.loads(pareto_file.read_text())["objectives"])
    with open(history_file, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] in EVALUATED]
    return rows, objectives


def _values(rows: list[dict], objectives) -> np.ndarray:
    return np.asarray([[float(r[o.name]) if r.get(o.name) else math.nan for o in objectives] for r in rows], float)


def choose(run_dir: str | Path, *, minimise: str | None = None, floor: dict[str, float] | None = None,
           knee: bool = False) -> dict | None:
    """The chosen row of ``history.csv`` (a dict of its columns), or None when no candidate meets the floors."""
    rows, objectives = _candidates(Path(run_dir))
    names = [o.name for o in objectives]
    if not rows:
        return None
    values = _values(rows, objectives)
    if knee:
        if len(objectives) < 2:
            raise ValueError(f"--knee needs a run with two or more objectives; this one has {names}")
        on_front = np.flatnonzero(pareto_mask(values, objectives))
        return rows[int(on_front[knee_point(values[on_front], objectives)])]
    if minimise is None:
        raise ValueError("say how to choose: --minimise <objective> [--floor name=value ...], or --knee")
    index = choose_by_preference(values, objectives, minimise, floor or {})
    return None if index is None else rows[index]
