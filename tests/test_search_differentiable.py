"""Differentiable search over the NB201 cell (jaxnas.search.differentiable, mode differentiable): the relaxations
and the bilevel step on toy problems, then runs of each strategy on the 8x8 digits, and a SIGKILLed run resumed.

Compiling the supernet's gradient is nearly all of the run time, so the toys work on one cell (`mixed_cell`) and
the runs on a network of one cell per stage with 4 channels."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxnas import load_model
from jaxnas.data import load_dataset
from jaxnas.search import differentiable as dif
from jaxnas.search.__main__ import main
from jaxnas.spaces import nb201_space
from jaxnas.spaces.nb201 import OPS
from jaxnas.supernet import NB201Supernet

ROOT = Path(__file__).resolve().parents[1]
SPACE = nb201_space()
SUPERNET = NB201Supernet(SPACE, (8, 8, 2), 10, channels=4, cells=1, formulation="lax")
CELL_INPUT = (16, 8, 8, 4)  # one stage-1 cell: B x H x W x C
CONV3, SKIP, NONE = OPS.index("nor_conv_3x3"), OPS.index("skip_connect"), OPS.index("none")
RUN = ["data.name=digits", "space.name=nb201", "space.cell_channels=4", "space.cells=1", "mode=differentiable",
       "differentiable.epochs=2", "final.top_k=0", "progress=false"]


def _cell_params(key, dtype=jnp.float32):
    return jax.tree.map(lambda a: a[0].astype(dtype), SUPERNET.init(key)["cells"][0])


def _input_edge_only(row):
    """op weights [6, 5] under which a cell computes the mixed op of its input edge 1<-0 alone (weights ``row``
    [5]): node 3 = skip(node 1), every other edge none."""
    fixed = jax.nn.one_hot(jnp.array([NONE, NONE, NONE, NONE, SKIP, NONE]), len(OPS), dtype=row.dtype)
    return fixed.at[0].set(row)


def _toy_loss(weights, arch, x, target, key, tau):
    """Squared error of the input edge's DARTS mixed op (softmax of alpha's first row) against ``target``."""
    out = SUPERNET.mixed_cell(weights, _input_edge_only(jax.nn.softmax(arch["alpha"][0])), x)
    return jnp.mean(jnp.square(out - target)), jnp.float32(0)


def _toy_gdas_loss(weights, arch, x, target, key, tau):
    """`_toy_loss` with the input edge's op sampled as GDAS does (one-hot forward, straight-through backward)."""
    out = SUPERNET.mixed_cell(weights, _input_edge_only(dif.gumbel_one_hot(arch["alpha"][:1], key, tau)[0]), x)
    return jnp.mean(jnp.square(out - target)), jnp.float32(0)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("loss", [_toy_loss, _toy_gdas_loss], ids=["darts", "gdas"])
def test_alphas_select_the_only_op_that_can_fit_the_target(loss):
    """The target is a 3x3 conv edge of a teacher cell: of the input edge's ops only nor_conv_3x3 can fit it."""
    keys = jax.random.split(jax.random.key(0), 4)
    teacher = _cell_params(keys[0])
    x_train, x_val = (jax.random.normal(k, CELL_INPUT) for k in keys[1:3])
    conv3 = _input_edge_only(jax.nn.one_hot(CONV3, len(OPS)))
    train, val = ((x, SUPERNET.mixed_cell(teacher, conv3, x)) for x in (x_train, x_val))
    weight_opt, arch_opt = optax.adam(0.01), optax.adam(0.05)
    state = dif.init_bilevel(_cell_params(keys[3]), dif.init_arch("darts", keys[3]), weight_opt, arch_opt)
    step = jax.jit(lambda s, key, tau: dif.bilevel_step(loss, weight_opt, arch_opt, s, train, val, key, tau, 0.0,
                                                        True))
    steps, losses = 200, []
    for i in range(steps):
        state, metrics = step(state, jax.random.key(i), 10.0 - 9.9 * i / (steps - 1))  # GDAS' annealed tau
        losses.append(float(metrics["val_loss"]))
    weights = np.asarray(jax.nn.softmax(state.arch["alpha"][0]))
    assert dif.derive(state.arch["alpha"])[0] == CONV3
    assert weights[CONV3] > 0.5 and weights[CONV3] > 2 * np.delete(weights, CONV3).max()
    assert np.mean(losses[-10:]) < 0.1 * losses[0]


