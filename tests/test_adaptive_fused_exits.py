"""The fused early-exit forward (`EarlyExitNet.predict_fused`): the routing of `EarlyExitNet.predict` in one jitted
program per batch shape, on a tiny random cnn twin with random exit heads over digits (fast: no training)."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnas.adaptive.exits import EarlyExitNet, exit_points, fused_buckets
from jaxnas.data import load_dataset
from jaxnas.spaces.macro import MacroArch, StageArch
from jaxnas.supernet.conv import TwinConvNet

ARCH = MacroArch("cnn", (StageArch(2, 8, 3, None, "relu", True, True), StageArch(2, 16, 3, None, "relu", True, False)),
                 0.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def net():
    """A randomly initialised cnn twin (4 blocks: exits after blocks 0, 1, 2) with random exit heads, scaled so
    that confidences spread over (0.1, 1]: routing equality needs varied confidences, not accuracy."""
    twin = TwinConvNet(ARCH, 1, 8, 10, rngs=nnx.Rngs(0))
    twin.eval()
    exits = exit_points(twin)
    keys = jax.random.split(jax.random.key(0), len(exits))
    widths = [8, 8, 16]
    heads = [{"w": 4.0 * jax.random.normal(k, (c, 10)), "b": jax.numpy.zeros(10)} for k, c in zip(keys, widths)]
    return EarlyExitNet(twin, exits, heads, [np.inf] * len(exits), buckets=2)  # few branches: fast compiles


def _between(confidences: np.ndarray, q: float) -> float:
    """A threshold near quantile ``q`` that no confidence ties (midway between two distinct ones)."""
    c = np.unique(confidences)
    k = min(int(q * len(c)), len(c) - 2)
    return float((c[k] + c[k + 1]) / 2)


def _mixed(net: EarlyExitNet, x: np.ndarray) -> list[float]:
    """Exit 0 at its 60% confidence quantile, exit 1 never decides (inf), exit 2 at its median confidence."""
    confs = []
    for logits in net.all_logits(x)[:-1]:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        confs.append(probs.max(-1) / probs.sum(-1))
    return [_between(confs[0], 0.6), np.inf, _between(confs[2], 0.5)]


def _assert_same_routing(net: EarlyExitNet, x: np.ndarray) -> np.ndarray:
    expected_logits, expected_where = net.predict(x)
    logits, where = net.predict_fused(x)
    assert logits.shape == expected_logits.shape and where.dtype == np.int32
    np.testing.assert_array_equal(where, expected_where)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    return where


@pytest.mark.parametrize("setting", ["inf", "zero", "mixed"])
def test_fused_routes_like_predict_for_odd_batch_sizes(net, digits, setting):
    x = digits.validation.images
    net.thresholds = {"inf": [np.inf] * 3, "zero": [0.0] * 3, "mixed": _mixed(net, x)}[setting]
    for n in (7, 33) if setting == "mixed" else (1, 33):
        where = _assert_same_routing(net, x[:n])
        if setting == "inf":
            assert (where == 3).all()
        if setting == "zero":
            assert (where == 0).all()  # everyone leaves at the first exit
    if setting == "mixed":  # every exit that decides is used and images run on to the twin's head
        assert set(np.unique(where)) == {0, 2, 3}


def test_fused_is_one_program_traced_once_per_batch_shape(net, digits):
    x = digits.validation.images
    net = EarlyExitNet(net.twin, net.exits, net.heads, _mixed(net, x))  # default buckets, nothing compiled yet
    assert net.buckets == 16
    before = net.fused_traces
    _assert_same_routing(net, x[:7])
    for n in (9, 7, 9):
        net.predict_fused(x[:n])
    assert net.fused_traces == before + 2
    net.thresholds = [np.inf, 0.5, np.inf]  # new thresholds: a new program
    net.predict_fused(x[:7])
    assert net.fused_traces == before + 3
    # The routing is on device: conditionals (one per exit that decides), no callback to the host.
    jaxpr = jax.make_jaxpr(net.fused_program())(net._leaves, net.heads, x[:7])
    assert [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns] == ["jit"]
    primitives = _primitives(jaxpr.jaxpr)
    assert primitives.count("cond") == 1
    assert not any("callback" in p for p in primitives)


def _primitives(jaxpr) -> list[str]:
    """Names of every primitive in ``jaxpr``, nested programs (jit, cond branches) included."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn.primitive.name)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(inner, "jaxpr", None)
                if inner is not None:
                    found += _primitives(getattr(inner, "jaxpr", inner))
    return found


def test_fused_buckets_and_clear_errors(net):
    assert fused_buckets(256) == tuple(range(0, 257, 16)) and fused_buckets(256, 4) == (0, 64, 128, 192, 256)
    assert fused_buckets(7) == tuple(range(8)) and fused_buckets(1) == (0, 1) and fused_buckets(33, 2) == (0, 17, 33)
    with pytest.raises(ValueError, match="batch >= 1"):
        fused_buckets(0)
    bad = EarlyExitNet(net.twin, net.exits, net.heads, [0.5])
    with pytest.raises(ValueError, match="1 thresholds for 3 exits"):
        bad.predict_fused(np.zeros((2, 8, 8, 1), np.float32))
    untrained = EarlyExitNet(net.twin, net.exits, [], [np.inf, 0.5, np.inf])
    with pytest.raises(ValueError, match=r"exits \[1\] have finite thresholds but no trained head"):
        untrained.predict_fused(np.zeros((2, 8, 8, 1), np.float32))
