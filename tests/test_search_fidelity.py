"""Ranking fidelity and baselines: the helpers against hand-computed values, and a one-shot run that writes the
control sample's rank correlation and the baselines (retrained over two seeds) to summary.json and report.html."""

import json

import jax
import numpy as np
import pytest

from jaxnas.config import SpaceConfig
from jaxnas.search import fidelity
from jaxnas.search.__main__ import main
from jaxnas.search.evaluate import Ends
from jaxnas.search.models import build_space, model_for


def test_rank_correlation_matches_hand_counts():
    # pairs: (1,2) c, (1,3) c, (1,4) c, (2,3) d, (2,4) c, (3,4) c -> tau = (5 - 1) / 6
    out = fidelity.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4])
    assert out["kendall_tau"] == pytest.approx(4 / 6) and out["n"] == 4
    # Spearman: d = (0, -1, 1, 0), rho = 1 - 6 * 2 / (4 * 15)
    assert out["spearman"] == pytest.approx(1 - 12 / 60)
    assert fidelity.rank_correlation([1, 2, 3], [3, 2, 1])["kendall_tau"] == pytest.approx(-1.0)


def test_rank_correlation_drops_non_finite_pairs_and_refuses_too_few():
    out = fidelity.rank_correlation([1, 2, np.nan, 3, 4], [1, 2, 5, 3, np.inf])
    assert out["n"] == 3 and out["kendall_tau"] == pytest.approx(1.0)
    assert np.isnan(fidelity.rank_correlation([1, 2], [2, 1])["kendall_tau"])
    assert np.isnan(fidelity.rank_correlation([1, 1, 1], [1, 2, 3])["spearman"])
    with pytest.raises(ValueError, match="one length"):
        fidelity.rank_correlation([1, 2, 3], [1, 2])


def test_top_recall_counts_the_reference_best_kept_by_the_score():
    ref = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]         # top quarter: indices 0 and 1
    assert fidelity.top_recall([8, 7, 6, 5, 4, 3, 2, 1], ref) == 1.0
    assert fidelity.top_recall([8, 1, 6, 5, 4, 3, 2, 7], ref) == 0.5  # best half by score: 0, 7, 2, 3
    assert fidelity.top_recall([1, 2, 3, 4, 5, 6, 7, 8], ref) == 0.0
    assert fidelity.top_recall([float("nan"), 2, 3, 4, 5, 6, 7, 8], ref, keep=1.0) == 1.0
    assert fidelity.top_recall([float("nan"), 9, 3, 4, 5, 6, 7, 8], ref, keep=0.25) == 0.5  # NaN ranks last
    with pytest.raises(ValueError, match="equally long"):
        fidelity.top_recall([1, 2], [1])


def test_control_sample_spreads_over_the_ranks():
    scores = [0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.8, 0.05, 0.6, 0.4]
    picked = fidelity.control_sample(scores, 4)
    assert picked[0] == 3 and picked[-1] == 7  # the best and the worst
    assert len(set(picked)) == 4
    ranks = sorted(range(10), key=lambda i: -scores[i])
    assert [ranks.index(i) for i in picked] == [0, 3, 6, 9]
    assert sorted(fidelity.control_sample(scores[:3], 8)) == [0, 1, 2]
    assert fidelity.control_sample(scores, 0) == []


