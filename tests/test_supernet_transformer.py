"""Transformer supernet (patches and tokens), its standalone twin, and vmapped population evaluation / training.

Sizes are tiny and every supernet's apply is jitted once for the whole file (encodings are traced arguments), so
the file pays a handful of compiles: apply for the two twin supernets, one vmapped evaluation, and the training
programs of one small supernet at P = 2 and P = 1.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnas import population as pop
from jaxnas.spaces import macro_space, transformer_space
from jaxnas.supernet import TransformerSupernet, TwinTransformer

CLASSES, VOCAB, SEQ = 3, 11, 8
SPACE = transformer_space(max_layers=2, hidden=(8, 16), heads=(1, 2, 4), ffn_mults=(1, 2))
SUPERNETS = {
    "patches": TransformerSupernet(SPACE, CLASSES, input="patches", image_shape=(8, 8, 1), patch=4, pool="cls"),
    "tokens": TransformerSupernet(SPACE, CLASSES, input="tokens", vocab_size=VOCAB, seq_len=SEQ, pool="mean"),
}


def _arch(layers, hidden, norm, activation, position, heads, ffn_mult):
    arch = {"layers": layers, "hidden": hidden, "norm": norm, "activation": activation, "position": position}
    for i in range(layers):
        arch |= {f"layer{i + 1}.heads": heads[i], f"layer{i + 1}.ffn_mult": ffn_mult[i]}
    return SPACE.encode(arch)


# Every norm, activation and position option, both widths, one and two layers, every head count.
ENCODINGS = [
    _arch(2, 16, "layernorm", "gelu", "learned", (4, 2), (2, 1)),
    _arch(2, 8, "rmsnorm", "swiglu", "rope", (2, 4), (1, 2)),
    _arch(1, 16, "rmsnorm", "silu", "alibi", (4,), (2,)),
    _arch(2, 16, "layernorm", "swiglu", "alibi", (1, 4), (2, 2)),
    _arch(1, 8, "layernorm", "silu", "rope", (1,), (1,)),
    _arch(2, 16, "rmsnorm", "gelu", "rope", (2, 1), (1, 1)),
]


@functools.lru_cache
def _jitted_apply(supernet):
    """One compiled apply per supernet for the whole file (a fresh jax.jit wrapper would compile again)."""
    return jax.jit(supernet.apply, static_argnames="train")


def _perturbed(params, seed):
    """Supernet params with every leaf randomised, so norm scales / biases are not the trivial 1 / 0.

    Drawn by numpy: a jitted draw per leaf costs XLA:CPU many seconds of compiling.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape, np.float32), params)


@functools.lru_cache
def _setup(mode):
    supernet = SUPERNETS[mode]
    params = _perturbed(supernet.init(jax.random.key(0)), 1)
    rng = np.random.default_rng(2)
    if mode == "patches":
        x = rng.standard_normal((6, 8, 8, 1), np.float32)
    else:
        x = rng.integers(0, VOCAB, (6, SEQ), np.int32)
    return supernet, params, jnp.asarray(x)


# Compiled once per twin architecture; eagerly, every op of a new shape would compile on its own.
_twin_logits = nnx.jit(lambda twin, x: twin(x))


@functools.lru_cache
def _extracted(mode, i):
    supernet, params, _ = _setup(mode)
    return supernet.extract(params, ENCODINGS[i])


@pytest.mark.parametrize("mode", ["patches", "tokens"])
@pytest.mark.parametrize("i", range(len(ENCODINGS)))
def test_twin_logits_equal_masked_supernet_logits(mode, i):
    supernet, params, x = _setup(mode)
    masked = _jitted_apply(supernet)(params, ENCODINGS[i], x, train=False)
    _, twin = _extracted(mode, i)
    assert isinstance(twin, TwinTransformer)
    chex.assert_shape(masked, (6, CLASSES))
    chex.assert_trees_all_close(_twin_logits(twin, x), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["patches", "tokens"])