@pytest.mark.parametrize(("partial", "edges"), [(1, False), (2, True)], ids=["darts", "pc_darts_k2_betas"])
def test_mixed_cell_gradients_wrt_architecture_equal_finite_differences(partial, edges):
    with jax.enable_x64(True):
        params = _cell_params(jax.random.key(1), jnp.float64)
        x = jax.random.normal(jax.random.key(2), CELL_INPUT, jnp.float64)
        probe = jax.random.normal(jax.random.key(3), CELL_INPUT, jnp.float64)
        alpha = jax.random.normal(jax.random.key(4), (6, 5), jnp.float64)
        beta = jax.random.normal(jax.random.key(5), (6,), jnp.float64)

        def f(alpha, beta):
            out = SUPERNET.mixed_cell(params, jax.nn.softmax(alpha), x, partial=partial,
                                      edge_weights=dif.edge_softmax(beta) if edges else None)
            return jnp.sum(out * probe)

        grads = jax.jit(jax.grad(f, (0, 1)))(alpha, beta)
        f = jax.jit(f)
        h = 1e-5
        for which, value in enumerate((alpha, beta)):
            numeric = np.zeros(value.shape)
            for index in np.ndindex(value.shape):
                bump = jnp.zeros(value.shape, jnp.float64).at[index].set(h)
                args = [alpha, beta]
                args[which] = value + bump
                up = f(*args)
                args[which] = value - bump
                numeric[index] = (up - f(*args)) / (2 * h)
            np.testing.assert_allclose(grads[which], numeric, rtol=1e-6, atol=1e-6)
        if not edges:
            assert np.abs(grads[1]).max() == 0.0


