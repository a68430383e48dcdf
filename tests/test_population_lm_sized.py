"""The sized backend of language models (`jaxnas.population.lm_sized`): each candidate's twin trained on its own
gives the masked population's numbers (same batches, optimiser, early stopping, failures), written back into the
supernet layout by `LMSupernet.embed`, the inverse of `extract`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from interop.config import load_config
from jaxnas import population as pop
from jaxnas.config import RunConfig
from jaxnas.data import load_text
from jaxnas.population import lm_sized
from jaxnas.search.models import build_space, model_for
from jaxnas.supernet import LMSupernet

SPACE = ["space.name=lm", "data.name=text:pydoc", "space.max_layers=2", "space.hidden=[8,16]", "space.heads=[2]",
         "space.kv_heads=[1,2]", "space.ffn_mults=[1,2]", "space.mixers=[attention,linear,recurrent]",
         "space.positions=[learned,rope,alibi]", "space.lm_activations=[gelu,swiglu]"]
OPTIMIZER = optax.adam(3e-3)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(RunConfig, None, SPACE)
    space = build_space(cfg.space)
    data = load_text("text:pydoc", seq_len=8, train_stride=4096)
    model = model_for(space, cfg.space, (8,), 256)
    encs = np.asarray(space.sample(jax.random.key(4), 4))
    params = pop.init_population(model.init, jax.random.key(0), 4)
    arrays = tuple(jnp.asarray(a) for a in (data.train.inputs, data.train.targets, data.validation.inputs[:64],
                                              data.validation.targets[:64]))
    return space, model, encs, params, arrays


def test_every_mixer_is_in_the_population(setup):
    space, _, encs, _, _ = setup
    assert {space.decode(e)["mixer"] for e in encs} == {"attention", "linear", "recurrent"}


def test_sized_training_equals_the_masked_population(setup):
    _, model, encs, params, data = setup
    noise = (data[2], jnp.asarray(np.random.default_rng(0).integers(0, 256, data[3].shape), jnp.int32))
    kw = dict(epochs=3, batch_size=16, seed=2, patience=1)
    masked = pop.train_population(model.apply, params, encs, OPTIMIZER, data[0], data[1], *noise, monitor="loss",
                                  **kw)
    sized = lm_sized.train_lm_sized(model, params, encs, OPTIMIZER, data[0], data[1], *noise, **kw)
    np.testing.assert_allclose(sized.history, masked.history, rtol=1e-5)
    np.testing.assert_allclose(sized.train_loss, masked.train_loss, rtol=1e-5)
    np.testing.assert_array_equal(sized.status, masked.status)
    np.testing.assert_array_equal(sized.best_epoch, masked.best_epoch)
    chex.assert_trees_all_close(sized.params, masked.params, atol=2e-3)  # Adam's steps of nearly equal gradients
    after = pop.evaluate_population(model.apply, sized.params, encs, *noise)
    np.testing.assert_allclose(-np.asarray(after["loss"]), sized.history[-1], rtol=1e-4)


def test_a_diverging_candidate_fails_alone(setup):
    _, model, encs, params, data = setup
    poisoned = jax.tree.map(lambda a: a.at[1].set(jnp.nan), params)
    kw = dict(epochs=1, batch_size=16, seed=2)
    clean = lm_sized.train_lm_sized(model, params, encs, OPTIMIZER, *data, **kw)
    result = lm_sized.train_lm_sized(model, poisoned, encs, OPTIMIZER, *data, **kw)
    assert list(result.status) == ["ok", "failed", "ok", "ok"]
    for p in (0, 2, 3):
        chex.assert_trees_all_equal(jax.tree.map(lambda a, p=p: a[p], result.params),
                                    jax.tree.map(lambda a, p=p: a[p], clean.params))


def test_embed_is_the_inverse_of_extract_and_leaves_the_rest(setup):
    space, model, encs, params, _ = setup
    sn = model.supernet
    for p, enc in enumerate(encs):
        one = jax.tree.map(lambda a, p=p: a[p], params)
        twin_params, _ = sn.extract(one, enc)
        bumped = jax.tree.map(lambda a: a + 1.0, twin_params)
        back = sn.embed(one, enc, bumped)
        chex.assert_trees_all_close(sn.extract(back, enc)[0], bumped)
        # exactly the twin's slices changed: their count is the twin's parameter count
        changed = sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(one)))
        assert changed == sum(a.size for a in jax.tree.leaves(twin_params)) == sn.param_count(enc)


def test_dropout_and_an_optimiser_state_are_refused(setup):
    space, model, encs, params, data = setup
    with pytest.raises(TypeError, match="without dropout"):
        lm_sized.train_lm_sized(LMSupernet(space, vocab_size=256, seq_len=8, dropout=0.1), params, encs, OPTIMIZER,
                                *data, epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="starts every optimiser state fresh"):
        lm_sized.train_lm_sized(model, params, encs, OPTIMIZER, *data, epochs=1, batch_size=16,
                                opt_state=jax.vmap(OPTIMIZER.init)(params))
