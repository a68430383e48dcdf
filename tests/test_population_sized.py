"""jaxnas.population.sized: shared-weight evaluation at every candidate's own sizes equals the masked vmapped programs.

Tiny spaces on the 8x8 digits; supernet weights are perturbed so BatchNorm / LayerNorm scales and biases are
not 1 / 0 (a slicing error would then change the numbers).
"""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import population as pop
from jaxnas.data import load_dataset
from jaxnas.population import sized
from jaxnas.search.models import SearchModel
from jaxnas.spaces import macro_space
from jaxnas.supernet import ConvSupernet, MLPSupernet

IMAGE, CLASSES = (8, 8, 1), 10


@jax.jit
def _perturbed(params, key):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + 0.3 * jax.random.normal(key, flat.shape))


@functools.lru_cache
def _data():
    ds = load_dataset("digits")
    x, y = jnp.asarray(ds.validation.images[:150]), jnp.asarray(ds.validation.labels[:150])
    bn = jnp.asarray(ds.train.images[: 3 * 32].reshape(3, 32, *IMAGE))
    return x, y, bn


def _distinct(space, seed: int, n: int) -> np.ndarray:
    encs = np.asarray(space.sample(jax.random.key(seed), 8 * n))
    return encs[space.unique(encs)][:n]


def _masked_scores(model, params, encs, x, y, bn):
    """What the search used to score a population with shared weights: vmapped recalibration + evaluation."""
    encs = jnp.asarray(encs, jnp.int32)
    if isinstance(model, MLPSupernet):
        return pop.evaluate_shared(model.apply, params, encs, x, y, batch_size=64)
    if isinstance(model, ConvSupernet):
        stats = jax.vmap(model.recalibrate_bn, in_axes=(None, 0, None))(params, encs, bn)
        variables = {"params": pop.tile_population(params, len(encs)), "bn_stats": stats}
        return pop.evaluate_population(model.apply_recalibrated, variables, encs, x, y, batch_size=64)
    stats = model.statistics(params, encs, bn, shared=True)
    variables = {"params": pop.tile_population(params, len(encs)), "bn_stats": stats}
    return pop.evaluate_population(model.apply_eval, variables, encs, x, y, batch_size=64)


def _assert_equal_scores(got, want):
    np.testing.assert_allclose(got["loss"], np.asarray(want["loss"]), rtol=2e-5, atol=2e-5)
    n = len(_data()[1])  # equal counts of correct predictions
    np.testing.assert_array_equal(np.round(got["accuracy"] * n), np.round(np.asarray(want["accuracy"]) * n))


def test_mlp_population_equals_the_masked_vmapped_evaluation():
    space = macro_space(families=("mlp",), max_stages=2, max_depth=2, units=(8, 16, 32), dropouts=(0.0,))
    supernet = MLPSupernet(space, 64, CLASSES)
    params = _perturbed(supernet.init(jax.random.key(0)), jax.random.key(1))
    encs = _distinct(space, 2, 12)
    # Two candidates that differ only after their first stage share it (a prefix-tree node), and first blocks of
    # several widths share one matmul: both paths are exercised.
    pair = np.stack([encs[0], encs[0]])
    pair[:, space.index("stage2.depth")] = space["stage2.depth"].options.index(1)
    pair[:, space.index("stage2.activation")] = [0, 1]
    encs = np.concatenate([encs, np.asarray(space.canonicalize(jnp.asarray(pair))), encs[:1]])
    root = sized._tree([sized.ops_for(supernet, e) for e in encs])
    assert len({op.n_out for op in root.children}) > 1

    def branches(node):
        return any(len(c.children) > 1 or branches(c) for c in node.children.values())

    assert branches(root)
    x, y, _ = _data()
    got = sized.evaluate_sized(supernet, params, encs, x, y, batch_size=64)  # 150 = 2 full batches + a padded one
    _assert_equal_scores(got, _masked_scores(supernet, params, encs, x, y, None))
    assert got["loss"][-1] == got["loss"][0]


@pytest.mark.parametrize("family", ["cnn", "resnet", "mobilenet"])
def test_conv_population_with_recalibrated_batchnorm_equals_the_masked_program(family):
    space = macro_space(
        families=(family,), max_stages=2, max_depth=2, channels=(4, 8), kernels=(1, 3), expansions=(1, 2),
        activations=("relu", "gelu", "silu"), dropouts=(0.0,),
    )
    supernet = ConvSupernet(space, IMAGE, CLASSES, formulation="lax")
    params = _perturbed(supernet.init(jax.random.key(0)), jax.random.key(1))
    encs = _distinct(space, 3, 8)
    # The first blocks after the shared stem include siblings that share one first convolution at the widest.
    (stem,) = sized._tree([sized.ops_for(supernet, e) for e in encs]).children.values()
    keys = [op.linear_key for op in stem.children]
    assert len(set(keys)) < len(keys)
    x, y, bn = _data()
    got = sized.evaluate_sized(supernet, params, encs, x, y, bn_batches=bn, batch_size=75)
    _assert_equal_scores(got, _masked_scores(supernet, params, encs, x, y, bn))


