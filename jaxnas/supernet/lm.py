"""The language-model space as one masked causal supernet, and its exact standalone twin with incremental decoding.

Supernet layout (``D`` = the space's largest ``hidden``, ``N`` = its largest ``heads``, ``F`` = D x the largest
``ffn_mult``, ``T`` <= seq_len tokens)::

    tokens [B, T] int32 -> embedding [vocab, D] (+ learned position embedding [seq_len, D], position learned)
    layer i = 1 .. max_layers (one `lax.scan` over weights stacked [max_layers, ...]), pre-norm:
        h = h + out(mixer(norm1(h)))      one set of weights per mixer in the space (`lax.switch` picks one):
            attention, linear:  query [D, D], key [D, D], value [D, D], out [D, D], all + bias
            recurrent:          value, gate_in, gate_out, out [D, D] + bias, decay [D]
        h = h + down(act(norm2(h)))       up [D, F], gate [D, F] (swiglu, geglu), down [F, D], all + bias
        h = layer(h) if i <= layers else h        (an inactive layer is exactly the identity)
    norm(h) @ embedding^T -> logits [B, T, vocab]          (weight-tied output head, no bias)

Masking is the transformer supernet's: the residual stream keeps exact zeros beyond ``hidden``, every linear
output into it is re-masked, norms take statistics over the active features only, FFN neurons beyond
``ffn_mult * hidden`` are zeroed before ``down``; norm, activation, mixer and position are `jnp.where` /
`lax.switch` selections of a traced encoding, so one compiled program serves every architecture.

Heads: head_dim = hidden / heads. The twin's key / value projections have ``kv_heads * head_dim`` outputs, kv
head j serving query heads j * group .. (j + 1) * group - 1 (group = heads / kv_heads; kv_heads = heads is
multi-head attention, 1 multi-query). The supernet keeps key / value [D, D] and uses their first
``kv_heads * head_dim`` columns: it gathers, for each query feature f, the key / value feature of the same
position in its kv head (a traced index), which puts keys and values into the query layout; from there the
transformer supernet's head-assignment matrix ``A [D, N]`` applies unchanged.

Mixers (all causal: the output at t reads tokens <= t only):

- ``attention``: softmax(q k^T / sqrt(head_dim) + ALiBi, keys s > t masked) v.
- ``linear``: causal linear attention with features phi = elu + 1 (Katharopoulos et al. 2020):
  y_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / sum_{s<=t} phi(q_t) . phi(k_s). Parallel form: a masked T x T
  matrix; recurrent form: state S += phi(k) v^T [head_dim, head_dim] and normaliser z += phi(k) per kv head.
  With RoPE the numerator's features are rotated and the denominator's are not (RoFormer's linear-attention
  form), so the denominator stays positive.
- ``recurrent``: a gated linear recurrence with a learned per-channel decay a = sigmoid(decay):
  h_t = a h_{t-1} + (1 - a) sigmoid(gate_in x_t) value(x_t), y_t = out(silu(gate_out x_t) h_t). Parallel form:
  `lax.associative_scan` over t; step form: one multiply-add per channel. It takes no position encoding.

Positions as in the transformer supernet (RoPE on q, k with m counted within the head; ALiBi slope_h =
2^(-8 (h + 1) / heads) times -(t - s), softmax attention only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.spaces import Space
from jaxnas.spaces.lm import ATTENTION_MIXERS, LMArch
from jaxnas.supernet.transformer import (
    Stream,
    dropout_on,
    dropped,
    ffn_inner,
    transformer_init,
    twin_norm,
    alibi_distances,
    alibi_slopes,
    rope_angles,
    rotate_pairs,
)
from jaxnas.supernet.weights import concrete_rngs

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "silu", "swiglu", "geglu")
MIXERS = ("attention", "linear", "recurrent")
POSITIONS = ("learned", "rope", "alibi")
RECURRENT_PROJECTIONS = ("value", "gate_in", "gate_out", "out")


# ---------------------------------------------------------------------------------------------- shared maths
def elu_features(x: jax.Array) -> jax.Array:
    """Linear attention's positive feature map phi(x) = elu(x) + 1."""
    return jax.nn.elu(x) + 1.0


def causal(seq_len: int) -> jax.Array:
    """bool [T, T]: query t may read key s (s <= t)."""
    return jnp.tril(jnp.ones((seq_len, seq_len), bool))


def rope_at(position: jax.Array, features: jax.Array, head_dim: int, base: float) -> jax.Array:
    """[F] angles of one (traced) position: row ``position`` of `rope_angles`, bit for bit (t x inverse frequency)."""
    return jnp.asarray(position, jnp.float32) * rope_angles(2, features, head_dim, base)[1]


def linear_attention(q, k, v, q_num, k_num) -> jax.Array:
    """Parallel causal linear attention: [B, T, K, G, E] from features q, q_num [B, T, K, G, E] and k, k_num, v
    [B, T, K, E] (K kv heads, G query heads per kv head); ``*_num`` are the numerator's (rotated) features."""
    mask = causal(q.shape[1])
    den = jnp.where(mask, jnp.einsum("btkge,bske->bkgts", q, k), 0.0).sum(-1, keepdims=True)
    num = jnp.where(mask, jnp.einsum("btkge,bske->bkgts", q_num, k_num), 0.0)
    return jnp.einsum("bkgts,bske->btkge", num / den, v)