def test_twin_param_count_equals_analytic_count(mode):
    supernet, _, _ = _setup(mode)
    for i, enc in enumerate(ENCODINGS):
        twin_params, twin = _extracted(mode, i)
        assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == supernet.param_count(enc)
        # The twin's whole state is concrete (no abstract leftovers of its shape-only construction).
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(twin)))


def test_twin_of_shorter_token_sequences_equals_supernet():
    supernet, params, x = _setup("tokens")
    short = x[:, :5]  # learned positions take the first 5 rows
    _, twin = _extracted("tokens", 0)
    masked = _jitted_apply(supernet)(params, ENCODINGS[0], short, train=False)
    chex.assert_trees_all_close(_twin_logits(twin, short), masked, atol=1e-5, rtol=1e-5)


def test_param_count_and_macs_by_hand():
    supernet = SUPERNETS["patches"]
    enc = _arch(1, 8, "layernorm", "gelu", "learned", (2,), (2,))
    # 4 patches of 16 features + CLS = 5 tokens, hidden 8, FFN 16, 3 classes
    embed, cls, position = 16 * 8 + 8, 8, 5 * 8
    layer = 2 * 16 + 4 * (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8)
    assert supernet.param_count(enc) == embed + cls + position + layer + 16 + (8 * 3 + 3)
    assert supernet.macs(enc) == 4 * 16 * 8 + (4 * 5 * 8 * 8 + 2 * 5 * 5 * 8 + 2 * 5 * 8 * 16) + 8 * 3

    tokens = SUPERNETS["tokens"]
    swiglu = _arch(2, 16, "rmsnorm", "swiglu", "rope", (4, 1), (1, 2))
    # no embedding MACs, no position table, rmsnorm has no bias, swiglu adds the gate
    per_layer = [4 * 4 * 16 * 16 + 2 * 4 * 4 * 16 + 3 * 4 * 16 * (m * 16) for m in (1, 2)]
    assert tokens.macs(swiglu, seq_len=4) == sum(per_layer) + 16 * 3
    layers = [2 * 16 + 4 * (16 * 16 + 16) + 2 * (16 * f + f) + (f * 16 + 16) for f in (16, 32)]
    assert tokens.param_count(swiglu) == VOCAB * 16 + sum(layers) + 16 + (16 * 3 + 3)


def test_inactive_layers_are_exactly_the_identity():
    supernet, params, x = _setup("patches")
    enc = ENCODINGS[2]  # one layer of two
    poisoned = dict(params, layers=jax.tree.map(lambda a: a.at[1].set(jnp.nan), params["layers"]))  # layer 2
    apply = _jitted_apply(supernet)
    clean = apply(params, enc, x, train=False)
    assert np.array_equal(np.asarray(apply(poisoned, enc, x, train=False)), np.asarray(clean))


@pytest.mark.parametrize("mode", ["patches", "tokens"])
def test_weights_beyond_the_width_heads_and_ffn_neurons_change_nothing(mode):
    supernet, params, x = _setup(mode)
    enc = ENCODINGS[1]  # hidden 8 of 16, FFN 8 and 16 of 32

    d, big = 8, 1e6

    def beyond(path, a):
        keys = [k.key for k in path]
        if keys[0] == "layers" and keys[1] == "ffn":  # stacked [layer, ...]; FFN widths 8 and 16 (ffn_mult 1, 2)
            for i, f in enumerate((d, 2 * d)):
                rows, columns = (d, f) if keys[2] in ("up", "gate") else (f, d)
                a = a.at[i, rows:].set(big).at[i, :, columns:].set(big) if a.ndim == 3 else a.at[i, columns:].set(big)
            return a
        if keys[0] in ("embed", "position"):  # their inputs (patch features, token ids, positions) are all active
            return a.at[..., d:].set(big)
        for axis, size in enumerate(a.shape):  # every hidden axis (not the layer axis, nor the head's classes)
            if size == 2 * d and not (keys[0] == "layers" and axis == 0):
                a = a.at[(slice(None),) * axis + (slice(d, None),)].set(-big)
        return a

    changed = jax.tree_util.tree_map_with_path(beyond, params)
    apply = _jitted_apply(supernet)
    clean = apply(params, enc, x, train=False)
    assert np.array_equal(np.asarray(apply(changed, enc, x, train=False)), np.asarray(clean))