def test_a_mixed_search_model_population_equals_its_masked_scores():
    space = macro_space(
        families=("mlp", "cnn"), max_stages=2, max_depth=1, channels=(4, 8), units=(8, 16), kernels=(3,),
        activations=("relu", "elu"), dropouts=(0.0,),
    )
    model = SearchModel(space, IMAGE, CLASSES)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1))
    encs = _distinct(space, 4, 10)
    families = {model.family(e) for e in encs}
    assert families == {"mlp", "cnn"}, families
    assert sized.supports(model)
    x, y, bn = _data()
    got = sized.evaluate_sized(model, params, encs, x, y, bn_batches=bn)
    _assert_equal_scores(got, _masked_scores(model, params, encs, x, y, bn))


def test_candidates_own_weights_are_scored_as_the_masked_program_scores_them():
    """shared=False (a trained population's own weights, leaves [P, ...]): per-candidate recalibrated statistics,
    as `_Trained._score` computes them through the masked program."""
    space = macro_space(
        families=("mlp", "cnn"), max_stages=2, max_depth=1, channels=(4, 8), units=(8, 16), kernels=(3,),
        activations=("relu", "elu"), dropouts=(0.0,),
    )
    model = SearchModel(space, IMAGE, CLASSES)
    encs = _distinct(space, 4, 6)
    assert {model.family(e) for e in encs} == {"mlp", "cnn"}
    params_P = jax.vmap(_perturbed)(pop.init_population(model.init, jax.random.key(0), len(encs)),
                                    jax.random.split(jax.random.key(1), len(encs)))
    x, y, bn = _data()
    got = sized.evaluate_sized(model, params_P, encs, x, y, bn_batches=bn, shared=False)
    stats = model.statistics(params_P, jnp.asarray(encs), bn, shared=False)
    want = pop.evaluate_population(model.apply_eval, {"params": params_P, "bn_stats": stats}, jnp.asarray(encs), x, y)
    _assert_equal_scores(got, want)
    # Each candidate's own weights: its score alone, with shared weights, is the same.
    alone = sized.evaluate_sized(model, jax.tree.map(lambda a: a[2], params_P), encs[2:3], x, y, bn_batches=bn)
    assert alone["loss"][0] == got["loss"][2]
    with pytest.raises(ValueError, match=r"leaves \[P = 5"):
        sized.evaluate_sized(model, params_P, encs[:5], x, y, bn_batches=bn, shared=False)


def test_new_architectures_of_seen_layer_configurations_compile_nothing():
    """Activation, norm and skip are runtime arguments of a layer program: a population of new architectures
    built from the same sizes reuses every compiled program."""
    space = macro_space(families=("mlp",), max_stages=2, max_depth=1, units=(16,), dropouts=(0.0,))
    supernet = MLPSupernet(space, 64, CLASSES)
    params = supernet.init(jax.random.key(0))
    encs = _distinct(space, 5, 40)
    depth2 = space.index("stage2.depth")
    first = np.stack([encs[encs[:, depth2] == 0][0], encs[encs[:, depth2] == 1][0]])
    later = first.copy()
    for s in ("stage1.", "stage2."):
        later[:, space.index(s + "activation")] = (first[:, space.index(s + "activation")] + 1) % 5
        later[:, space.index(s + "norm")] = 1 - first[:, space.index(s + "norm")]
    later = np.asarray(space.canonicalize(jnp.asarray(later)))
    assert not {space.to_string(e) for e in later} & {space.to_string(e) for e in first}
    x, y, _ = _data()
    sized.evaluate_sized(supernet, params, first, x, y)
    sizes = sized._run._cache_size(), sized._run_on._cache_size(), sized._linear._cache_size()
    sized.evaluate_sized(supernet, params, later, x, y)
    assert (sized._run._cache_size(), sized._run_on._cache_size(), sized._linear._cache_size()) == sizes


def test_bad_inputs_are_refused_with_the_fix():
    space = macro_space(families=("cnn",), max_stages=1, max_depth=1, channels=(4,), kernels=(3,), dropouts=(0.0,))
    supernet = ConvSupernet(space, IMAGE, CLASSES)
    params = supernet.init(jax.random.key(0))
    encs = _distinct(space, 0, 2)
    x, y, _ = _data()
    with pytest.raises(ValueError, match="bn_batches="):
        sized.evaluate_sized(supernet, params, encs, x, y)
    with pytest.raises(ValueError, match=r"\[P, n_choices\]"):
        sized.evaluate_sized(supernet, params, encs[0], x, y)
    with pytest.raises(ValueError, match="must match"):
        sized.evaluate_sized(supernet, params, encs, x, y[:3])


def test_the_sized_backend_for_a_space_it_does_not_cover_is_refused_by_the_config():
    from interop.config import ConfigError, load_config
    from jaxnas.config import RunConfig

    with pytest.raises(ConfigError, match="macro-space and language-model candidates"):
        load_config(RunConfig, None, ["space.name=nb201", "population.backend=sized"])


@pytest.mark.parametrize("old", ["train.formulation=exact", "supernet.scoring=vmapped"])
def test_the_replaced_backend_keys_say_what_replaced_them(old):
    from interop.config import ConfigError, load_config
    from jaxnas.config import RunConfig

    with pytest.raises(ConfigError, match=r"was replaced by population.backend \(exact -> sized, vmapped -> masked\)"):
        load_config(RunConfig, None, [old])