def linear_attention_step(state, q, k, v, q_num, k_num):
    """Recurrent form of `linear_attention` for one token: ``(state, y)`` with state = (S [B, K, E, E], z [B, K, E])
    the running sums of k_num v^T and k; q, q_num [B, K, G, E], k, k_num, v [B, K, E] -> y [B, K, G, E]."""
    s, z = state
    s = s + k_num[..., :, None] * v[..., None, :]
    z = z + k
    num = jnp.einsum("bkge,bkef->bkgf", q_num, s)
    return (s, z), num / jnp.einsum("bkge,bke->bkg", q, z)[..., None]


def linear_recurrence(a: jax.Array, u: jax.Array) -> jax.Array:
    """h [B, T, C] with h_t = a_t h_{t-1} + u_t, h_{-1} = 0, over axis 1 of u [B, T, C] (a broadcast to u).

    Parallel form (`lax.associative_scan`: log T depth); the step form is ``a * h + u``.
    """

    def combine(first, second):
        (a1, u1), (a2, u2) = first, second
        return a1 * a2, a2 * u1 + u2

    return jax.lax.associative_scan(combine, (jnp.broadcast_to(a, u.shape), u), axis=1)[1]


def decay_logits(width: int) -> jax.Array:
    """[width] initial recurrent decay logits: channel f decays by a = sigmoid(logit) = 1 - 2^-(1 + f mod 8), time
    scales 1 / (1 - a) of 2 .. 256 tokens repeating every 8 channels, so every hidden size gets all of them."""
    return jnp.log(jnp.exp2(1.0 + jnp.arange(width) % 8) - 1.0)


# ---------------------------------------------------------------------------------------------- twin
class _TwinHeads(nnx.Module):
    """Causal softmax or linear attention with kv_heads key / value heads (see the module docstring)."""

    def __init__(self, hidden, heads, kv_heads, kind, position, rope_base, rngs):
        head_dim = hidden // heads
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, kv_heads * head_dim, rngs=rngs)
        self.value = nnx.Linear(hidden, kv_heads * head_dim, rngs=rngs)
        self.out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.kind, self.position, self.rope_base = kind, position, rope_base

    def _rotate(self, x, angles):
        return rotate_pairs(x, angles[..., : x.shape[-1]]) if self.position == "rope" else x

    def _slopes(self):
        """[K, G, 1] ALiBi slopes of the query heads grouped by kv head."""
        return alibi_slopes(self.heads, self.heads).reshape(self.kv_heads, -1, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, hidden = x.shape
        k_, g, e = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q, k, v = self.query(x), self.key(x), self.value(x)
        angles = rope_angles(t, jnp.arange(hidden), e, self.rope_base)
        if self.kind == "attention":
            q, k = self._rotate(q, angles), self._rotate(k, angles)
            scores = jnp.einsum("btkge,bske->bkgts", q.reshape(b, t, k_, g, e), k.reshape(b, t, k_, e))
            scores = scores / jnp.sqrt(jnp.float32(e))
            if self.position == "alibi":
                scores = scores + self._slopes()[..., None] * alibi_distances(t)
            weights = jax.nn.softmax(jnp.where(causal(t), scores, -jnp.inf), -1)
            mixed = jnp.einsum("bkgts,bske->btkge", weights, v.reshape(b, t, k_, e))
        else:
            q, k = elu_features(q), elu_features(k)
            q_num, k_num = self._rotate(q, angles), self._rotate(k, angles)
            q, q_num = (a.reshape(b, t, k_, g, e) for a in (q, q_num))
            k, v, k_num = (a.reshape(b, t, k_, e) for a in (k, v, k_num))
            mixed = linear_attention(q, k, v, q_num, k_num)
        return self.out(mixed.reshape(b, t, hidden))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """attention: keys and values [B, max_len, kv_heads, head_dim]; linear: S and z per kv head."""
        k_, e = self.kv_heads, self.head_dim
        if self.kind == "attention":
            return {"key": jnp.zeros((batch, max_len, k_, e)), "value": jnp.zeros((batch, max_len, k_, e))}
        return {"state": jnp.zeros((batch, k_, e, e)), "norm": jnp.zeros((batch, k_, e))}

    def step(self, cache: dict, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, dict]:
        """The output [B, hidden] for token x [B, hidden] at position ``pos`` and the updated cache."""
        b, hidden = x.shape
        k_, g, e = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q, k, v = self.query(x), self.key(x), self.value(x)
        angles = rope_at(pos, jnp.arange(hidden), e, self.rope_base)
        if self.kind == "attention":
            q, k = self._rotate(q, angles), self._rotate(k, angles)
            keys = cache["key"].at[:, pos].set(k.reshape(b, k_, e))
            values = cache["value"].at[:, pos].set(v.reshape(b, k_, e))
            scores = jnp.einsum("bkge,bske->bkgs", q.reshape(b, k_, g, e), keys) / jnp.sqrt(jnp.float32(e))
            s = jnp.arange(keys.shape[1])
            if self.position == "alibi":
                scores = scores + self._slopes() * -(jnp.asarray(pos, jnp.float32) - s.astype(jnp.float32))
            weights = jax.nn.softmax(jnp.where(s <= pos, scores, -jnp.inf), -1)
            mixed, cache = jnp.einsum("bkgs,bske->bkge", weights, values), {"key": keys, "value": values}
        else:
            q, k = elu_features(q), elu_features(k)
            q_num, k_num = self._rotate(q, angles), self._rotate(k, angles)
            q, q_num = (a.reshape(b, k_, g, e) for a in (q, q_num))
            k, v, k_num = (a.reshape(b, k_, e) for a in (k, v, k_num))
            (state, norm), mixed = linear_attention_step((cache["state"], cache["norm"]), q, k, v, q_num, k_num)
            cache = {"state": state, "norm": norm}
        return self.out(mixed.reshape(b, hidden)), cache


class _TwinRecurrent(nnx.Module):
    """The gated linear recurrence (see the module docstring)."""

    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)
        self.gate_in = nnx.Linear(hidden, hidden, rngs=rngs)
        self.gate_out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.decay = nnx.Param(decay_logits(hidden))

    def _inputs(self, x):
        a = jax.nn.sigmoid(self.decay[...])
        return a, (1.0 - a) * jax.nn.sigmoid(self.gate_in(x)) * self.value(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.silu(self.gate_out(x)) * linear_recurrence(*self._inputs(x)))

    def init_cache(self, batch: int, max_len: int) -> dict:
        return {"state": jnp.zeros((batch, self.out.out_features))}

    def step(self, cache: dict, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, dict]:
        a, u = self._inputs(x)
        state = a * cache["state"] + u
        return self.out(jax.nn.silu(self.gate_out(x)) * state), {"state": state}