def test_head_count_changes_the_function_but_not_the_size():
    supernet, params, x = _setup("tokens")
    one, four = (_arch(1, 16, "layernorm", "gelu", "alibi", (h,), (1,)) for h in (1, 4))
    assert supernet.param_count(one) == supernet.param_count(four) and supernet.macs(one) == supernet.macs(four)
    apply = _jitted_apply(supernet)
    assert not np.allclose(apply(params, one, x, train=False), apply(params, four, x, train=False), atol=1e-3)


# ------------------------------------------------------------------------------------------------ population
def test_shared_weight_evaluation_equals_each_candidate_alone():
    supernet, params, _ = _setup("tokens")
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, VOCAB, (20, SEQ), np.int32), rng.integers(0, CLASSES, 20, np.int32)
    encs = np.stack(ENCODINGS)
    together = pop.evaluate_shared(supernet.apply, params, encs, x, y, batch_size=8)  # 20 = 2 * 8 + 4
    chex.assert_shape([together["loss"], together["accuracy"]], [(len(encs),), (len(encs),)])
    apply = _jitted_apply(supernet)
    for p, enc in enumerate(encs):
        logits = apply(params, enc, x, train=False)
        accuracy = np.mean(np.argmax(np.asarray(logits), -1) == y)
        loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
        np.testing.assert_allclose(together["accuracy"][p], accuracy, atol=1e-6)
        np.testing.assert_allclose(together["loss"][p], loss, rtol=1e-5)


# Fewer options than SPACE: the vmapped training programs are the file's most expensive compiles.
TRAIN_SPACE = transformer_space(
    max_layers=2,
    hidden=(8, 16),
    heads=(1, 2),
    ffn_mults=(1, 2),
    norms=("layernorm",),
    activations=("gelu", "swiglu"),
    positions=("learned", "alibi"),
)
TRAIN_SUPERNET = TransformerSupernet(TRAIN_SPACE, CLASSES, input="patches", image_shape=(8, 8, 1), patch=4, dropout=0.1)


def _train(params, encs, keys, x, y):
    return pop.train_population(
        TRAIN_SUPERNET.apply, params, encs, OPTIMIZER, x[:48], y[:48], x[48:], y[48:], epochs=1, batch_size=16,
        seed=3, keys=keys,
    )


