"""Gated programs are dispatched by jax's C++ fast path: once warm, a call with the same shapes never re-enters
jit's Python path (pjit's ``cache_miss``; its cost: docs/benchmarks.md). The hook is `jax.no_tracing`: under it,
every call that enters the Python path raises RuntimeError, even when nothing would be re-traced.

The cause found: twins built under ``nnx.eval_shape`` kept their unused dropout RNG state as
`jax.ShapeDtypeStruct` leaves, and one such leaf among a call's arguments sent every call through the Python path
(`jaxnas.supernet.weights.concrete_rngs` now fills them; tests/test_twin_state.py checks every space's twins)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_adaptive import _twin

from jaxnas.adaptive.exits import EarlyExitNet, exit_points
from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import ChannelGatePolicy
from jaxnas.data import load_dataset

CALLS = 5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def twin(digits):
    return _twin("cnn", digits.train.images)


@pytest.fixture(scope="module", autouse=True)
def hook_works():
    """Skip if `jax.no_tracing` no longer guards jit's Python path (then these tests could not fail)."""
    f = jax.jit(lambda a: a + 1)
    small, large = jnp.ones(3), jnp.ones(4)
    f(small)
    try:
        with jax.no_tracing(True):
            f(small)  # warm: the C++ fast path
            f(large)  # a new shape: the Python path, which must raise
    except RuntimeError:
        return
    pytest.skip("jax.no_tracing no longer raises when a jitted call enters the Python path (this jax version)")


def _fast(call):
    """Run ``call`` ``CALLS`` times after a warm-up with jit's Python path forbidden (`jax.no_tracing`)."""
    jax.block_until_ready(call())
    with jax.no_tracing(True):
        for _ in range(CALLS):
            jax.block_until_ready(call())


def test_gated_programs_take_the_fast_path(twin, digits):
    net = GatedNet(twin)
    x = jnp.asarray(digits.test.images[:16], jnp.float32)
    keep = {n: np.arange(w // 2) for n, w in zip(net.names, net.full)}
    program, cut = net.program(net.widths(keep)), net.cut_args(keep)
    _fast(lambda: program(net.state, x, cut))
    _fast(lambda: net.program(net.full)(net.state, x, {}))
    _fast(lambda: net(x, keep))
    _fast(lambda: net.masked(x, keep))


@pytest.mark.parametrize("fast_widths", [False, True], ids=["probe", "shallow"])
def test_policy_stream_takes_the_fast_path(twin, digits, fast_widths):
    net = GatedNet(twin)
    widths = {(6, 8, 16): 1.0} if fast_widths else None
    policy = ChannelGatePolicy(net, bl=0.5, Bg=0.5, align=2, probe_images=4, fast_widths=widths)
    images = digits.test.images[:160]  # 5 batches: probes on their own, pipelined programs, plain programs
    run = lambda: [np.asarray(logits) for logits in policy.stream(images, 32)]  # noqa: E731
    _fast(run)
    assert policy.net.widths(policy._decide(policy.probe(images[:4]))) != net.full  # the stream really gates


def test_early_exit_programs_take_the_fast_path(twin, digits):
    exits = exit_points(twin)
    keys = jax.random.split(jax.random.key(0), len(exits))
    heads = [{"w": jax.random.normal(k, (c, 10)), "b": jnp.zeros(10)} for k, c in zip(keys, [8, 8, 16])]
    net = EarlyExitNet(twin, exits, heads, [0.5, np.inf, 0.4], buckets=2)
    x = jnp.asarray(digits.test.images[:16], jnp.float32)
    _fast(lambda: net.fused_forward(x))
    _fast(lambda: net.all_logits(x))
