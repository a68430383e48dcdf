"""Grid-pooled exit heads (`jaxnas.adaptive.exits.exit_pool`) and the guardrail's confidence bound
(`jaxnas.adaptive.calibrate.drop_bound`, ``z`` of `enforce_guardrail` / `calibrate_thresholds`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_adaptive_fused_exits import ARCH, _assert_same_routing, _mixed

from jaxnas.adaptive.calibrate import drop_bound
from jaxnas.adaptive.exits import EarlyExitNet, calibrate_thresholds, exit_pool, exit_points, policy_accuracy
from jaxnas.adaptive.experiment import Settings
from jaxnas.data import load_dataset
from jaxnas.supernet.conv import TwinConvNet


@pytest.mark.parametrize("shape, grid", [((3, 8, 8, 5), 4), ((2, 7, 7, 3), 4), ((2, 7, 5, 3), 2), ((2, 3, 3, 4), 4),
                                         ((2, 6, 6, 2), 1)])
def test_exit_pool_averages_each_cell_of_the_grid(shape, grid):
    h = jax.random.normal(jax.random.key(0), shape)
    out = np.asarray(exit_pool(h, grid))
    g = min(grid, shape[1], shape[2])
    assert out.shape == (shape[0], g * g * shape[3])
    rows = np.linspace(0, shape[1], g + 1).round().astype(int)
    cols = np.linspace(0, shape[2], g + 1).round().astype(int)
    assert all(b > a for a, b in zip(rows, rows[1:])) and all(b > a for a, b in zip(cols, cols[1:]))  # no empty cell
    h = np.asarray(h)
    cells = [h[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean((1, 2)) for i in range(g) for j in range(g)]
    np.testing.assert_allclose(out, np.concatenate(cells, -1), rtol=1e-6, atol=1e-6)
    if g == 1:
        np.testing.assert_allclose(out, h.mean((1, 2)), rtol=1e-6, atol=1e-6)


def test_grid_heads_route_the_same_fused_and_on_the_host():
    digits = load_dataset("digits")
    twin = TwinConvNet(ARCH, 1, 8, 10, rngs=nnx.Rngs(0))
    twin.eval()
    exits = exit_points(twin)
    net = EarlyExitNet(twin, exits, [], [np.inf] * len(exits), buckets=2, grid=2)
    dims = [f.shape[1] for f in net.features(digits.test.images[:4])]
    assert dims == [4 * 8, 4 * 8, 4 * 16]  # 2 x 2 cells of each exit's channels
    keys = jax.random.split(jax.random.key(1), len(exits))
    net.heads = [{"w": 4.0 * jax.random.normal(k, (d, 10)), "b": jnp.zeros(10)} for k, d in zip(keys, dims)]
    x = digits.test.images[:40]
    net.thresholds = _mixed(net, x)
    where = _assert_same_routing(net, x)
    assert len(set(where.tolist())) >= 2


def test_drop_bound_is_the_paired_drop_plus_z_standard_errors():
    full = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    policy = np.array([1, 0, 1, 1, 1, 0, 1, 0, 1, 1], bool)
    d = full.astype(float) - policy
    drop, bound = drop_bound(full, policy, 1.645)
    assert drop == pytest.approx(10.0)  # 2 lost, 1 gained, of 10 images
    assert bound == pytest.approx(10.0 + 1.645 * 100 * d.std(ddof=1) / np.sqrt(10))
    assert drop_bound(full, full, 3.0) == (0.0, 0.0)  # no disagreement: no uncertainty
    assert drop_bound(full, policy, 0.0) == (drop, drop)
    assert drop_bound(full[:0], policy[:0], 1.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="guardrail_z"):
        Settings(guardrail_z=-1)


def test_thresholds_hold_the_confidence_bound_and_a_larger_z_is_more_careful():
    rng = np.random.default_rng(0)
    n, classes = 600, 4
    labels = rng.integers(0, classes, n)
    final = np.eye(classes)[labels] * 5 + rng.normal(0, 1, (n, classes))  # mostly right
    early = np.eye(classes)[labels] * 2 + rng.normal(0, 1.2, (n, classes))  # right less often
    logits, macs = [early, final], [1, 3]
    full_correct = final.argmax(-1) == labels
    saved = []
    for z in (0.0, 1.645, 3.0):
        thresholds = calibrate_thresholds(logits, labels, macs, max_drop=1.0, z=z)
        _, where = policy_accuracy(logits, labels, thresholds)
        correct = np.stack([lg.argmax(-1) for lg in logits])[where, np.arange(n)] == labels
        assert drop_bound(full_correct, correct, z)[1] <= 1.0 + 1e-9
        saved.append(float(np.mean(where == 0)))
    assert saved[0] >= saved[1] >= saved[2] and saved[0] > saved[2] and saved[2] > 0


@pytest.mark.parametrize("field, value", [("finetune_epochs", -1), ("finetune_lr", 0.0), ("latency_rounds", -1),
                                          ("min_speedup", 1.0), ("guardrail_z", -0.5), ("exit_grid", 0)])
def test_settings_refuse_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})
