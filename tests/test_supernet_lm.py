"""Causal LM space and supernet: causality, twin == masked supernet, GQA, both forms of each mixer, cached decoding.

Sizes are tiny and the supernet's apply is jitted once for the whole file (encodings are traced arguments); each
twin architecture compiles its full forward and its token-by-token decoding once.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnas.spaces import LMArch, lm_space
from jaxnas.supernet import LMSupernet, TwinLM
from jaxnas.supernet.lm import linear_attention, linear_attention_step, linear_recurrence

VOCAB, SEQ, BATCH = 11, 8, 3
SPACE = lm_space(max_layers=2, hidden=(8, 16), heads=(1, 2, 4), kv_heads=(1, 2, 4), ffn_mults=(1, 2))
SUPERNET = LMSupernet(SPACE, VOCAB, SEQ)


def _arch(layers, hidden, norm, activation, mixer, position=None, heads=(), kv_heads=(), ffn_mult=(1, 1)):
    arch = {"layers": layers, "hidden": hidden, "norm": norm, "activation": activation, "mixer": mixer}
    arch |= {} if position is None else {"position": position}
    for i in range(layers):
        arch |= {f"layer{i + 1}.ffn_mult": ffn_mult[i]}
        if mixer != "recurrent":
            arch |= {f"layer{i + 1}.heads": heads[i], f"layer{i + 1}.kv_heads": kv_heads[i]}
    return SPACE.encode(arch)


# Every mixer x position pair, every norm and activation, both widths, one and two layers, MHA / GQA / MQA.
ENCODINGS = [
    _arch(2, 16, "layernorm", "gelu", "attention", "learned", (4, 2), (2, 2), (2, 1)),
    _arch(2, 8, "rmsnorm", "swiglu", "attention", "rope", (2, 4), (1, 4), (1, 2)),
    _arch(1, 16, "rmsnorm", "geglu", "attention", "alibi", (4,), (1,), (2,)),
    _arch(2, 16, "layernorm", "silu", "linear", "learned", (2, 1), (1, 1), (1, 2)),
    _arch(1, 8, "rmsnorm", "geglu", "linear", "rope", (4,), (2,), (2,)),
    _arch(2, 16, "layernorm", "swiglu", "recurrent", ffn_mult=(2, 1)),
    _arch(1, 8, "rmsnorm", "gelu", "recurrent", ffn_mult=(1,)),
]
SAMPLED = [np.asarray(e) for e in SPACE.sample(jax.random.key(7), 3)]


@functools.lru_cache
def _apply():
    """One compiled apply for the whole file, with a trace counter (a fresh jax.jit wrapper would compile again)."""
    traces = []

    def apply(params, enc, tokens):
        traces.append(1)
        return SUPERNET.apply(params, enc, tokens, train=False)

    return jax.jit(apply), traces


@functools.lru_cache
def _setup():
    """Supernet params with every leaf perturbed (norm scales / biases not the trivial 1 / 0), and tokens.

    Drawn by numpy: a jitted draw per leaf costs XLA:CPU many seconds of compiling.
    """
    rng = np.random.default_rng(1)
    params = SUPERNET.init(jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape, np.float32), params)
    return params, jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ), np.int32))


@functools.lru_cache
def _extracted(enc: tuple):
    return SUPERNET.extract(_setup()[0], np.array(enc))


_twin_logits = nnx.jit(lambda twin, tokens: twin(tokens))


@nnx.jit
def _decoded_logits(twin, tokens):
    """[B, T, vocab]: decode_step fed one token at a time from an empty cache."""

    def feed(cache, token):
        logits, cache = twin.decode_step(cache, token)
        return cache, logits

    _, logits = jax.lax.scan(feed, twin.init_cache(*tokens.shape), tokens.T)
    return logits.transpose(1, 0, 2)


def _name(enc):
    arch = LMArch.from_encoding(SPACE, enc)
    return f"{arch.mixer}-{arch.position}-{arch.norm}-{arch.activation}-{arch.hidden}"


# ------------------------------------------------------------------------------------------------ the space
def test_operators_respect_the_head_and_position_rules():
    pop = SPACE.sample(jax.random.key(1), 64)
    keys = jax.random.split(jax.random.key(2), 64)
    mutated = jax.jit(jax.vmap(SPACE.mutate))(keys, pop, np.ones(64, np.float32))
    crossed = jax.jit(jax.vmap(SPACE.crossover))(keys, pop, mutated)
    views = [LMArch.from_encoding(SPACE, e) for batch in (pop, mutated, crossed) for e in np.asarray(batch)]
    assert all(a.hidden % h == 0 and h % kv == 0 for a in views for h, kv in zip(a.heads, a.kv_heads, strict=True))
    assert all(a.position != "alibi" or a.mixer == "attention" for a in views)
    assert all((a.position is None) == (a.mixer == "recurrent") for a in views)
    assert {a.mixer for a in views} == {"attention", "linear", "recurrent"}
    with pytest.raises(ValueError, match=r"'layer1.kv_heads' = 2 is not allowed with layer1.heads = 1"):
        _arch(1, 8, "rmsnorm", "gelu", "attention", "learned", (1,), (2,), (1,))
    with pytest.raises(ValueError, match=r"'position' = alibi is not allowed with mixer = linear"):
        _arch(1, 8, "rmsnorm", "gelu", "linear", "alibi", (1,), (1,), (1,))


# ------------------------------------------------------------------------------------------------ supernet
@pytest.mark.parametrize("enc", ENCODINGS, ids=_name)
def test_logits_at_t_depend_only_on_tokens_up_to_t(enc):
    params, tokens = _setup()
    apply, _ = _apply()
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % VOCAB)
    before, after = np.asarray(apply(params, enc, tokens)), np.asarray(apply(params, enc, changed))
    chex.assert_shape(before, (BATCH, SEQ, VOCAB))
    np.testing.assert_allclose(after[:, :5], before[:, :5], atol=1e-6, rtol=0)
    assert not np.allclose(after[:, 5:], before[:, 5:], atol=1e-3)


@pytest.mark.parametrize("enc", ENCODINGS + SAMPLED, ids=_name)
def test_twin_logits_equal_masked_supernet_logits(enc):
    params, tokens = _setup()
    apply, _ = _apply()
    twin_params, twin = _extracted(tuple(enc))
    assert isinstance(twin, TwinLM)
    chex.assert_trees_all_close(_twin_logits(twin, tokens), apply(params, enc, tokens), atol=1e-5, rtol=1e-5)
    assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == SUPERNET.param_count(enc)
    # Shorter sequences: learned positions take the first rows.
    chex.assert_trees_all_close(
        _twin_logits(twin, tokens[:, :5]), apply(params, enc, tokens)[:, :5], atol=1e-5, rtol=1e-5
    )


def test_apply_compiles_once_for_every_encoding():
    params, tokens = _setup()
    apply, traces = _apply()
    for enc in (ENCODINGS[0], ENCODINGS[4], ENCODINGS[5]):
        apply(params, enc, tokens)
    assert len(traces) == 1


@pytest.mark.parametrize("enc", ENCODINGS, ids=_name)
def test_cached_decoding_equals_the_full_forward_at_every_position(enc):
    _, tokens = _setup()
    _, twin = _extracted(tuple(enc))
    chex.assert_trees_all_close(_decoded_logits(twin, tokens), _twin_logits(twin, tokens), atol=1e-5, rtol=1e-5)


def test_cache_stores_kv_heads_not_heads_and_fixed_states():
    cache = _extracted(tuple(ENCODINGS[1]))[1].init_cache(BATCH, SEQ)  # hidden 8: heads (2, 4), kv_heads (1, 4)
    chex.assert_shape([c["key"] for c in cache["layers"]], [(BATCH, SEQ, 1, 4), (BATCH, SEQ, 4, 2)])
    linear = _extracted(tuple(ENCODINGS[4]))[1].init_cache(BATCH, SEQ)  # hidden 8, 4 heads, 2 kv heads
    chex.assert_shape([linear["layers"][0]["state"], linear["layers"][0]["norm"]], [(BATCH, 2, 2, 2), (BATCH, 2, 2)])
    recurrent = _extracted(tuple(ENCODINGS[5]))[1].init_cache(BATCH, SEQ)
    chex.assert_shape([c["state"] for c in recurrent["layers"]], [(BATCH, 16)] * 2)


def test_greedy_generation_continues_with_the_full_forwards_argmax():
    _, tokens = _setup()
    _, twin = _extracted(tuple(ENCODINGS[1]))  # rope, GQA
    out = np.asarray(twin.generate(tokens[:, :3], 5))
    chex.assert_shape(out, (BATCH, 8))
    np.testing.assert_array_equal(out[:, :3], tokens[:, :3])
    full = np.asarray(_twin_logits(twin, jnp.asarray(out)))
    np.testing.assert_array_equal(out[:, 3:], full[:, 2:7].argmax(-1))
    sampled = [np.asarray(twin.generate(tokens[:, :3], 5, key=jax.random.key(4), temperature=1.0)) for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert ((sampled[0] >= 0) & (sampled[0] < VOCAB)).all()


def test_training_gradients_are_finite_and_reach_only_the_chosen_mixer():
    dropping = LMSupernet(SPACE, VOCAB, SEQ, dropout=0.2)
    params, tokens = _setup()

    def loss(params, enc, key):
        logits = dropping.apply(params, enc, tokens[:, :-1], train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    for enc in (ENCODINGS[1], ENCODINGS[4], ENCODINGS[5]):  # attention (GQA, rope), linear (rope), recurrent
        value, grads = value_and_grad(params, enc, jax.random.key(0))
        assert np.isfinite(value) and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))
        for mixer in ("attention", "linear", "recurrent"):
            moved = any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads["layers"][mixer]))
            assert moved == (mixer == SUPERNET.arch(enc).mixer)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        dropping.apply(params, ENCODINGS[0], tokens, train=True)


def test_a_recurrent_only_space_has_no_heads_or_positions():
    space = lm_space(max_layers=1, hidden=(8,), mixers=("recurrent",))
    assert not {"position", "layer1.heads", "layer1.kv_heads"} & set(space.names)
    supernet = LMSupernet(space, VOCAB, SEQ)
    enc = space.encode({"layers": 1, "hidden": 8, "norm": "rmsnorm", "activation": "silu", "mixer": "recurrent",
                        "layer1.ffn_mult": 2})
    params, tokens = supernet.init(jax.random.key(1)), _setup()[1]
    twin_params, twin = supernet.extract(params, enc)
    assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == supernet.param_count(enc)
    masked = supernet.apply(params, enc, tokens, train=False)
    chex.assert_trees_all_close(_twin_logits(twin, tokens), masked, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the mixers
def test_gqa_with_kv_heads_equal_to_heads_is_plain_multi_head_attention():
    _, twin = _extracted(tuple(ENCODINGS[2]))  # 1 layer, hidden 16, 4 heads
    mha = _extracted(tuple(_arch(1, 16, "rmsnorm", "geglu", "attention", "alibi", (4,), (4,), (2,))))[1]
    attn = mha.layers[0].mixer
    x = np.random.default_rng(3).standard_normal((BATCH, SEQ, 16)).astype(np.float32)

    def project(linear):
        return (x @ np.asarray(linear.kernel[...]) + np.asarray(linear.bias[...])).reshape(BATCH, SEQ, 4, 4)

    q, k, v = project(attn.query), project(attn.key), project(attn.value)
    t = np.arange(SEQ)
    slopes = 2.0 ** (-8.0 * np.arange(1, 5) / 4)
    scores = np.einsum("bthe,bshe->bhts", q, k) / 2.0 - slopes[:, None, None] * (t[:, None] - t[None, :])
    scores = np.where(t[None, :] <= t[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    mixed = np.einsum("bhts,bshe->bthe", weights / weights.sum(-1, keepdims=True), v).reshape(BATCH, SEQ, 16)
    expected = mixed @ np.asarray(attn.out.kernel[...]) + np.asarray(attn.out.bias[...])
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), expected, atol=1e-5, rtol=1e-5)

    # GQA is MHA whose key / value heads repeat within each group: copy the GQA twin's weights into the MHA twin.
    def repeated(p):
        kernel = np.repeat(np.asarray(p["kernel"]).reshape(16, 1, 4), 4, 1).reshape(16, 16)
        return {"kernel": kernel, "bias": np.tile(np.asarray(p["bias"]), 4)}

    gqa_params = nnx.state(twin, nnx.Param).to_pure_dict()
    mixer = gqa_params["layers"][0]["mixer"]
    mixer |= {"key": repeated(mixer["key"]), "value": repeated(mixer["value"])}
    state = nnx.state(mha, nnx.Param)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, gqa_params))
    _, tokens = _setup()
    copy = nnx.merge(nnx.graphdef(mha), state)
    chex.assert_trees_all_close(_twin_logits(copy, tokens), _twin_logits(twin, tokens), atol=1e-5, rtol=1e-5)


def test_linear_attention_parallel_form_equals_its_recurrent_form():
    rng = np.random.default_rng(4)
    b, t, k, g, e = 2, 6, 2, 3, 4
    q, q_num = jnp.asarray(rng.uniform(0.1, 2.0, (2, b, t, k, g, e)), jnp.float32)
    key, key_num, v = jnp.asarray(rng.uniform(0.1, 2.0, (3, b, t, k, e)), jnp.float32)
    q_num, key_num = q_num - 1.0, key_num - 1.0  # rotated numerator features may be negative
    state, steps = (jnp.zeros((b, k, e, e)), jnp.zeros((b, k, e))), []
    for i in range(t):
        state, y = linear_attention_step(state, q[:, i], key[:, i], v[:, i], q_num[:, i], key_num[:, i])
        steps.append(y)
    parallel = linear_attention(q, key, v, q_num, key_num)
    chex.assert_trees_all_close(parallel, jnp.stack(steps, 1), atol=1e-5, rtol=1e-5)


def test_recurrence_parallel_form_equals_its_step_form():
    rng = np.random.default_rng(5)
    a = rng.uniform(0.3, 1.0, 5).astype(np.float32)
    u = rng.standard_normal((2, 9, 5)).astype(np.float32)
    h, steps = np.zeros((2, 5), np.float32), []
    for i in range(9):
        h = a * h + u[:, i]
        steps.append(h)
    chex.assert_trees_all_close(linear_recurrence(jnp.asarray(a), jnp.asarray(u)), np.stack(steps, 1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ sizes
def test_counts_by_hand():
    gqa = ENCODINGS[1]  # hidden 8, heads (2, 4), kv (1, 4), ffn (1, 2), swiglu, rmsnorm, rope
    head_dims, kvs = (4, 2), (1, 4)
    layers = [2 * 8 + 2 * (64 + 8) + 2 * (8 * kv * e + kv * e) + 2 * (8 * f + f) + (f * 8 + 8)
              for kv, e, f in zip(kvs, head_dims, (8, 16))]
    assert SUPERNET.param_count(gqa) == VOCAB * 8 + sum(layers) + 8
    macs = [3 * 8 * f + 2 * 64 + 2 * 8 * kv * e + 8 * (4 + 1) for kv, e, f in zip(kvs, head_dims, (8, 16))]
    assert SUPERNET.macs_per_token(gqa, seq_len=4) == sum(macs) + 8 * VOCAB
    assert SUPERNET.kv_bytes_per_token(gqa) == 2 * (1 * 4 + 4 * 2) * 4
    assert SUPERNET.state_bytes(gqa) == 0
    linear = ENCODINGS[4]  # hidden 8, 4 heads of 2, 2 kv heads
    assert SUPERNET.kv_bytes_per_token(linear) == 0 and SUPERNET.state_bytes(linear, 2) == 2 * (4 + 2) * 2
    assert SUPERNET.macs_per_token(linear, 2) == SUPERNET.macs_per_token(linear, 8)  # linear in the length
    recurrent = ENCODINGS[5]  # hidden 16, two layers
    assert SUPERNET.kv_bytes_per_token(recurrent) == 0 and SUPERNET.state_bytes(recurrent) == 2 * 16 * 4


def test_sandwich_ends_are_valid_and_bound_the_sizes():
    random = np.asarray(SPACE.sample(jax.random.key(6), 16))
    small, large = np.asarray(SUPERNET.smallest(random)), np.asarray(SUPERNET.largest(random))
    assert np.asarray(SPACE.is_valid(small)).all() and np.asarray(SPACE.is_valid(large)).all()
    for s, e, b in zip(small, random, large, strict=True):
        assert SUPERNET.param_count(s) <= SUPERNET.param_count(e) <= SUPERNET.param_count(b)
        assert SUPERNET.arch(s).mixer == SUPERNET.arch(e).mixer == SUPERNET.arch(b).mixer
    four = _arch(1, 16, "rmsnorm", "gelu", "attention", "rope", (4,), (4,), (1,))
    assert SUPERNET.arch(SUPERNET.smallest(four)).heads == (4,)  # 4 divides 8: kept
    assert SUPERNET.arch(SUPERNET.largest(ENCODINGS[6])).layers == 2


def test_bad_configurations_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"hidden / heads must be even; \(hidden, heads\) = \[\(6, 2\)\]"):
        LMSupernet(lm_space(max_layers=1, hidden=(6, 8), heads=(1, 2)), VOCAB, SEQ)
    params, tokens = _setup()
    with pytest.raises(ValueError, match="exceed seq_len=8"):
        SUPERNET.apply(params, ENCODINGS[0], jnp.zeros((2, 9), jnp.int32), train=False)
    with pytest.raises(ValueError, match="exceeds the 8 learned positions"):
        _extracted(tuple(ENCODINGS[0]))[1].init_cache(1, 9)