def test_second_order_gradient_approximates_the_exact_unrolled_gradient():
    """Liu et al.'s finite-difference Hessian-vector product against autodiff through the virtual step."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(6), 5)
        weights = _cell_params(keys[0], jnp.float64)
        teacher = _cell_params(keys[1], jnp.float64)
        arch = {"alpha": jax.random.normal(keys[2], (6, 5), jnp.float64)}
        conv3 = _input_edge_only(jax.nn.one_hot(CONV3, len(OPS), dtype=jnp.float64))
        train, val = ((x, SUPERNET.mixed_cell(teacher, conv3, x)) for x in
                      (jax.random.normal(k, CELL_INPUT, jnp.float64) for k in keys[3:5]))
        xi = 0.5

        def exact(arch):
            virtual = jax.tree.map(lambda w, g: w - xi * g, weights,
                                   jax.grad(lambda w: _toy_loss(w, arch, *train, None, 1.0)[0])(weights))
            return _toy_loss(virtual, arch, *val, None, 1.0)[0]

        approx, _ = jax.jit(lambda a: dif.unrolled_arch_grad(_toy_loss, weights, a, train, val, None, 1.0, xi))(arch)
        first_order = jax.grad(lambda a: _toy_loss(weights, a, *val, None, 1.0)[0])(arch)
        want = jax.jit(jax.grad(exact))(arch)
        error = np.abs(approx["alpha"] - want["alpha"]).max()
        assert error < 1e-3 * np.abs(want["alpha"]).max()
        assert np.abs(first_order["alpha"] - want["alpha"]).max() > 100 * error  # the second-order term matters


def test_gdas_samples_one_op_per_edge_and_its_forward_is_the_sampled_cell():
    params = SUPERNET.init(jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (16, 8, 8, 2))
    alpha = jax.random.normal(jax.random.key(9), (6, 5))
    samples = jax.vmap(dif.gumbel_one_hot, in_axes=(None, 0, None))(alpha, jax.random.split(jax.random.key(10), 64),
                                                                    1.0)
    chex.assert_shape(samples, (64, 6, 5))
    chex.assert_trees_all_equal(samples.sum(-1), jnp.ones((64, 6)))
    assert set(np.unique(np.asarray(samples)).tolist()) == {0.0, 1.0}
    assert len({tuple(np.asarray(s).argmax(-1)) for s in samples}) > 32  # a new cell per draw
    mixed = jax.jit(lambda w: SUPERNET.apply_mixed(params, w, x))
    discrete = jax.jit(lambda enc: SUPERNET.apply(params, enc, x, train=True))
    for sample in samples[:3]:
        enc = jnp.argmax(sample, -1)
        chex.assert_trees_all_close(mixed(sample), discrete(enc), atol=1e-5, rtol=1e-5)
    # Straight-through: the one-hot forward still passes softmax gradients back to every alpha of an edge.
    grads = jax.grad(lambda a: jnp.sum(dif.gumbel_one_hot(a, jax.random.key(11), 1.0) * jnp.arange(5.0)))(alpha)
    assert np.all(np.abs(np.asarray(grads)) > 0)


def test_pc_darts_with_one_group_and_no_edge_normalisation_is_darts():
    """Same logits, and the same traced program for the loss and both gradients (so the same numbers in training)."""
    x = jax.random.normal(jax.random.key(12), (16, 8, 8, 2))
    y = jnp.arange(16) % 10
    params = SUPERNET.init(jax.random.key(13))
    arch = dif.init_arch("pc_darts", jax.random.key(14))
    darts, pc_darts = dif.MixedLoss(SUPERNET, "darts"), dif.MixedLoss(SUPERNET, "pc_darts", pc_k=1)
    chex.assert_trees_all_equal(*(jax.jit(loss)(params, arch, x, y, None, 1.0) for loss in (darts, pc_darts)))
    programs = [str(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, arch, x, y, None, 1.0))
                for loss in (darts, pc_darts)]
    assert programs[0] == programs[1]
    with_betas = dif.MixedLoss(SUPERNET, "pc_darts", pc_k=1, edge_normalisation=True)
    assert str(jax.make_jaxpr(with_betas)(params, arch, x, y, None, 1.0)) != str(
        jax.make_jaxpr(pc_darts)(params, arch, x, y, None, 1.0))


def test_channel_shuffle_interleaves_the_groups_and_partial_channels_need_a_divisor():
    from jaxnas.supernet.nb201 import _channel_shuffle

    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    assert _channel_shuffle(x, 2).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(ValueError, match="divide the cell channels"):
        SUPERNET.apply_mixed(SUPERNET.init(jax.random.key(0)), jnp.ones((6, 5)) / 5, jnp.zeros((1, 8, 8, 2)),
                             partial=3)


def test_derivation_excludes_none_unless_asked_and_counts_parameter_free_ops():
    alpha = np.zeros((6, 5))
    alpha[:, NONE] = 5.0
    alpha[:, SKIP] = 1.0
    alpha[0, CONV3] = 2.0
    enc = dif.derive(alpha)
    assert enc.tolist() == [CONV3] + [SKIP] * 5
    assert dif.derive(alpha, exclude_none=False).tolist() == [NONE] * 6
    assert dif.param_free_share(enc) == pytest.approx(5 / 6) and dif.skip_connections(enc) == 5
    assert dif.alpha_entropy(np.zeros((6, 5))) == pytest.approx(math.log(5), rel=1e-6)
    np.testing.assert_allclose(dif.edge_softmax(jnp.zeros(6)), [1, 1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


# ------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def gdas_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gdas") / "run"
    assert main([f"output={out}", "search.strategy=gdas", *RUN, "differentiable.epochs=3"]) == 0
    return out


def _check_history(out: Path, epochs: int) -> list[dict]:
    history = _rows(out / "history.csv")
    assert [int(r["generation"]) for r in history] == list(range(epochs))
    for r in history:
        enc = SPACE.from_string(r["arch"])
        assert float(r["param_free_share"]) == pytest.approx(dif.param_free_share(enc))
        assert int(r["skip_connections"]) == dif.skip_connections(enc)
        assert 0 < float(r["alpha_entropy"]) < math.log(5) and np.isfinite(float(r["val_loss"]))
        assert NONE not in enc  # derived without none (differentiable.exclude_none)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "differentiable" and summary["differentiable"]["epochs"] == epochs
    assert summary["differentiable"]["derived_arch"] == history[-1]["arch"]
    assert summary["differentiable"]["param_free_share_per_epoch"] == [float(r["param_free_share"]) for r in history]
    assert np.asarray(summary["differentiable"]["op_weights"]).sum(-1) == pytest.approx(np.ones(6), abs=1e-3)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == epochs
    assert (out / "report.html").is_file() and (out / "fitness.png").is_file()
    return history


def test_darts_run_retrains_tests_and_exports_the_derived_cell(tmp_path):
    """The README's command (configs/nb201_darts.yaml), on the digits at the tests' size."""
    out = tmp_path / "darts"
    final = ["final.top_k=1", "final.epochs=1", "final.seeds=1", "final.baselines=[]", "final.control=0"]
    assert main(["--config", str(ROOT / "configs" / "nb201_darts.yaml"), f"output={out}", "data.image_size=null",
                 "differentiable.stop_skips=null", *RUN, *final]) == 0
    history = _check_history(out, 2)
    best = json.loads((out / "best.json").read_text())
    assert best["arch"] == best["final"]["arch"] == history[-1]["arch"]
    model = load_model(out)
    assert model.arch == history[-1]["arch"] and (out / "model" / "model.stablehlo").is_file()
    test = load_dataset("digits").test
    accuracy = float((model.predict(test.images) == test.labels).mean())
    assert accuracy == pytest.approx(best["final"]["test_accuracy"], abs=1e-6)


def test_pc_darts_run_stops_when_the_derived_cell_collapses_to_skip_connections(tmp_path):
    out = tmp_path / "pc"
    assert main([f"output={out}", "search.strategy=pc_darts", *RUN, "differentiable.pc_k=2",
                 "differentiable.stop_skips=1"]) == 0
    history = _check_history(out, 1)
    assert int(history[-1]["skip_connections"]) >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("collapse guard")


def test_gdas_run_anneals_its_temperature(gdas_run):
    history = _check_history(gdas_run, 3)
    assert [float(r["tau"]) for r in history] == pytest.approx([10.0, 5.05, 0.1])


def test_gdas_run_killed_with_sigkill_and_resumed_ends_exactly_as_the_run_left_alone(gdas_run, tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxnas.search", f"output={killed}", "search.strategy=gdas", *RUN,
           "differentiable.epochs=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "1").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 3, "the run finished before it was killed; kill it earlier"
    resumed = subprocess.run([sys.executable, "-m", "jaxnas.search", "--resume", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("history.csv", "generations.csv"):
        assert (killed / name).read_text() == (gdas_run / name).read_text()
    with ocp.StandardCheckpointer() as checkpointer:
        a, b = (checkpointer.restore((out / "checkpoints" / "3" / "state").resolve()) for out in (killed, gdas_run))
    chex.assert_trees_all_equal(a, b)  # weights, alphas, both optimiser states and the key, bit for bit


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["mode=differentiable", "space.name=nb201"], "mode=differentiable needs search.strategy=darts"),
        (["search.strategy=gdas", "space.name=nb201"], "needs mode=differentiable"),
        (["mode=differentiable", "search.strategy=darts", "space.name=transformer"], "set space.name=nb201 or macro"),
        (["mode=differentiable", "search.strategy=darts"], "use a subset of [cnn, resnet, mobilenet]"),
        (["mode=differentiable", "search.strategy=gdas", "space.name=nb201", "differentiable.second_order=true"],
         "differentiable.second_order=true needs search.strategy=darts or pc_darts"),
        (["mode=differentiable", "search.strategy=pc_darts", "space.name=nb201", "differentiable.pc_k=3"],
         "differentiable.pc_k=3 must divide space.cell_channels=16"),
        (["mode=differentiable", "search.strategy=darts", "space.name=nb201", "objectives.constraints=[params<=1e5]"],
         "cannot enforce constraints"),
    ],
)
def test_bad_combinations_are_refused_with_the_keys_named(tmp_path, capsys, overrides, says):
    assert main([f"output={tmp_path / 'bad'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
