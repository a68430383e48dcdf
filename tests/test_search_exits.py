"""avg_macs: early exits as a search objective (`jaxnas.adaptive.exits.fit_exits` on every scored candidate), and
the final winner's exits read on test."""

import csv
import json

import numpy as np
import pytest

from jaxnas.adaptive.exits import fit_exits
from jaxnas.adaptive.gated import GatedNet
from jaxnas.config import RunConfig
from jaxnas.search.__main__ import main
from interop.config import load_config
from test_adaptive import ARCHS, _twin
from test_search_train import TINY


@pytest.fixture(scope="module")
def digits():
    from jaxnas.data import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_fitted_exits_run_only_the_heads_they_use_and_never_cost_more_than_the_twin(digits, family):
    twin = _twin(family, digits.train.images)
    validation = (digits.validation.images, digits.validation.labels)
    fitted = fit_exits(twin, (digits.train.images, digits.train.labels), validation, epochs=3, grid=2,
                       max_drop=0.5, z=0.0)
    gated = GatedNet(twin)
    full = gated.macs(gated.full, digits.train.images.shape[1:])
    v = fitted.validation
    assert v["holds"] and v["accuracy_drop"] <= 0.5
    assert v["avg_macs"] <= full
    assert sum(v["exit_rates"]) == pytest.approx(1.0)
    assert v["avg_macs"] == pytest.approx(float(np.dot(v["exit_rates"], fitted.segment_macs)))
    classes = twin.head.out_features
    used = [int(h["w"].shape[0]) * classes for h, t in zip(fitted.net.heads, fitted.net.thresholds) if t != np.inf]
    assert fitted.segment_macs[-1] == full + sum(used)  # an image reaching the twin's head ran every used head
    # The random twins' own heads are near chance, so heads trained on their features win: images leave early.
    assert v["avg_macs"] < full and v["exit_rates"][-1] < 1


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_minimising_avg_macs_fits_exits_to_every_candidate_and_tests_the_winners(tmp_path):
    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("search.budget", "final."))]
    overrides += ["mode=train", "search.strategy=nsga2", "search.budget=4", "train.epochs=1",
                  "objectives.objectives=[val_accuracy,avg_macs:min]", "objectives.constraints=[avg_macs<=1e9]",
                  "objectives.exit_epochs=2", "objectives.exit_train_images=256", "final.top_k=1",
                  "final.epochs=1", "final.seeds=1", "final.control=0", "final.baselines=[]"]
    assert main([f"output={out}", *overrides]) == 0
    rows = [r for r in _rows(out / "history.csv") if r["status"] == "ok"]
    assert rows and all("avg_macs" in r for r in rows)
    for r in rows:
        macs, avg = float(r["macs"]), float(r["avg_macs"])
        if r["arch"].startswith("mlp"):
            assert avg == macs  # nowhere to exit
        else:
            assert 0 < avg <= macs
    pareto = json.loads((out / "pareto.json").read_text())
    assert [o["name"] for o in pareto["objectives"]] == ["val_accuracy", "avg_macs"]
    final = json.loads((out / "best.json").read_text())["final"]
    exits = final["early_exits"]
    assert 0 < exits["avg_macs"] <= final["macs"] and exits["macs_saved_fraction"] == pytest.approx(
        1 - exits["avg_macs"] / final["macs"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_exits"]["avg_macs"] == exits["avg_macs"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["space.name=nb201", "mode=oneshot"], "avg_macs (MACs per image with early exits) is measured for the macro"),
        (["mode=differentiable", "search.strategy=darts", "space.families=[cnn]"], "got space.name=macro, mode=differentiable"),
        (["objectives.exit_max_drop=-1"], "objectives.exit_max_drop"),
    ],
)
def test_avg_macs_where_it_cannot_be_measured_is_refused_saying_where_it_can(overrides, says):
    with pytest.raises(ValueError) as error:
        load_config(RunConfig, None, ["objectives.objectives=[val_accuracy,avg_macs:min]", *overrides])
    assert says in str(error.value)
