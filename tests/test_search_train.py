"""python -m jaxnas.search in modes train and oneshot on the 8x8 digits: the run folder, the final retraining on
test, the exported model, constraints on cheap objectives, and agreement of history / best / pareto."""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxnas import load_model
from jaxnas.data import load_dataset
from jaxnas.search.__main__ import main

# A tiny macro space over both kinds of family, so a run compiles in seconds.
TINY = [
    "data.name=digits",
    "space.families=[mlp,cnn]",
    "space.max_stages=2",
    "space.max_depth=1",
    "space.channels=[4,8]",
    "space.units=[16,32]",
    "space.kernels=[3]",
    "space.activations=[relu,gelu]",
    "space.dropouts=[0.0]",
    "search.population=4",
    "search.budget=8",
    "train.epochs=2",
    "train.batch_size=64",
    "train.learning_rate=0.01",
    "supernet.epochs=2",
    "supernet.subnets=2",
    "final.top_k=2",
    "final.epochs=3",
    "final.seeds=1",  # seeds, baselines and the control sample: tests/test_search_fidelity.py
    "final.control=0",
    "final.baselines=[]",
    "progress=false",
]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=["train", "oneshot"])
def finished(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert main([f"output={out}", f"mode={request.param}", "search.strategy=evolution", *TINY]) == 0
    return request.param, out


def test_run_folder_holds_every_output(finished):
    _, out = finished
    for name in ("config.yaml", "history.csv", "generations.csv", "best.json", "pareto.json", "summary.json",
                 "report.html", "fitness.png", "model/arch.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints").is_dir()


def test_history_best_and_pareto_agree(finished):
    mode, out = finished
    history = _rows(out / "history.csv")
    evaluated = [r for r in history if r["status"] in ("ok", "early_stopped")]
    assert len({r["arch"] for r in evaluated}) == len(evaluated) == 8
    best = json.loads((out / "best.json").read_text())
    top = max(evaluated, key=lambda r: float(r["fitness"]))
    assert best["arch"] == top["arch"] and best["fitness"] == pytest.approx(float(top["val_accuracy"]))
    for r in evaluated:  # analytic metrics are recorded for every candidate
        assert float(r["params"]) > 0 and float(r["macs"]) > 0 and 0 <= float(r["val_accuracy"]) <= 1
    pareto = json.loads((out / "pareto.json").read_text())
    assert [o["name"] for o in pareto["objectives"]] == ["val_accuracy", "params"]
    archs = {r["arch"]: r for r in evaluated}
    for member in pareto["front"]:
        row = archs[member["arch"]]
        assert member["values"]["val_accuracy"] == pytest.approx(float(row["val_accuracy"]))
        assert member["values"]["params"] == pytest.approx(float(row["params"]))
    # the most accurate evaluated candidate is always on the front
    assert top["arch"] in {m["arch"] for m in pareto["front"]}


def test_final_retraining_scores_the_top_k_on_test_and_learns(finished):
    _, out = finished
    final = json.loads((out / "best.json").read_text())["final"]
    assert len(final["retrained"]) == 2
    assert final["test_accuracy"] > 0.5  # 10 classes: far above chance after 3 epochs on the digits
    confusion = np.asarray(final["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 359
    assert np.trace(confusion) / confusion.sum() == pytest.approx(final["test_accuracy"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == final["test_accuracy"] and summary["best_arch"] == final["arch"]


def test_loaded_best_model_reproduces_its_recorded_test_accuracy(finished):
    _, out = finished
    model = load_model(out)
    final = json.loads((out / "best.json").read_text())["final"]
    assert model.arch == final["arch"]
    test = load_dataset("digits").test
    accuracy = float((model.predict(test.images) == test.labels).mean())
    assert accuracy == pytest.approx(final["test_accuracy"], abs=1e-6)


def test_params_constraint_is_checked_before_training_and_holds_for_every_evaluated_candidate(tmp_path):
    out = tmp_path / "constrained"
    overrides = [o for o in TINY if not o.startswith(("final.", "train.epochs"))]
    overrides += ["train.epochs=1", "final.top_k=0", "objectives.constraints=[params<=1500]"]
    assert main([f"output={out}", "mode=train", "search.strategy=random", *overrides]) == 0
    history = _rows(out / "history.csv")
    assert any(r["status"] == "infeasible" for r in history)
    for r in history:
        if r["status"] == "infeasible":
            assert float(r["params"]) > 1500 and r["val_accuracy"] == ""  # never trained
        elif r["status"] == "ok":
            assert float(r["params"]) <= 1500
    best = json.loads((out / "best.json").read_text())
    assert next(float(r["params"]) for r in history if r["arch"] == best["arch"]) <= 1500


def test_transformer_space_searches_on_image_patches_and_exports_a_loadable_twin(tmp_path):
    out = tmp_path / "vit"
    overrides = ["data.name=digits", "space.name=transformer", "space.max_layers=1", "space.hidden=[8,16]",
                 "space.heads=[1,2]", "space.ffn_mults=[1]", "space.transformer_activations=[gelu]",
                 "space.positions=[learned,rope]", "space.patch=4", "search.strategy=random", "search.population=2",
                 "search.budget=4", "train.epochs=1", "final.top_k=1", "final.epochs=1", "final.seeds=1",
                 "final.control=0", "final.baselines=[]", "progress=false"]
    assert main([f"output={out}", "mode=train", *overrides]) == 0
    final = json.loads((out / "best.json").read_text())["final"]
    model = load_model(out)
    test = load_dataset("digits").test
    assert float((model.predict(test.images) == test.labels).mean()) == pytest.approx(final["test_accuracy"], abs=1e-6)


def test_nb201_cells_search_one_shot_on_images_and_export_a_loadable_twin(tmp_path):
    out = tmp_path / "cells"
    overrides = ["data.name=digits", "space.name=nb201", "space.cell_channels=4", "space.cells=1",
                 "search.strategy=random", "search.population=4", "search.budget=4", "supernet.epochs=1",
                 "supernet.subnets=2", "final.top_k=1", "final.epochs=1", "final.seeds=1",
                 "final.control=0", "final.baselines=[]", "progress=false"]
    assert main([f"output={out}", "mode=oneshot", *overrides]) == 0
    final = json.loads((out / "best.json").read_text())["final"]
    assert final["arch"].startswith("|") and final["arch"].count("~") == 6
    model = load_model(out)
    test = load_dataset("digits").test
    assert float((model.predict(test.images) == test.labels).mean()) == pytest.approx(final["test_accuracy"], abs=1e-6)


def test_latency_objective_is_measured_on_the_twin_and_its_constraint_filters_before_training(tmp_path):
    out = tmp_path / "latency"
    overrides = [o for o in TINY if not o.startswith(("final.", "search.budget", "train.epochs"))]
    overrides += ["train.epochs=1", "final.top_k=0", "search.budget=4",
                  "objectives.objectives=[val_accuracy,latency_ms:min]", "objectives.constraints=[latency_ms<=10000]",
                  "objectives.latency_repeats=3"]
    assert main([f"output={out}", "mode=train", "search.strategy=nsga2", *overrides]) == 0
    history = [r for r in _rows(out / "history.csv") if r["status"] == "ok"]
    assert history and all(0 < float(r["latency_ms"]) < 10000 for r in history)
    pareto = json.loads((out / "pareto.json").read_text())
    assert [o["name"] for o in pareto["objectives"]] == ["val_accuracy", "latency_ms"]
    strict = tmp_path / "strict"
    assert main([f"output={strict}", "mode=train", "search.strategy=random", *overrides[:-2],
                 "objectives.objectives=[val_accuracy]", "objectives.constraints=[latency_ms<=0.000001]",
                 "objectives.latency_repeats=3", "search.generations=1"]) == 0
    rows = _rows(strict / "history.csv")
    assert rows and all(r["status"] == "infeasible" and r["val_accuracy"] == "" for r in rows)


def test_oneshot_scores_sized_and_masked_alike(tmp_path):
    """population.backend=sized (each candidate at its own sizes) and masked (one masked program) give one search."""
    overrides = [o for o in TINY if not o.startswith(("final.", "search.budget", "supernet.epochs"))]
    overrides += ["final.top_k=0", "search.budget=4", "supernet.epochs=1"]
    histories = {}
    for backend in ("sized", "masked"):
        out = tmp_path / backend
        assert main([f"output={out}", "mode=oneshot", f"population.backend={backend}", *overrides]) == 0
        histories[backend] = _rows(out / "history.csv")
    exact, vmapped = histories["sized"], histories["masked"]
    assert [r["arch"] for r in exact] == [r["arch"] for r in vmapped] and len(exact) == 4
    for a, b in zip(exact, vmapped):
        assert float(a["val_accuracy"]) == pytest.approx(float(b["val_accuracy"]), abs=1e-6)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)


def test_search_trains_sized_and_masked_alike(tmp_path):
    """population.backend=sized (each candidate at its own sizes) and masked (one masked program) train the same
    networks, MLPs and CNNs alike."""
    overrides = [o for o in TINY if not o.startswith(("search.budget", "final."))]
    overrides += ["search.strategy=random", "search.budget=4", "final.top_k=1", "final.epochs=1", "final.seeds=1",
                  "final.control=0", "final.baselines=[]"]
    runs = {}
    for backend in ("sized", "masked"):
        out = tmp_path / backend
        assert main([f"output={out}", "mode=train", f"population.backend={backend}", *overrides]) == 0
        runs[backend] = (_rows(out / "history.csv"), json.loads((out / "best.json").read_text()))
    (exact, best_exact), (vmapped, best_vmapped) = runs["sized"], runs["masked"]
    assert [r["arch"] for r in exact] == [r["arch"] for r in vmapped] and len(exact) == 4
    assert {r["arch"].split("|")[0] for r in exact} == {"mlp", "cnn"}  # both kinds of family were trained
    # Adam turns float-rounding differences of near-zero gradients into different first steps: close, not equal.
    for a, b in zip(exact, vmapped):
        assert a["status"] == b["status"] == "ok"
        assert float(a["val_accuracy"]) == pytest.approx(float(b["val_accuracy"]), abs=0.05)
    assert abs(best_exact["fitness"] - best_vmapped["fitness"]) <= 0.05


def test_the_sized_backend_outside_the_macro_and_lm_spaces_is_refused(tmp_path, capsys):
    assert main([f"output={tmp_path / 'r'}", "mode=train", "population.backend=sized", "space.name=nb201",
                 *TINY[:1]]) == 2
    assert "population.backend=sized computes macro-space and language-model candidates" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sized_training_trains_only_the_real_candidates_of_a_short_generation(monkeypatch):
    """A generation with fewer new candidates than search.population: the masked program pads it (one compiled
    program for every generation); exact training, which compiles per population anyway, trains only the real
    ones, with the same results for them (each candidate's keys do not depend on the population size)."""
    from interop.config import load_config
    from jaxnas.config import RunConfig
    from jaxnas.search import evaluate
    from jaxnas.search.models import build_space, model_for

    cfg = load_config(RunConfig, None, [*TINY, "mode=train", "population.backend=sized", "train.epochs=1"])
    dataset = load_dataset(cfg.data)
    space = build_space(cfg.space)
    model = model_for(space, cfg.space, dataset.info.image_shape, dataset.info.num_classes)
    evaluator = evaluate.TrainEvaluator(cfg, model, dataset)
    encs = np.asarray(space.sample(jax.random.key(2), 3), np.int32)
    trained = []
    real = evaluator.train_candidates
    monkeypatch.setattr(evaluator, "train_candidates", lambda e, *a, **k: trained.append(len(e)) or real(e, *a, **k))
    short = evaluator.evaluate(encs[:3], generation=1)
    full = evaluator.evaluate(evaluate._padded(encs[:3], cfg.search.population), generation=1)
    assert trained == [3, 4] and len(short) == 3
    for a, b in zip(short, full[:3]):
        assert a["status"] == b["status"] == "ok"
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