# SGD, not Adam: Adam would blow float noise in zero gradients (the key bias has one) up to full-size steps.
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def test_population_training_is_finite_and_equals_training_a_candidate_alone():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 8, 8, 1), np.float32), rng.integers(0, CLASSES, 64, np.int32)
    encs = TRAIN_SPACE.sample(jax.random.key(2), 2)
    params = pop.init_population(TRAIN_SUPERNET.init, jax.random.key(3), 2)
    keys = pop.candidate_keys(jax.random.key(4), 2)
    together = _train(params, encs, keys, x, y)
    assert list(together.status) == ["ok", "ok"]
    chex.assert_shape(together.train_loss, (1, 2))
    assert np.isfinite(together.train_loss).all()
    alone = _train(jax.tree.map(lambda a: a[1:], params), encs[1:], keys[1:], x, y)
    chex.assert_trees_all_close(alone.params, jax.tree.map(lambda a: a[1:], together.params), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(alone.train_loss[:, 0], together.train_loss[:, 1], rtol=1e-5)
    assert not np.allclose(np.asarray(together.params["head"]["kernel"]), np.asarray(params["head"]["kernel"]))


def test_sandwich_ends_are_valid_and_bound_the_sizes():
    tight = transformer_space(max_layers=2, hidden=(6, 8), heads=(1, 2, 4), positions=("learned", "alibi"))
    supernet = TransformerSupernet(tight, CLASSES, input="tokens", vocab_size=VOCAB, seq_len=SEQ)
    sampler = pop.SubnetSampler(tight, 8, "sandwich", supernet.largest, supernet.smallest)
    encs = np.asarray(sampler(jax.random.key(0)))
    assert np.asarray(tight.is_valid(encs)).all()
    assert supernet.arch(encs[0]).layers == 2 and supernet.arch(encs[0]).hidden == 8
    assert supernet.arch(encs[1]).layers == 1 and supernet.arch(encs[1]).hidden == 6
    random = np.asarray(tight.sample(jax.random.key(1), 8))
    small, large = np.asarray(supernet.smallest(random)), np.asarray(supernet.largest(random))
    assert np.asarray(tight.is_valid(small)).all() and np.asarray(tight.is_valid(large)).all()
    for s, e, b in zip(small, random, large):
        assert supernet.param_count(s) <= supernet.param_count(e) <= supernet.param_count(b)
    four_heads = tight.encode({"layers": 1, "hidden": 8, "norm": "rmsnorm", "activation": "gelu", "position": "alibi",
                               "layer1.heads": 4, "layer1.ffn_mult": 2})
    assert supernet.arch(supernet.smallest(four_heads)).heads == (2,)  # 4 does not divide 6: the nearest that does


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input": "patches", "image_shape": (8, 8, 1), "patch": 3}, "divide the image height and width"),
        ({"input": "patches", "image_shape": (8, 8, 1)}, "needs image_shape"),
        ({"input": "tokens", "vocab_size": VOCAB}, "needs vocab_size >= 1 and seq_len >= 1"),
        ({"input": "tokens", "vocab_size": VOCAB, "seq_len": SEQ, "patch": 4}, "are for input='patches'"),
        ({"input": "pixels"}, "input must be one of"),
        ({"input": "tokens", "vocab_size": VOCAB, "seq_len": SEQ, "pool": "max"}, "pool must be one of"),
        ({"input": "tokens", "vocab_size": VOCAB, "seq_len": SEQ, "dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
    ],
)
def test_bad_configurations_are_rejected_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerSupernet(SPACE, CLASSES, **kwargs)


def test_spaces_the_supernet_cannot_build_are_rejected():
    with pytest.raises(ValueError, match="needs a transformer space"):
        TransformerSupernet(macro_space(families=("mlp",)), CLASSES, input="tokens", vocab_size=VOCAB, seq_len=SEQ)
    odd = transformer_space(max_layers=1, hidden=(6, 8), heads=(1, 2))
    with pytest.raises(ValueError, match=r"hidden / heads must be even; \(hidden, heads\) = \[\(6, 2\)\]"):
        TransformerSupernet(odd, CLASSES, input="tokens", vocab_size=VOCAB, seq_len=SEQ)


def test_apply_rejects_inputs_it_was_not_built_for():
    patches, params, _ = _setup("patches")
    with pytest.raises(ValueError, match=r"image_shape=\(16, 16, 1\)"):
        patches.apply(params, ENCODINGS[0], jnp.ones((2, 16, 16, 1)), train=False)
    tokens, params, x = _setup("tokens")
    with pytest.raises(ValueError, match="integer token ids"):
        tokens.apply(params, ENCODINGS[0], x.astype(jnp.float32), train=False)
    with pytest.raises(ValueError, match="exceed seq_len=8"):
        tokens.apply(params, ENCODINGS[0], jnp.zeros((2, 9), jnp.int32), train=False)
    with pytest.raises(ValueError, match="seq_len applies to input='tokens'"):
        patches.macs(ENCODINGS[0], seq_len=4)
    with pytest.raises(ValueError, match="needs a PRNG key"):  # checked before any parameter is read
        TRAIN_SUPERNET.apply({}, ENCODINGS[0], jnp.ones((2, 8, 8, 1)), train=True)
