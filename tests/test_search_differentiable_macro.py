"""Mode differentiable over the macro space: the relaxed conv supernet (`ConvSupernet.apply_relaxed`), its
derivation, and runs of darts and gdas end to end (configs/macro_darts.yaml at the tests' size)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.test_util import check_grads

from jaxnas import load_model
from jaxnas.data import load_dataset
from jaxnas.search import differentiable as dif
from jaxnas.search.__main__ import main
from jaxnas.spaces import macro_space
from jaxnas.supernet import ConvSupernet

ROOT = Path(__file__).resolve().parents[1]
TINY = {"max_stages": 3, "max_depth": 2, "channels": (4, 8), "kernels": (1, 3), "expansions": (1, 2),
        "activations": ("relu", "gelu"), "dropouts": (0.0,)}
RUN = ["--config", str(ROOT / "configs" / "macro_darts.yaml"), "data.name=digits", "data.image_size=null",
       "space.families=[cnn,mobilenet]", "space.channels=[4,8]", "space.max_stages=2", "space.max_depth=1",
       "differentiable.epochs=2", "differentiable.batch_size=32", "progress=false"]
FINAL = ["final.top_k=1", "final.epochs=1", "final.seeds=1", "final.baselines=[]", "final.control=0"]


def _one_hot(supernet: ConvSupernet, enc) -> dict:
    space = supernet.space
    return {n: jax.nn.one_hot(int(enc[space.index(n)]), len(space[n].options)) for n in supernet.relaxed_choices}


@pytest.mark.parametrize("families", [("cnn",), ("resnet",), ("mobilenet",), ("cnn", "resnet", "mobilenet")])
def test_relaxed_supernet_with_one_hot_choices_is_the_candidate(families):
    """One-hot probabilities of a candidate give its logits (train-mode BatchNorm, dropout 0), for every family,
    stage count, depth, width, kernel, expansion, activation, norm and skip the sample draws."""
    space = macro_space(families=families, **TINY)
    supernet = ConvSupernet(space, (8, 8, 1), 3, stem_channels=4)
    params = supernet.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    relaxed = jax.jit(supernet.apply_relaxed)
    encs = np.asarray(space.sample(jax.random.key(2), 10))
    assert len({int(e[space.index("stage2.depth")]) for e in encs}) > 1  # stages missing and present
    for enc in encs:
        expected = supernet.apply(params, jnp.asarray(enc), x, train=True, key=jax.random.key(3))
        np.testing.assert_allclose(relaxed(params, _one_hot(supernet, enc), x), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=space.to_string(enc))


def test_relaxed_supernet_gradients_equal_finite_differences():
    """The logits are differentiable in every choice's weights, and the gradients are the right ones (float64
    directional finite differences on the softmax of random architecture parameters)."""
    space = macro_space(families=("cnn", "mobilenet"), **TINY)
    supernet = ConvSupernet(space, (8, 8, 1), 3, stem_channels=4, formulation="lax")
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), supernet.init(jax.random.key(0)))
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1), jnp.float64)
        alpha = dif.init_choices(supernet, jax.random.key(2))["alpha"]
        alpha = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(a.size), a.shape, jnp.float64), alpha)

        def loss(alpha):
            probs = jax.tree.map(jax.nn.softmax, alpha)
            return jnp.sum(jnp.sin(supernet.apply_relaxed(params, probs, x)))

        check_grads(loss, (alpha,), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
        grads = jax.grad(loss)(alpha)
        assert all(float(jnp.abs(g).sum()) > 0 for n, g in grads.items() if g.size > 1), "a choice gets no gradient"


@pytest.mark.parametrize("families", [("cnn",), ("resnet",), ("mobilenet",), ("cnn", "resnet", "mobilenet")])
def test_expected_macs_of_one_hot_choices_are_the_candidates_macs(families):
    space = macro_space(families=families, **TINY)
    supernet = ConvSupernet(space, (9, 9, 1), 3, stem_channels=4, stem_stride=2)
    expected = jax.jit(supernet.expected_macs)
    for enc in np.asarray(space.sample(jax.random.key(2), 12)):
        assert float(expected(_one_hot(supernet, enc))) == pytest.approx(supernet.macs(enc), rel=1e-6)


def test_the_cost_term_adds_expected_macs_and_pushes_every_size_choice_down():
    space = macro_space(families=("mobilenet",), **TINY)
    supernet = ConvSupernet(space, (8, 8, 1), 3, stem_channels=4)
    params = supernet.init(jax.random.key(0))
    arch = dif.init_choices(supernet, jax.random.key(1))
    x, y = jax.random.normal(jax.random.key(2), (4, 8, 8, 1)), jnp.arange(4) % 3
    plain, costly = dif.MixedLoss(supernet, "darts"), dif.MixedLoss(supernet, "darts", cost_weight=0.5)
    probs, _ = plain.relaxed(arch, jax.random.key(3), 1.0)
    (a, _), (b, _) = (jax.jit(loss)(params, arch, x, y, jax.random.key(3), 1.0) for loss in (plain, costly))
    assert float(b - a) == pytest.approx(0.5 * float(supernet.expected_macs(probs)) / dif.largest_macs(supernet),
                                         rel=1e-4)
    grads = jax.grad(lambda arch: supernet.expected_macs(plain.relaxed(arch, jax.random.key(3), 1.0)[0]))(arch)
    for name in ("stage1.channels", "stage1.kernel", "stage1.expansion", "stage2.depth"):
        g = np.asarray(grads["alpha"][name])
        assert np.argmax(g) == len(g) - 1 and np.argmin(g) == 0, (name, g)  # the cost grows with the option


def test_a_sampled_missing_stage_leaves_every_gradient_finite():
    """GDAS may sample depth 0 for a stage: the relaxed logits and the cost term stay differentiable there."""
    space = macro_space(families=("cnn",), **TINY)
    supernet = ConvSupernet(space, (8, 8, 1), 3, stem_channels=4)
    params = supernet.init(jax.random.key(0))
    arch = dif.init_choices(supernet, jax.random.key(1))
    arch["alpha"]["stage2.depth"] = jnp.array([50.0, 0.0, 0.0])  # depth 0 drawn whatever the Gumbel noise
    loss = dif.MixedLoss(supernet, "gdas", cost_weight=1.0)
    x, y = jax.random.normal(jax.random.key(2), (2, 8, 8, 1)), jnp.arange(2)
    grads = jax.grad(lambda a: loss(params, a, x, y, jax.random.key(3), 1.0)[0])(arch)["alpha"]
    assert all(bool(jnp.isfinite(g).all()) for g in grads.values())


def test_derivation_takes_each_choice_argmax_and_drops_what_a_missing_stage_cannot_have():
    space = macro_space(families=("cnn", "resnet"), **TINY)
    supernet = ConvSupernet(space, (8, 8, 1), 3, stem_channels=4)
    alpha = jax.tree.map(np.array, dif.init_choices(supernet, jax.random.key(0))["alpha"])
    prefer = {"family": "resnet", "stage1.depth": 2, "stage1.channels": 8, "stage1.kernel": 1, "stage2.depth": 0,
              "stage3.channels": 8}
    for name, value in prefer.items():
        alpha[name][space[name].options.index(value)] += 1.0
    arch = space.decode(dif.derive_choices(space, alpha))
    assert {k: arch.get(k) for k in prefer} == {**prefer, "stage3.channels": None}  # stage 3 needs a stage 2
    assert "stage3.depth" not in arch and arch["dropout"] == 0.0
    assert dif.alpha_entropy({"a": np.zeros(4), "fixed": np.zeros(1)}) == pytest.approx(np.log(4), rel=1e-6)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def gdas_run(tmp_path_factory):
    """The README's command (configs/macro_darts.yaml) with gdas, on the digits at the tests' size (darts runs in
    tests/test_benchmark_differentiable.py's macro smoke run)."""
    out = tmp_path_factory.mktemp("macro") / "gdas"
    assert main([*RUN, f"output={out}", "search.strategy=gdas", *FINAL]) == 0
    return out


def test_gdas_run_over_the_macro_space_retrains_tests_and_exports_the_derived_network(gdas_run):
    history = _rows(gdas_run / "history.csv")
    assert [int(r["generation"]) for r in history] == [0, 1]
    assert "param_free_share" not in history[0]  # the cell's collapse guard has no meaning here
    assert [float(r["tau"]) for r in history] == pytest.approx([10.0, 0.1])
    space = macro_space(families=("cnn", "mobilenet"), max_stages=2, max_depth=1, channels=(4, 8), kernels=(3, 5),
                        expansions=(1, 3), norms=(True,))
    for r in history:
        space.from_string(r["arch"])  # a valid architecture of the run's space
        assert 0 < float(r["alpha_entropy"]) < np.log(3) and np.isfinite(float(r["val_loss"]))
    summary = json.loads((gdas_run / "summary.json").read_text())
    weights = summary["differentiable"]["op_weights"]
    assert summary["differentiable"]["derived_arch"] == history[-1]["arch"]
    assert set(weights) >= {"family", "stage1.channels", "stage2.depth"} and "dropout" not in weights
    assert all(sum(w) == pytest.approx(1.0, abs=1e-3) for w in weights.values())
    best = json.loads((gdas_run / "best.json").read_text())
    assert best["arch"] == best["final"]["arch"] == history[-1]["arch"]
    model = load_model(gdas_run)
    test = load_dataset("digits").test
    accuracy = float((model.predict(test.images) == test.labels).mean())
    assert accuracy == pytest.approx(best["final"]["test_accuracy"], abs=1e-6)


def test_gdas_run_over_the_macro_space_resumes_from_a_checkpoint_exactly(gdas_run, tmp_path):
    """A run cut after its first epoch's checkpoint (the later one removed, as a kill would leave it) resumes to
    the same history and the same final state, bit for bit."""
    cut = tmp_path / "cut"
    shutil.copytree(gdas_run, cut)
    shutil.rmtree(cut / "checkpoints" / "2")
    for name in ("summary.json", "best.json"):
        (cut / name).unlink()
    assert main(["--resume", str(cut)]) == 0
    for name in ("history.csv", "generations.csv"):
        assert (cut / name).read_text() == (gdas_run / name).read_text()
    with ocp.StandardCheckpointer() as checkpointer:
        a, b = (checkpointer.restore((out / "checkpoints" / "2" / "state").resolve()) for out in (cut, gdas_run))
    chex.assert_trees_all_equal(a, b)
    assert json.loads((cut / "best.json").read_text())["arch"] == json.loads((gdas_run / "best.json").read_text())["arch"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["search.strategy=pc_darts"], "for the macro space use darts or gdas"),
        (["differentiable.stop_skips=3"], "the macro space has no such collapse"),
        (["space.families=[mlp,cnn]"], "use a subset of [cnn, resnet, mobilenet]"),
        (["space.name=nb201", "differentiable.cost_weight=1"], "Set differentiable.cost_weight=0"),
    ],
)
def test_macro_combinations_it_cannot_search_are_refused(tmp_path, capsys, overrides, says):
    assert main([*RUN, f"output={tmp_path / 'bad'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