def test_seed_summary():
    out = fidelity.seed_summary([0.9, 0.8])
    assert out["mean"] == pytest.approx(0.85) and out["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert out["seeds"] == 2 and out["min"] == 0.8 and out["max"] == 0.9
    assert fidelity.seed_summary([0.5])["std"] == 0.0


@pytest.mark.parametrize("families", [("cnn",), ("mlp", "cnn")])
def test_largest_architecture_has_every_size_at_its_maximum(families):
    cfg = SpaceConfig(families=families, max_stages=2, max_depth=2, channels=(4, 8), units=(16, 32), kernels=(3, 5),
                      activations=("relu", "gelu"), dropouts=(0.0, 0.1))
    space = build_space(cfg)
    model = model_for(space, cfg, (8, 8, 1), 10)
    enc = fidelity.largest_architecture(space, Ends(model, "largest"))
    arch = space.decode(enc)
    width = "units" if arch["family"] == "mlp" else "channels"
    for k in (1, 2):
        assert arch[f"stage{k}.depth"] == 2 and arch[f"stage{k}.{width}"] == max(getattr(cfg, width))
        assert arch[f"stage{k}.norm"] is True
    # no architecture of the space has more parameters
    samples = np.asarray(space.sample(jax.random.key(0), 64))
    assert all(model.param_count(e) <= model.param_count(enc) for e in samples
               if space.decode(e)["family"] == arch["family"])


TINY = [
    "data.name=digits", "mode=oneshot", "space.families=[cnn]", "space.max_stages=2", "space.max_depth=1",
    "space.channels=[4,8]", "space.kernels=[3]", "space.activations=[relu,gelu]", "space.dropouts=[0.0]",
    "search.population=4", "search.budget=8", "supernet.epochs=1", "supernet.subnets=2", "supernet.distill=0.5",
    "final.top_k=2", "final.epochs=1", "final.seeds=2", "final.control=5", "progress=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "run"
    reference = "cnn|s1:d1,w4,k3,relu|drop0.0"
    assert main([f"output={out}", f"final.reference=[{reference!r}]", *TINY]) == 0
    return out, reference


def test_oneshot_run_reports_ranking_fidelity(run):
    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    final = json.loads((out / "best.json").read_text())["final"]
    ranking = final["ranking"]
    assert ranking["n"] == len(ranking["control"]) == 5
    scores = [c["score"] for c in ranking["control"]]
    standalone = [c["standalone"] for c in ranking["control"]]
    expected = fidelity.rank_correlation(scores, standalone)
    assert summary["ranking"]["kendall_tau"] == pytest.approx(expected["kendall_tau"])
    assert summary["ranking"]["spearman"] == pytest.approx(expected["spearman"])
    assert ("warning" in summary["ranking"]) == (expected["kendall_tau"] < fidelity.LOW_TAU)
    # the cheap references beside it: parameter count and the zero-cost synflow of the same control sample
    assert -1.0 <= summary["ranking"]["params_kendall_tau"] <= 1.0
    assert -1.0 <= summary["ranking"]["synflow_kendall_tau"] <= 1.0
    # the control sample is spread over the search's scores: it holds the best-scored candidate
    assert max(scores) == pytest.approx(summary["best_val_accuracy"])
    html = (out / "report.html").read_text()
    assert "Ranking fidelity" in html and "Winner vs baselines" in html


def test_oneshot_run_reports_baselines_over_two_seeds(run):
    out, reference = run
    summary = json.loads((out / "summary.json").read_text())
    final = json.loads((out / "best.json").read_text())["final"]
    assert set(summary["baselines"]) == {"largest", "random", "reference"}
    assert summary["baselines"]["largest"]["arch"] == "cnn|s1:d1,w8,k3,relu,bn,skip|s2:d1,w8,k3,relu,bn,skip|drop0.0"
    assert summary["baselines"]["reference"]["arch"] == reference
    for b in final["baselines"].values():
        assert b["test_accuracy"]["seeds"] == 2 and len(b["status"]) == 2
        assert 0.0 <= b["test_accuracy"]["min"] <= b["test_accuracy"]["mean"] <= b["test_accuracy"]["max"] <= 1.0
    winner = next(r for r in final["retrained"] if r["arch"] == final["arch"])
    assert summary["test_accuracy_mean"] == pytest.approx(winner["test_accuracy"]["mean"])
    # the exported model is the first seed's: its test accuracy is one of the two averaged
    assert winner["test_accuracy"]["min"] - 1e-9 <= final["test_accuracy"] <= winner["test_accuracy"]["max"] + 1e-9
    # the winner has the best mean validation accuracy among the top-k (baselines never win)
    assert winner["val_accuracy"]["mean"] == max(r["val_accuracy"]["mean"] for r in final["retrained"])
