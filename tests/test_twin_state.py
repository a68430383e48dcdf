"""Every extracted twin holds concrete arrays only (`jaxnas.supernet.weights.concrete_rngs`): an abstract leaf left
by `nnx.eval_shape` would send every jitted call taking the twin's state through jax's Python dispatch path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnas.config import SpaceConfig
from jaxnas.search.models import build_space, model_for

SPACES = {
    "macro-cnn": (SpaceConfig(name="macro", families=("cnn",), channels=(8,), max_stages=2, max_depth=1), (8, 8, 1)),
    "macro-mlp": (SpaceConfig(name="macro", families=("mlp",), units=(16,), max_stages=2, max_depth=1), (8, 8, 1)),
    "nb201": (SpaceConfig(name="nb201", cell_channels=4, cells=1), (8, 8, 1)),
    "transformer": (SpaceConfig(name="transformer", max_layers=1, hidden=(8,), heads=(1,), patch=4), (8, 8, 1)),
    "lm": (SpaceConfig(name="lm", max_layers=1, hidden=(8,), heads=(1,), kv_heads=(1,)), (8,)),
}


@pytest.mark.parametrize("name", sorted(SPACES))
def test_extracted_twins_hold_arrays_only_and_dispatch_on_the_fast_path(name):
    cfg, shape = SPACES[name]
    space = build_space(cfg)
    model = model_for(space, cfg, shape, 10)
    params = model.init(jax.random.key(0))
    enc = np.asarray(space.sample(jax.random.key(1), 1)[0])
    is_lm = name == "lm"
    x = jnp.zeros((2, *shape), jnp.int32 if is_lm else jnp.float32)
    stats = None
    if not is_lm:
        stats = model.statistics(params, enc[None], jnp.zeros((1, 2, *shape), jnp.float32), shared=True)
        stats = None if stats is None else jax.tree.map(lambda a: a[0], stats)
    _, twin = model.extract(params, enc, stats) if stats is not None else model.extract(params, enc)
    twin.eval()
    graph, state = nnx.split(twin)
    abstract = [leaf for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.ShapeDtypeStruct)]
    assert not abstract, f"{name}: abstract leaves {abstract} in the twin's state"
    forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    jax.block_until_ready(forward(state, x))
    with jax.no_tracing(True):  # raises if a call takes jit's Python path (a cache miss), even without retracing
        for _ in range(3):
            jax.block_until_ready(forward(state, x))