class _TwinFFN(nnx.Module):
    def __init__(self, hidden: int, neurons: int, activation: str, gated: bool, rngs: nnx.Rngs):
        self.up = nnx.Linear(hidden, neurons, rngs=rngs)
        self.gate = nnx.Linear(hidden, neurons, rngs=rngs) if gated else None
        self.down = nnx.Linear(neurons, hidden, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = None if self.gate is None else self.gate(x)
        return self.down(ffn_inner(self.activation)(self.up(x), gate))


class _TwinLayer(nnx.Module):
    def __init__(self, arch: LMArch, i: int, rope_base: float, rngs: nnx.Rngs):
        d = arch.hidden
        self.norm1 = twin_norm(arch.norm, d, rngs)
        if arch.mixer == "recurrent":
            self.mixer = _TwinRecurrent(d, rngs)
        else:
            self.mixer = _TwinHeads(d, arch.heads[i], arch.kv_heads[i], arch.mixer, arch.position, rope_base, rngs)
        self.norm2 = twin_norm(arch.norm, d, rngs)
        self.ffn = _TwinFFN(d, arch.ffn_mult[i] * d, arch.activation, arch.gated, rngs)


class TwinLM(nnx.Module):
    """The compact standalone causal language model of one `lm_space` architecture: real widths, only its layers.

    ``twin(tokens, rngs=None) -> logits [B, T, vocab]`` for int32 token ids [B, T] (T <= ``positions`` with learned
    positions); dropout is active only after ``twin.train()``, drawing from ``rngs``. Incremental decoding:
    ``cache = twin.init_cache(batch, max_len)``, then ``logits, cache = twin.decode_step(cache, token)`` per token
    [B]; the logits equal the full forward's at that position. `generate` runs both.

    Args:
      arch: the architecture.
      vocab_size: number of token ids (the embedding is also the output head).
      positions: rows of the learned position table (the longest sequence).
      dropout, rope_base: as in `LMSupernet`.
    """

    def __init__(
        self,
        arch: LMArch,
        *,
        vocab_size: int,
        positions: int,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        rngs: nnx.Rngs,
    ):
        d = arch.hidden
        self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
        self.position = nnx.Param(jnp.zeros((positions, d))) if arch.position == "learned" else None
        self.layers = nnx.List([_TwinLayer(arch, i, rope_base, rngs) for i in range(arch.layers)])
        self.norm = twin_norm(arch.norm, d, rngs)
        self.dropout = nnx.Dropout(dropout, deterministic=True)

    def __call__(self, tokens: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.embed(tokens)
        if self.position is not None:
            h = h + self.position[...][: h.shape[1]]
        drop = self.dropout if rngs is None else functools.partial(self.dropout, rngs=rngs)
        for layer in self.layers:
            h = h + drop(layer.mixer(layer.norm1(h)))
            h = h + drop(layer.ffn(layer.norm2(h)))
        return self.embed.attend(self.norm(h))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Decoding state for ``batch`` sequences of up to ``max_len`` tokens: ``{"pos": int32 [], "layers": (...)}``
        with per layer a KV cache (attention, kv_heads not heads), running sums (linear) or the recurrent state."""
        if self.position is not None and max_len > self.position[...].shape[0]:
            raise ValueError(f"max_len={max_len} exceeds the {self.position[...].shape[0]} learned positions")
        layers = tuple(layer.mixer.init_cache(batch, max_len) for layer in self.layers)
        return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

    def decode_step(self, cache: dict, token: jax.Array) -> tuple[jax.Array, dict]:
        """``(logits [B, vocab], cache)`` for the next token int [B] of every sequence, at position cache["pos"]."""
        pos = cache["pos"]
        h = self.embed(token)
        if self.position is not None:
            h = h + self.position[...][pos]
        layers = []
        for layer, layer_cache in zip(self.layers, cache["layers"], strict=True):
            mixed, layer_cache = layer.mixer.step(layer_cache, layer.norm1(h), pos)
            h = h + mixed
            h = h + layer.ffn(layer.norm2(h))
            layers.append(layer_cache)
        return self.embed.attend(self.norm(h)), {"pos": pos + 1, "layers": tuple(layers)}

    def generate(
        self, prompt: jax.Array, n_new: int, *, key: jax.Array | None = None, temperature: float = 0.0
    ) -> jax.Array:
        """int32 [B, P + n_new]: ``prompt`` [B, P] followed by ``n_new`` tokens decoded with the cache, greedily
        (temperature 0) or sampled from softmax(logits / temperature) with ``key``."""
        if temperature > 0.0 and key is None:
            raise ValueError("sampling with temperature > 0 needs a PRNG key; pass key=jax.random.key(seed)")
        prompt = jnp.asarray(prompt, jnp.int32)
        cache = self.init_cache(prompt.shape[0], prompt.shape[1] + n_new)

        def feed(cache, token):
            logits, cache = self.decode_step(cache, token)
            return cache, logits

        cache, logits = jax.lax.scan(feed, cache, prompt.T)

        def sample(carry, step_key):
            cache, logits = carry
            if temperature > 0.0:
                token = jax.random.categorical(step_key, logits / temperature).astype(jnp.int32)
            else:
                token = jnp.argmax(logits, -1).astype(jnp.int32)
            cache, logits = feed(cache, token)
            return (cache, logits), token

        keys = jax.random.split(key if key is not None else jax.random.key(0), n_new)
        _, new = jax.lax.scan(sample, (cache, logits[-1]), keys)
        return jnp.concatenate([prompt, new.T], 1)


# ---------------------------------------------------------------------------------------------- supernet
def _is(space: Space, enc: jax.Array, name: str, option: str) -> jax.Array | bool:
    """Whether choice ``name`` of ``enc`` is ``option``: a traced bool, or a Python bool when it is fixed."""
    if name not in space.names or option not in space[name].options:
        return False
    options = space[name].options
    if len(options) == 1:
        return True
    return enc[space.index(name)] == options.index(option)


def _scores(q: jax.Array, k: jax.Array, assign: jax.Array) -> jax.Array:
    """[B, N, T, T]: per head slot, q [B, T, D] . k [B, T, D] over the slot's own features (assign [D, N])."""
    return jnp.einsum("btfh,bsf->bhts", q[..., None] * assign, k)


def _mix(weights: jax.Array, v: jax.Array, assign: jax.Array) -> jax.Array:
    """[B, T, D]: each head slot's weights [B, N, T, T] applied to v [B, T, D], written to its own features."""
    return jnp.einsum("bthf,fh->btf", jnp.einsum("bhts,bsf->bthf", weights, v), assign)


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


@dataclasses.dataclass(frozen=True)
class LMSupernet:
    """Weight-sharing causal supernet of an `lm_space` (layout, head and mixer schemes in the module docstring).

    Hashable, so its bound ``apply`` can be a static argument of `jax.jit`.

    Attributes:
      space: an `lm_space`; its options must be among NORMS / ACTIVATIONS / MIXERS / POSITIONS.
      vocab_size: number of token ids (the output head is the embedding, transposed).
      seq_len: the longest token sequence (inputs may be shorter); sizes the learned position table.
      dropout: rate on every residual branch output, in training only.
      rope_base: RoPE's frequency base.
    """

    space: Space
    vocab_size: int
    seq_len: int
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if not {"layers", "hidden", "norm", "activation", "mixer", "layer1.ffn_mult"} <= set(self.space.names):
            raise ValueError(f"LMSupernet needs an lm space, got {self.space!r}; build one with lm_space()")
        for name, known in (("norm", NORMS), ("activation", ACTIVATIONS), ("mixer", MIXERS), ("position", POSITIONS)):
            unknown = set(self.space[name].options) - set(known) if name in self.space.names else set()
            if unknown:
                raise ValueError(f"the space's {name} options {sorted(unknown)} are not supported; choose from {known}")
        if self.vocab_size < 1 or self.seq_len < 1:
            raise ValueError(f"vocab_size and seq_len must be >= 1, got {self.vocab_size} and {self.seq_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if "position" in self.space.names and "rope" in self.space["position"].options:
            odd = [(d, n) for d, n in self._width_heads() if (d // n) % 2]
            if odd:
                raise ValueError(
                    f"RoPE rotates feature pairs, so every head dimension hidden / heads must be even; "
                    f"(hidden, heads) = {odd} give odd ones. Drop those sizes or 'rope' from the space's positions"
                )

    # ------------------------------------------------------------------ sizes
    @property
    def attends(self) -> bool:
        """Whether the space has an attention mixer (and hence heads, kv_heads and positions)."""
        return "layer1.heads" in self.space.names

    def _width_heads(self) -> list[tuple[int, int]]:
        """Every (hidden, heads) pair the space allows."""
        heads = self.space["layer1.heads"].options if self.attends else ()
        return [(d, n) for d in self.space["hidden"].options for n in heads if d % n == 0]

    @property
    def max_layers(self) -> int:
        return max(self.space["layers"].options)

    @property
    def max_hidden(self) -> int:
        return max(self.space["hidden"].options)

    @property
    def max_heads(self) -> int:
        return max(self.space["layer1.heads"].options) if self.attends else 1

    @property
    def max_ffn(self) -> int:
        return self.max_hidden * max(self.space["layer1.ffn_mult"].options)

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Supernet parameters, a plain dict pytree: ``{"embed": {"embedding"}, "position"?, "layers": {"norm1",
        "attention"?, "linear"?, "recurrent"?, "norm2", "ffn"}, "norm"}`` (one mixer entry per mixer in the space),
        every ``layers`` leaf stacked [max_layers, ...]. Initialised as the transformer supernet's (one flat draw),
        recurrent decays by `decay_logits`."""
        return self._compiled_init()(key)

    @functools.cache  # noqa: B019 - the supernet is a small frozen value; one compiled init per distinct supernet
    def _compiled_init(self) -> Callable[[jax.Array], dict]:
        def init(key):
            params = transformer_init(key, self._shapes())
            if "recurrent" in params["layers"]:
                decay = jnp.broadcast_to(decay_logits(self.max_hidden), (self.max_layers, self.max_hidden))
                params["layers"]["recurrent"]["decay"] = decay
            return params

        return jax.jit(init)

    def _shapes(self) -> dict:
        def stacked(*shape):
            return jax.ShapeDtypeStruct((self.max_layers, *shape), jnp.float32)

        def linear(i, o):
            return {"kernel": stacked(i, o), "bias": stacked(o)}

        def f32(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.float32)

        def norm(new=stacked):
            bias = {"bias": new(d)} if "layernorm" in self.space["norm"].options else {}
            return {"scale": new(d)} | bias

        d, f = self.max_hidden, self.max_ffn
        mixers = self.space["mixer"].options
        ffn = {"up": linear(d, f), "down": linear(f, d)}
        if {"swiglu", "geglu"} & set(self.space["activation"].options):
            ffn["gate"] = linear(d, f)
        layers = {"norm1": norm(), "norm2": norm(), "ffn": ffn}
        for mixer in ATTENTION_MIXERS:
            if mixer in mixers:
                layers[mixer] = {name: linear(d, d) for name in ("query", "key", "value", "out")}
        if "recurrent" in mixers:
            layers["recurrent"] = {name: linear(d, d) for name in RECURRENT_PROJECTIONS} | {"decay": stacked(d)}
        shapes = {"embed": {"embedding": f32(self.vocab_size, d)}, "layers": layers, "norm": norm(f32)}
        if self.attends and "learned" in self.space["position"].options:
            shapes["position"] = f32(self.seq_len, d)
        return shapes

    # ------------------------------------------------------------------ apply
    def _position_is(self, enc: jax.Array, option: str) -> jax.Array | bool:
        """Whether ``enc`` uses position encoding ``option`` (never with the recurrent mixer, where it is inactive)."""
        position, recurrent = _is(self.space, enc, "position", option), _is(self.space, enc, "mixer", "recurrent")
        if position is False or recurrent is True:
            return False
        return position if recurrent is False else position & ~recurrent

    def _check_inputs(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"LMSupernet takes integer token ids [B, T], got shape {tokens.shape} and dtype {tokens.dtype}; "
                "pass tokens.astype(jnp.int32)"
            )
        if tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"sequences of {tokens.shape[1]} tokens exceed seq_len={self.seq_len}; truncate them or build the "
                f"supernet with seq_len={tokens.shape[1]}"
            )

    def apply(self, params: dict, enc: jax.Array, tokens: jax.Array, *, train: bool, key: jax.Array | None = None):
        """logits [B, T, vocab] float32 of the subnet ``enc`` int32 [n_choices] on token ids int32 [B, T]; the
        logits at t depend on tokens <= t only.

        Pure and jit/vmap-able over (params, enc). ``key`` drives dropout, needed only when ``train`` and the
        supernet's dropout > 0.
        """
        self._check_inputs(tokens)
        dropping = dropout_on(train, self.dropout, key)
        drop = functools.partial(dropped, rate=self.dropout)
        space = self.space
        stream = Stream.of(space.value(enc, "hidden"), self.max_hidden, _is(space, enc, "norm", "layernorm"))
        hidden, feature, mask, norm, masked = stream.hidden, stream.feature, stream.mask, stream.norm, stream.masked

        h = jnp.take(params["embed"]["embedding"], tokens, axis=0)
        t = h.shape[1]
        if "position" in params:
            h = jnp.where(self._position_is(enc, "learned"), h + params["position"][:t], h)
        h = masked(h)
        layer_keep = None
        if dropping:
            # One flat draw for every dropout site, as in the transformer supernet (one random-bit program).
            keep = jax.random.uniform(key, (2 * self.max_layers * h.size,)) >= self.dropout
            layer_keep = keep.reshape(self.max_layers, 2, *h.shape)

        layer_numbers = range(1, self.max_layers + 1)
        ones = jnp.ones(self.max_layers, jnp.int32)
        per_layer = {
            "heads": jnp.stack([space.value(enc, f"layer{i}.heads") for i in layer_numbers]) if self.attends else ones,
            "kv_heads": jnp.stack([space.value(enc, f"layer{i}.kv_heads") for i in layer_numbers])
            if self.attends
            else ones,
            "neurons": jnp.stack([space.value(enc, f"layer{i}.ffn_mult") for i in layer_numbers]) * hidden,
            "exists": jnp.arange(self.max_layers) < space.value(enc, "layers"),
            "keep": layer_keep,  # [max_layers, 2 (mixer, FFN), B, T, D] or None
        }
        context = (enc, hidden, feature, mask)
        mixers = [functools.partial(getattr(self, f"_mixer_{name}"), context) for name in space["mixer"].options]
        mixer_index = enc[space.index("mixer")]
        act_index = enc[space.index("activation")]
        activations = [ffn_inner(name) for name in space["activation"].options]
        neuron = jnp.arange(self.max_ffn)

        def layer(h, inputs):
            p, c = inputs
            keep_mixer, keep_ffn = (None, None) if c["keep"] is None else c["keep"]
            mixed = jax.lax.switch(mixer_index, mixers, p, norm(h, p["norm1"]), c["heads"], c["kv_heads"])
            out = h + drop(masked(mixed), keep_mixer)
            z = norm(out, p["norm2"])
            gate = _dense(p["ffn"]["gate"], z) if "gate" in p["ffn"] else None
            inner = jax.lax.switch(act_index, activations, _dense(p["ffn"]["up"], z), gate)
            inner = jnp.where(neuron < c["neurons"], inner, 0.0)
            out = out + drop(masked(_dense(p["ffn"]["down"], inner)), keep_ffn)
            return jnp.where(c["exists"], out, h), None

        h, _ = jax.lax.scan(layer, h, (params["layers"], per_layer))
        return norm(h, params["norm"]) @ params["embed"]["embedding"].T

    def _heads_layout(self, p, a, context, heads, kv_heads):
        """q, k, v [B, T, D] in the query layout (each query feature's own key / value feature), the head assignment
        A [D, N], the head dimension and the RoPE angles [T, D]."""
        enc, hidden, feature, mask = context
        head_dim = hidden // heads
        group = jnp.maximum(heads // kv_heads, 1)  # >= 1 also for the placeholder counts of inactive choices
        source = (feature // head_dim // group) * head_dim + feature % head_dim
        q = _dense(p["query"], a)
        k = jnp.take(_dense(p["key"], a), source, axis=-1)
        v = jnp.take(_dense(p["value"], a), source, axis=-1)
        slot = jnp.arange(self.max_heads)
        assign = (mask[:, None] & (feature[:, None] // head_dim == slot[None, :])).astype(a.dtype)
        return q, k, v, assign, head_dim, rope_angles(a.shape[1], feature, head_dim, self.rope_base)

    def _rotated(self, enc, x, angles):
        rope = self._position_is(enc, "rope")
        return x if rope is False else jnp.where(rope, rotate_pairs(x, angles), x)

    def _mixer_attention(self, context, p, a, heads, kv_heads):
        """Causal softmax attention of a [B, T, D]."""
        enc = context[0]
        q, k, v, assign, head_dim, angles = self._heads_layout(p["attention"], a, context, heads, kv_heads)
        q, k = self._rotated(enc, q, angles), self._rotated(enc, k, angles)
        t = a.shape[1]
        scores = _scores(q, k, assign) / jnp.sqrt(head_dim.astype(jnp.float32))
        alibi = self._position_is(enc, "alibi")
        if alibi is not False:
            bias = alibi_slopes(self.max_heads, heads)[:, None, None] * alibi_distances(t)
            scores = jnp.where(alibi, scores + bias, scores)
        weights = jax.nn.softmax(jnp.where(causal(t), scores, -jnp.inf), -1)
        return _dense(p["attention"]["out"], _mix(weights, v, assign))

    def _mixer_linear(self, context, p, a, heads, kv_heads):
        """Causal linear attention of a [B, T, D] (parallel form)."""
        enc = context[0]
        q, k, v, assign, _, angles = self._heads_layout(p["linear"], a, context, heads, kv_heads)
        q, k = elu_features(q), elu_features(k)
        mask = causal(a.shape[1])
        den_scores = jnp.where(mask, _scores(q, k, assign), 0.0)
        num = den_scores
        rope = self._position_is(enc, "rope")
        if rope is not False:
            rotated = jnp.where(mask, _scores(rotate_pairs(q, angles), rotate_pairs(k, angles), assign), 0.0)
            num = jnp.where(rope, rotated, den_scores)
        # Head slots beyond heads own no features: their denominator is 0, replaced so no NaN reaches a gradient.
        owned = (jnp.arange(self.max_heads) < heads)[:, None, None]
        den = jnp.where(owned, den_scores.sum(-1, keepdims=True), 1.0)
        return _dense(p["linear"]["out"], _mix(num / den, v, assign))

    def _mixer_recurrent(self, context, p, a, heads, kv_heads):
        """The gated linear recurrence of a [B, T, D] (parallel form)."""
        mask = context[3]
        p = p["recurrent"]
        decay = jax.nn.sigmoid(p["decay"])
        u = jnp.where(mask, (1.0 - decay) * jax.nn.sigmoid(_dense(p["gate_in"], a)) * _dense(p["value"], a), 0.0)
        return _dense(p["out"], jax.nn.silu(_dense(p["gate_out"], a)) * linear_recurrence(decay, u))

    # ------------------------------------------------------------------ architectures
    def largest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: ``enc`` with the most layers, the largest hidden size and FFN multiplier in every
        layer (norm, activation, mixer, position kept; heads kept where they divide the new hidden size, else the
        nearest that does, and kv_heads likewise for the heads). Jit-able; the "largest" end of the sandwich rule."""
        return self._with_size(enc, pick=max)

    def smallest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: one layer of the smallest hidden size and FFN multiplier (the sandwich's small
        end; heads and kv_heads repaired as in `largest`)."""
        return self._with_size(enc, pick=min)

    def _with_size(self, enc, pick):
        space = self.space
        enc = jnp.asarray(enc, jnp.int32)
        layers, hidden = space["layers"].options, space["hidden"].options
        enc = enc.at[..., space.index("layers")].set(layers.index(pick(layers)))
        enc = enc.at[..., space.index("hidden")].set(hidden.index(pick(hidden)))
        for i in range(1, self.max_layers + 1):
            mults = space[f"layer{i}.ffn_mult"].options
            enc = enc.at[..., space.index(f"layer{i}.ffn_mult")].set(mults.index(pick(mults)))
        if self.attends:
            heads, kv = space["layer1.heads"].options, space["layer1.kv_heads"].options
            # Static repair tables: an option index -> itself if allowed, else the nearest allowed one.
            head_repair = jnp.asarray(_repair([pick(hidden) % n == 0 for n in heads]))
            kv_repair = jnp.asarray([_repair([n % m == 0 for m in kv]) for n in heads])  # [heads option, kv option]
            for i in range(1, self.max_layers + 1):
                h_col, kv_col = space.index(f"layer{i}.heads"), space.index(f"layer{i}.kv_heads")
                enc = enc.at[..., h_col].set(head_repair[enc[..., h_col]])
                enc = enc.at[..., kv_col].set(kv_repair[enc[..., h_col], enc[..., kv_col]])
        return space.canonicalize(enc)

    def arch(self, enc: jax.Array) -> LMArch:
        """Typed view of a valid ``enc`` [n_choices] (ValueError naming the bad choice otherwise)."""
        return LMArch.from_encoding(self.space, np.asarray(enc))

    def param_count(self, enc: jax.Array) -> int:
        """Analytic parameter count of the candidate (= the scalars of its twin's parameters).

        The token table (also the output head), the learned position table, per layer two norms (layernorm: scale
        + bias; rmsnorm: scale), the mixer (attention / linear: query and out [d, d] + bias, key and value
        [d, kv_heads head_dim] + bias; recurrent: four [d, d] + bias and the decay [d]), FFN up / down (and gate for
        swiglu / geglu) kernels + biases; the final norm.
        """
        arch = self.arch(enc)
        d = arch.hidden
        norm = 2 * d if arch.norm == "layernorm" else d
        total = self.vocab_size * d + (self.seq_len * d if arch.position == "learned" else 0)
        for i, mult in enumerate(arch.ffn_mult):
            f = mult * d
            if arch.mixer == "recurrent":
                mixer = 4 * (d * d + d) + d
            else:
                kv = arch.kv_heads[i] * (d // arch.heads[i])
                mixer = 2 * (d * d + d) + 2 * (d * kv + kv)
            total += 2 * norm + mixer + (2 if arch.gated else 1) * (d * f + f) + (f * d + d)
        return total + norm

    def macs_per_token(self, enc: jax.Array, seq_len: int | None = None) -> int:
        """Analytic multiply-accumulates per token of the candidate's own matmuls, averaged over a sequence of
        ``seq_len`` tokens (default the supernet's).

        Per layer: projections (attention / linear: query and out 2 d^2, key and value 2 d kv_heads head_dim;
        recurrent: 4 d^2); causal softmax attention's scores and values 2 d (t + 1) at token t, on average
        d (seq_len + 1); linear attention's recurrent form: the state update kv_heads head_dim^2, its read-out
        heads head_dim^2 and the normaliser heads head_dim, independent of the length; the FFN 2 d f (3 d f
        gated); then the tied head d x vocab. Element-wise work (norms, activations, the recurrence, RoPE, ALiBi,
        softmax) and the embedding lookup are not counted, as usual for MACs.
        """
        arch = self.arch(enc)
        tokens = self.seq_len if seq_len is None else seq_len
        if not 1 <= tokens <= self.seq_len:
            raise ValueError(f"seq_len must lie in 1 .. {self.seq_len} (the supernet's), got {seq_len}")
        d = arch.hidden
        total = 0
        for i, mult in enumerate(arch.ffn_mult):
            total += (3 if arch.gated else 2) * d * mult * d
            if arch.mixer == "recurrent":
                total += 4 * d * d
                continue
            heads, e = arch.heads[i], d // arch.heads[i]
            total += 2 * d * d + 2 * d * arch.kv_heads[i] * e
            if arch.mixer == "attention":
                total += d * (tokens + 1)
            else:
                total += arch.kv_heads[i] * e * e + heads * e * e + heads * e
        return total + d * self.vocab_size

    def kv_bytes_per_token(self, enc: jax.Array, dtype_bytes: int = 4) -> int:
        """Bytes the decoding cache grows by per token: keys and values of every layer, 2 kv_heads head_dim
        dtype_bytes each, for softmax attention; 0 for linear attention and the recurrence, whose state is fixed
        (see `state_bytes`)."""
        arch = self.arch(enc)
        if arch.mixer != "attention":
            return 0
        return sum(2 * kv * (arch.hidden // n) * dtype_bytes for n, kv in zip(arch.heads, arch.kv_heads, strict=True))

    def state_bytes(self, enc: jax.Array, dtype_bytes: int = 4) -> int:
        """Bytes of the fixed-size decoding state per sequence: linear attention's S [head_dim, head_dim] and
        z [head_dim] per kv head, the recurrence's h [hidden] per layer; 0 for softmax attention."""
        arch = self.arch(enc)
        if arch.mixer == "recurrent":
            return arch.layers * arch.hidden * dtype_bytes
        if arch.mixer == "attention":
            return 0
        sizes = [(kv, arch.hidden // n) for n, kv in zip(arch.heads, arch.kv_heads, strict=True)]
        return sum(kv * (e * e + e) * dtype_bytes for kv, e in sizes)

    # ------------------------------------------------------------------ twin
    def extract(self, params: dict, enc: jax.Array) -> tuple[dict, TwinLM]:
        """The standalone twin of ``enc`` [n_choices]: ``(twin_params, twin)``.

        ``twin`` is a `TwinLM` holding the supernet weights sliced to the candidate's sizes (the chosen mixer's
        weights only, key / value to kv_heads head_dim columns, inactive layers left out); ``twin_params`` is its
        parameter state as a plain dict. Its logits equal ``apply(params, enc, tokens, train=False)`` up to float
        summation order.
        """
        arch = self.arch(enc)
        d = arch.hidden
        twin = nnx.eval_shape(
            lambda: TwinLM(
                arch, vocab_size=self.vocab_size, positions=self.seq_len, dropout=self.dropout,
                rope_base=self.rope_base, rngs=nnx.Rngs(0),
            )
        )

        def linear(p, n_in, n_out):
            return {"kernel": p["kernel"][:n_in, :n_out], "bias": p["bias"][:n_out]}

        def norm(p):
            return {"scale": p["scale"][:d]} | ({"bias": p["bias"][:d]} if arch.norm == "layernorm" else {})

        layers = {}
        for i, mult in enumerate(arch.ffn_mult):
            p, f = jax.tree.map(lambda a, i=i: a[i], params["layers"]), mult * d
            ffn = {"up": linear(p["ffn"]["up"], d, f), "down": linear(p["ffn"]["down"], f, d)}
            if arch.gated:
                ffn["gate"] = linear(p["ffn"]["gate"], d, f)
            m = p[arch.mixer]
            if arch.mixer == "recurrent":
                mixer = {name: linear(m[name], d, d) for name in RECURRENT_PROJECTIONS} | {"decay": m["decay"][:d]}
            else:
                kv = arch.kv_heads[i] * (d // arch.heads[i])
                mixer = {"query": linear(m["query"], d, d), "key": linear(m["key"], d, kv)}
                mixer |= {"value": linear(m["value"], d, kv), "out": linear(m["out"], d, d)}
            layers[i] = {"norm1": norm(p["norm1"]), "mixer": mixer, "norm2": norm(p["norm2"]), "ffn": ffn}
        sliced = {"embed": {"embedding": params["embed"]["embedding"][:, :d]}, "layers": layers}
        sliced["norm"] = norm(params["norm"])
        if arch.position == "learned":
            sliced["position"] = params["position"][:, :d]
        state = nnx.state(twin, nnx.Param)
        state.replace_by_pure_dict(sliced)
        nnx.update(twin, state)
        return state.to_pure_dict(), concrete_rngs(twin)

    def embed(self, params: dict, enc: jax.Array, twin_params: dict) -> dict:
        """The inverse of `extract`: ``params`` (one candidate's supernet weights) with the slices ``enc``'s twin
        reads replaced by ``twin_params`` (a twin's parameter state as a plain dict, e.g. after training it on its
        own); every other weight is left as it is, so ``extract`` of the result gives ``twin_params`` back."""
        arch = self.arch(enc)
        d = arch.hidden

        def linear(p, q, i=None):
            n_in, n_out = q["kernel"].shape
            at = (slice(None),) if i is None else (i,)
            return {"kernel": p["kernel"].at[(*at, slice(0, n_in), slice(0, n_out))].set(q["kernel"]),
                    "bias": p["bias"].at[(*at, slice(0, n_out))].set(q["bias"])}

        def norm(p, q, i=None):
            at = () if i is None else (i,)
            return {name: p[name].at[(*at, slice(0, d))].set(q[name]) if name in q else p[name] for name in p}

        out = jax.tree.map(lambda a: a, params)  # a new dict tree; arrays are immutable
        out["embed"] = {"embedding": params["embed"]["embedding"].at[:, :d].set(twin_params["embed"]["embedding"])}
        out["norm"] = norm(params["norm"], twin_params["norm"])
        if arch.position == "learned":
            out["position"] = params["position"].at[:, :d].set(twin_params["position"])
        layers = out["layers"]
        for i in range(arch.layers):
            q = twin_params["layers"][i]
            for name in ("norm1", "norm2"):
                layers[name] = norm(layers[name], q[name], i)
            for name, sub in q["ffn"].items():
                layers["ffn"][name] = linear(layers["ffn"][name], sub, i)
            mixer = layers[arch.mixer]
            for name, sub in q["mixer"].items():
                if name == "decay":
                    mixer["decay"] = mixer["decay"].at[i, :d].set(sub)
                else:
                    mixer[name] = linear(mixer[name], sub, i)
        return out


def _repair(allowed: list[bool]) -> list[int]:
    """Option index -> itself if allowed, else the nearest allowed index (ties to the lower)."""
    ok = np.flatnonzero(allowed)
    return [i if allowed[i] else int(ok[np.argmin(np.abs(ok - i))]) for i in range(len(allowed))]
