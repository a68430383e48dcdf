"""The transformer space as one masked supernet (ViT-style patches or token ids), and its exact standalone twin.

Supernet layout (``D`` = the space's largest ``hidden``, ``N`` = its largest ``heads``, ``F`` = D x the largest
``ffn_mult``, ``T`` = sequence length, one more with a CLS token)::

    patches: x [B, H, W, C] -> patch x patch patches [B, T, patch^2 C] -> linear [patch^2 C, D] + bias
    tokens:  x [B, T] int32 -> embedding [vocab, D]
    (pool "cls": a learned CLS token [D] is prepended) -> + learned position embedding [T, D] (position learned)
    layer i = 1 .. max_layers (one `lax.scan` over weights stacked [max_layers, ...]), pre-norm:
        h = h + out(attention(norm1(h)))          q, k, v, out: [D, D] + bias; RoPE on q, k / ALiBi on scores
        h = h + down(act(norm2(h)))               up [D, F], gate [D, F] (swiglu), down [F, D], all + bias
        h = layer(h) if i <= layers else h        (an inactive layer is exactly the identity)
    norm(h) -> mean over tokens (pool "mean") or the CLS token (pool "cls") -> dropout -> head [D, classes]

Elastic choices are masks. The residual stream keeps exact zeros beyond ``hidden``, every linear output into it
is re-masked, and norms take their statistics over the active features only, so weights beyond the width meet
only zeros. FFN neurons beyond ``ffn_mult * hidden`` are zeroed before ``down``. Norm, activation and position
encoding are `jnp.where` / `lax.switch` selections (layernorm: scale and bias; rmsnorm: the same scale, no bias).
The layers are scanned rather than unrolled, so a deep supernet compiles one layer body (compile time, not run
time, dominates small searches on CPU); per-layer choices (heads, FFN width, existence) are the scan's inputs.

Heads: the head dimension is ``hidden / heads`` of each layer, as in an ordinary transformer of width
``hidden``, so the twin splits its [hidden, hidden] projections into ``heads`` contiguous groups and nothing
else. In the supernet, feature f < hidden belongs to head ``f // (hidden / heads)``; a 0/1 assignment matrix
``A [D, N]`` weights the contraction over features, so head slot h's scores sum exactly its own features
(every other term is an exact zero) and it writes its attention-weighted values only into its own features.
Slots ``h >= heads`` own no features and contribute nothing. The price of a head dimension that changes with
the encoding inside one compiled program is N times the largest model's score / value work; `macs` counts the
candidate's own. Scores are scaled by 1 / sqrt(hidden / heads) and attention is bidirectional.

Positions: "learned" adds an embedding row per token; "rope" rotates interleaved feature pairs (2m, 2m + 1) of
each head of q and k by angle t * base^(-2m / head_dim), m counted within the head (head_dim must be even);
"alibi" adds -slope_h * |t - s| to head h's scores with slope_h = 2^(-8 (h + 1) / heads) (the paper's geometric
sequence for every head count, symmetric for an encoder). Token t is the position index, the CLS token 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.spaces import Space, TransformerArch
from jaxnas.supernet.mlp import ACTIVATION_FNS
from jaxnas.supernet.weights import concrete_rngs

INPUTS = ("patches", "tokens")
POOLS = ("mean", "cls")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "silu", "swiglu")
POSITIONS = ("learned", "rope", "alibi")
NORM_EPSILON = 1e-5
EMBEDDING_STD = 0.02  # token, position and CLS embeddings, as in BERT / ViT


# ---------------------------------------------------------------------------------------------- shared maths
def patchify(x: jax.Array, patch: int) -> jax.Array:
    """[B, (H / patch) (W / patch), patch^2 C]: non-overlapping patches of x [B, H, W, C], row-major, each
    flattened in (row, column, channel) order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def rope_angles(seq_len: int, features: jax.Array, head_dim: jax.Array | int, base: float) -> jax.Array:
    """[T, F] rotation angles t * base^(-2m / head_dim) of features int [F], m = (f mod head_dim) // 2.

    Features are given by their index in the (concatenated-heads) projection, so the supernet (dynamic
    head_dim) and the twin (static) evaluate the same expression.
    """
    local = features % head_dim
    even = (local - local % 2).astype(jnp.float32)
    inv_freq = jnp.power(jnp.float32(base), -even / jnp.asarray(head_dim, jnp.float32))
    return jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]


def rotate_pairs(x: jax.Array, angles: jax.Array) -> jax.Array:
    """RoPE of x [..., T, F] (F even): each pair (2m, 2m + 1) rotated by angles [T, F] (equal within a pair)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    swapped = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * jnp.cos(angles) + swapped * jnp.sin(angles)


def alibi_slopes(count: int, heads: jax.Array | int) -> jax.Array:
    """[count] float32: 2^(-8 (h + 1) / heads) for head slots h = 0 .. count - 1."""
    return jnp.exp2(-8.0 * (jnp.arange(count, dtype=jnp.float32) + 1.0) / jnp.asarray(heads, jnp.float32))


def alibi_distances(seq_len: int) -> jax.Array:
    """[T, T] float32: -|t - s|, what each head's slope multiplies."""
    t = jnp.arange(seq_len, dtype=jnp.float32)
    return -jnp.abs(t[:, None] - t[None, :])


def ffn_inner(name: str) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
    """inner(up, gate) -> FFN hidden activations; swiglu and geglu (the lm space) read the gate projection."""
    if name == "swiglu":
        return lambda up, gate: jax.nn.silu(gate) * up
    if name == "geglu":
        return lambda up, gate: jax.nn.gelu(gate) * up
    return lambda up, gate: ACTIVATION_FNS[name](up)


# ---------------------------------------------------------------------------------------------- twin
def twin_norm(kind: str, features: int, rngs: nnx.Rngs) -> nnx.Module:
    """The twin's LayerNorm or RMSNorm of ``features`` (the epsilon and variance order of `masked_norm`)."""
    if kind == "layernorm":
        return nnx.LayerNorm(features, epsilon=NORM_EPSILON, use_fast_variance=False, rngs=rngs)
    return nnx.RMSNorm(features, epsilon=NORM_EPSILON, use_fast_variance=False, rngs=rngs)


class _TwinAttention(nnx.Module):
    def __init__(self, hidden: int, heads: int, position: str, rope_base: float, rngs: nnx.Rngs):
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, hidden, rngs=rngs)
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.heads, self.head_dim = heads, hidden // heads
        self.position, self.rope_base = position, rope_base

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, hidden = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.position == "rope":
            angles = rope_angles(t, jnp.arange(hidden), self.head_dim, self.rope_base)
            q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        split = (b, t, self.heads, self.head_dim)
        q, k, v = q.reshape(split), k.reshape(split), v.reshape(split)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(self.head_dim))
        if self.position == "alibi":
            scores = scores + alibi_slopes(self.heads, self.heads)[:, None, None] * alibi_distances(t)
        mixed = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v)
        return self.out(mixed.reshape(b, t, hidden))


class _TwinFFN(nnx.Module):
    def __init__(self, hidden: int, neurons: int, activation: str, rngs: nnx.Rngs):
        self.up = nnx.Linear(hidden, neurons, rngs=rngs)
        self.gate = nnx.Linear(hidden, neurons, rngs=rngs) if activation == "swiglu" else None
        self.down = nnx.Linear(neurons, hidden, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = None if self.gate is None else self.gate(x)
        return self.down(ffn_inner(self.activation)(self.up(x), gate))


class _TwinLayer(nnx.Module):
    def __init__(self, arch: TransformerArch, i: int, rope_base: float, rngs: nnx.Rngs):
        d = arch.hidden
        self.norm1 = twin_norm(arch.norm, d, rngs)
        self.attn = _TwinAttention(d, arch.heads[i], arch.position, rope_base, rngs)
        self.norm2 = twin_norm(arch.norm, d, rngs)
        self.ffn = _TwinFFN(d, arch.ffn_mult[i] * d, arch.activation, rngs)


class TwinTransformer(nnx.Module):
    """The compact standalone model of one transformer architecture: real widths, only its existing layers.

    ``twin(x, rngs=None) -> logits [B, classes]`` with x [B, H, W, C] images (input "patches") or int32 token
    ids [B, T] in [0, vocab) (input "tokens", T <= the positions it was built for). Dropout is active only
    after ``twin.train()``, drawing from ``rngs`` (an `nnx.Rngs` with a ``dropout`` stream).

    Args:
      arch: the architecture.
      input: ``"patches"`` or ``"tokens"``.
      in_features: patch^2 C (patches) or the vocabulary size (tokens).
      positions: rows of the learned position table (tokens incl. a CLS token).
      num_classes, patch, pool, dropout, rope_base: as in `TransformerSupernet`.
    """

    def __init__(
        self,
        arch: TransformerArch,
        *,
        input: str,
        in_features: int,
        positions: int,
        num_classes: int,
        patch: int = 1,
        pool: str = "mean",
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        rngs: nnx.Rngs,
    ):
        if input not in INPUTS or pool not in POOLS:
            raise ValueError(f"input must be one of {INPUTS} and pool one of {POOLS}, got {input!r} and {pool!r}")
        d = arch.hidden
        if input == "patches":
            self.embed = nnx.Linear(in_features, d, rngs=rngs)
        else:
            self.embed = nnx.Embed(in_features, d, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros(d)) if pool == "cls" else None
        self.position = nnx.Param(jnp.zeros((positions, d))) if arch.position == "learned" else None
        self.layers = nnx.List([_TwinLayer(arch, i, rope_base, rngs) for i in range(arch.layers)])
        self.norm = twin_norm(arch.norm, d, rngs)
        self.dropout = nnx.Dropout(dropout, deterministic=True)
        self.head = nnx.Linear(d, num_classes, rngs=rngs)
        self.input, self.patch, self.pool = input, patch, pool

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.embed(patchify(x, self.patch) if self.input == "patches" else x)
        if self.cls_token is not None:
            h = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (h.shape[0], 1, h.shape[-1])), h], 1)
        if self.position is not None:
            h = h + self.position[...][: h.shape[1]]
        # rngs only when given: jax2onnx (ONNX export) patches nnx.Dropout with a call that takes none.
        drop = self.dropout if rngs is None else functools.partial(self.dropout, rngs=rngs)
        for layer in self.layers:
            h = h + drop(layer.attn(layer.norm1(h)))
            h = h + drop(layer.ffn(layer.norm2(h)))
        h = self.norm(h)
        pooled = h[:, 0] if self.pool == "cls" else h.mean(1)
        return self.head(drop(pooled))


# ---------------------------------------------------------------------------------------------- supernet
@dataclasses.dataclass(frozen=True)
class TransformerSupernet:
    """Weight-sharing supernet of a `transformer_space` (layout and head scheme in the module docstring).

    Hashable, so its bound ``apply`` can be a static argument of `jax.jit` (the population functions do this).

    Attributes:
      space: a `transformer_space`; its norm / activation / position options must be among NORMS /
        ACTIVATIONS / POSITIONS.
      num_classes: number of logits.
      input: ``"patches"`` (images [B, H, W, C], needs ``image_shape`` and ``patch``) or ``"tokens"`` (int32
        ids [B, T], needs ``vocab_size`` and ``seq_len``).
      image_shape: (H, W, C) of the images; H and W divisible by ``patch``.
      patch: side of the square patches.
      vocab_size: number of token ids.
      seq_len: the longest token sequence (inputs may be shorter); sizes the learned position table and `macs`.
      pool: ``"mean"`` over tokens or ``"cls"`` (a learned token prepended, its final state classified).
      dropout: rate on every residual branch output and the pooled features, in training only.
      rope_base: RoPE's frequency base.
    """

    space: Space
    num_classes: int
    input: str = "patches"
    image_shape: tuple[int, int, int] | None = None
    patch: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    pool: str = "mean"
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if not {"layers", "hidden", "norm", "activation", "position", "layer1.heads"} <= set(self.space.names):
            raise ValueError(
                f"TransformerSupernet needs a transformer space, got {self.space!r}; build one with transformer_space()"
            )
        for name, known in (("norm", NORMS), ("activation", ACTIVATIONS), ("position", POSITIONS)):
            unknown = set(self.space[name].options) - set(known)
            if unknown:
                raise ValueError(f"the space's {name} options {sorted(unknown)} are not supported; choose from {known}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.input == "patches":
            self._check_patches()
        else:
            self._check_tokens()
        if "rope" in self.space["position"].options:
            odd = [(d, n) for d, n in self._width_heads() if (d // n) % 2]
            if odd:
                raise ValueError(
                    f"RoPE rotates feature pairs, so every head dimension hidden / heads must be even; "
                    f"(hidden, heads) = {odd} give odd ones. Drop those sizes or 'rope' from the space's positions"
                )

    def _check_patches(self) -> None:
        if self.vocab_size is not None or self.seq_len is not None:
            raise ValueError(
                "vocab_size and seq_len are for input='tokens'; for images give only image_shape and patch"
            )
        if self.image_shape is None or self.patch is None:
            raise ValueError(
                "input='patches' needs image_shape=(H, W, C) and patch, e.g. image_shape=(8, 8, 1), patch=4"
            )
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        h, w, _ = self.image_shape
        if self.patch < 1 or h % self.patch or w % self.patch:
            raise ValueError(
                f"patch must be >= 1 and divide the image height and width, got patch={self.patch} for {h}x{w} "
                f"images; choose one of {[p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]}"
            )

    def _check_tokens(self) -> None:
        if self.image_shape is not None or self.patch is not None:
            raise ValueError("image_shape and patch are for input='patches'; for tokens give vocab_size and seq_len")
        if self.vocab_size is None or self.seq_len is None or self.vocab_size < 1 or self.seq_len < 1:
            raise ValueError(
                f"input='tokens' needs vocab_size >= 1 and seq_len >= 1 (the longest sequence), got "
                f"vocab_size={self.vocab_size}, seq_len={self.seq_len}"
            )

    # ------------------------------------------------------------------ sizes
    def _width_heads(self) -> list[tuple[int, int]]:
        """Every (hidden, heads) pair the space allows."""
        heads = self.space["layer1.heads"]
        return [(d, n) for d in self.space["hidden"].options for n in heads.options if d % n == 0]

    @property
    def max_layers(self) -> int:
        return max(self.space["layers"].options)

    @property
    def max_hidden(self) -> int:
        return max(self.space["hidden"].options)

    @property
    def max_heads(self) -> int:
        return max(self.space["layer1.heads"].options)

    @property
    def max_ffn(self) -> int:
        return self.max_hidden * max(self.space["layer1.ffn_mult"].options)

    @property
    def in_features(self) -> int:
        """patch^2 C (patches) or the vocabulary size (tokens): the embedding's input size."""
        if self.input == "patches":
            return self.patch * self.patch * self.image_shape[2]
        return self.vocab_size

    @property
    def positions(self) -> int:
        """The longest sequence the layers see: patches or tokens, plus one for a CLS token."""
        if self.input == "patches":
            h, w, _ = self.image_shape
            tokens = (h // self.patch) * (w // self.patch)
        else:
            tokens = self.seq_len
        return tokens + (self.pool == "cls")

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Supernet parameters, a plain dict pytree mirroring `TwinTransformer`'s at the largest sizes:
        ``{"embed", "cls_token"?, "position"?, "layers": {"norm1", "attn", "norm2", "ffn"}, "norm", "head"}``, every
        ``layers`` leaf stacked [max_layers, ...] (layer i of the twin is index i).

        Kernels LeCun-normal (truncated at 2 std, as flax's default), embeddings / positions / CLS token normal
        with std 0.02, biases 0, norm scales 1, all cut from one flat random draw: XLA:CPU compiles one draw far
        faster than one per tensor, which matters under ``jax.vmap(supernet.init)`` (see `init_population`).
        """
        return self._compiled_init()(key)

    @functools.cache  # noqa: B019 - the supernet is a small frozen value; one compiled init per distinct supernet
    def _compiled_init(self) -> Callable[[jax.Array], dict]:
        return jax.jit(functools.partial(transformer_init, shapes=self._shapes()))

    def _shapes(self) -> dict:
        def f32(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.float32)

        def stacked(*shape):
            return f32(self.max_layers, *shape)

        def linear(i, o, new=f32):
            return {"kernel": new(i, o), "bias": new(o)}

        def norm(new=f32):
            bias = {"bias": new(d)} if "layernorm" in self.space["norm"].options else {}
            return {"scale": new(d)} | bias

        d, f = self.max_hidden, self.max_ffn
        ffn = {"up": linear(d, f, stacked), "down": linear(f, d, stacked)}
        if "swiglu" in self.space["activation"].options:
            ffn["gate"] = linear(d, f, stacked)
        attn = {name: linear(d, d, stacked) for name in ("query", "key", "value", "out")}
        layers = {"norm1": norm(stacked), "attn": attn, "norm2": norm(stacked), "ffn": ffn}
        if self.input == "patches":
            shapes = {"embed": linear(self.in_features, d)}
        else:
            shapes = {"embed": {"embedding": f32(self.vocab_size, d)}}
        if self.pool == "cls":
            shapes["cls_token"] = f32(d)
        if "learned" in self.space["position"].options:
            shapes["position"] = f32(self.positions, d)
        return shapes | {"layers": layers, "norm": norm(), "head": linear(d, self.num_classes)}

    # ------------------------------------------------------------------ apply
    def _is(self, enc: jax.Array, name: str, option: str) -> jax.Array | bool:
        """Whether choice ``name`` of ``enc`` is ``option``: a traced bool, or a Python bool when it is fixed."""
        options = self.space[name].options
        if option not in options:
            return False
        if len(options) == 1:
            return True
        return enc[self.space.index(name)] == options.index(option)

    def _check_inputs(self, x: jax.Array) -> None:
        if self.input == "patches":
            if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
                raise ValueError(
                    f"inputs must be images [B, H, W, C] = [B, {', '.join(map(str, self.image_shape))}], got shape "
                    f"{x.shape}; build TransformerSupernet(..., image_shape={tuple(x.shape[1:])}) for these images"
                )
            return
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(
                f"input='tokens' takes integer token ids [B, T], got shape {x.shape} and dtype {x.dtype}; "
                "pass x.astype(jnp.int32)"
            )
        if x.shape[1] > self.seq_len:
            raise ValueError(
                f"sequences of {x.shape[1]} tokens exceed seq_len={self.seq_len}; truncate them or build the "
                f"supernet with seq_len={x.shape[1]}"
            )

    def apply(self, params: dict, enc: jax.Array, x: jax.Array, *, train: bool, key: jax.Array | None = None):
        """logits [B, classes] float32 of the subnet ``enc`` int32 [n_choices] on ``x`` (images [B, H, W, C] or
        token ids int32 [B, T] in [0, vocab_size)).

        Pure and jit/vmap-able over (params, enc). ``key`` drives dropout, needed only when ``train`` and the
        supernet's dropout > 0.
        """
        self._check_inputs(x)
        dropping = dropout_on(train, self.dropout, key)
        drop = functools.partial(dropped, rate=self.dropout)
        space = self.space
        stream = Stream.of(space.value(enc, "hidden"), self.max_hidden, self._is(enc, "norm", "layernorm"))
        hidden, feature, mask, norm, masked = stream.hidden, stream.feature, stream.mask, stream.norm, stream.masked

        if self.input == "patches":
            h = patchify(x, self.patch) @ params["embed"]["kernel"] + params["embed"]["bias"]
        else:
            h = jnp.take(params["embed"]["embedding"], x, axis=0)
        if self.pool == "cls":
            cls = jnp.broadcast_to(params["cls_token"], (h.shape[0], 1, h.shape[-1]))
            h = jnp.concatenate([cls, h], 1)
        t = h.shape[1]
        if "position" in params:
            h = jnp.where(self._is(enc, "position", "learned"), h + params["position"][:t], h)
        h = masked(h)
        layer_keep = pool_keep = None
        if dropping:
            # One flat draw for every dropout site: each separate random-bit program costs XLA:CPU seconds to compile.
            sites = 2 * self.max_layers * h.size
            keep = jax.random.uniform(key, (sites + h.shape[0] * h.shape[2],)) >= self.dropout
            layer_keep = keep[:sites].reshape(self.max_layers, 2, *h.shape)
            pool_keep = keep[sites:].reshape(h.shape[0], h.shape[2])

        act_index = enc[space.index("activation")]
        branches = [ffn_inner(name) for name in space["activation"].options]
        neuron = jnp.arange(self.max_ffn)
        layer_numbers = range(1, self.max_layers + 1)
        per_layer = {
            "heads": jnp.stack([space.value(enc, f"layer{i}.heads") for i in layer_numbers]),
            "neurons": jnp.stack([space.value(enc, f"layer{i}.ffn_mult") for i in layer_numbers]) * hidden,
            "exists": jnp.arange(self.max_layers) < space.value(enc, "layers"),
            "keep": layer_keep,  # [max_layers, 2 (attention, FFN), B, T, D] or None
        }

        def layer(h, inputs):
            p, c = inputs
            keep_attn, keep_ffn = (None, None) if c["keep"] is None else c["keep"]
            attn = self._attention(p["attn"], norm(h, p["norm1"]), enc, hidden, c["heads"], feature, mask)
            out = h + drop(masked(attn), keep_attn)
            z = norm(out, p["norm2"])
            up = z @ p["ffn"]["up"]["kernel"] + p["ffn"]["up"]["bias"]
            gate = z @ p["ffn"]["gate"]["kernel"] + p["ffn"]["gate"]["bias"] if "gate" in p["ffn"] else None
            inner = jnp.where(neuron < c["neurons"], jax.lax.switch(act_index, branches, up, gate), 0.0)
            out = out + drop(masked(inner @ p["ffn"]["down"]["kernel"] + p["ffn"]["down"]["bias"]), keep_ffn)
            return jnp.where(c["exists"], out, h), None

        h, _ = jax.lax.scan(layer, h, (params["layers"], per_layer))
        h = norm(h, params["norm"])
        pooled = h[:, 0] if self.pool == "cls" else h.mean(1)
        pooled = drop(pooled, pool_keep)
        return pooled @ params["head"]["kernel"] + params["head"]["bias"]

    def _attention(self, p, a, enc, hidden, heads, feature, mask):
        """Multi-head attention of a [B, T, D] with head_dim = hidden / heads (see the module docstring)."""
        t = a.shape[1]
        head_dim = hidden // heads
        q = a @ p["query"]["kernel"] + p["query"]["bias"]
        k = a @ p["key"]["kernel"] + p["key"]["bias"]
        v = a @ p["value"]["kernel"] + p["value"]["bias"]
        rope = self._is(enc, "position", "rope")
        if rope is not False:
            angles = rope_angles(t, feature, head_dim, self.rope_base)
            q = jnp.where(rope, rotate_pairs(q, angles), q)
            k = jnp.where(rope, rotate_pairs(k, angles), k)
        slot = jnp.arange(self.max_heads)
        assign = (mask[:, None] & (feature[:, None] // head_dim == slot[None, :])).astype(a.dtype)  # [D, N]
        scores = jnp.einsum("btfh,bsf->bhts", q[..., None] * assign, k) / jnp.sqrt(head_dim.astype(jnp.float32))
        alibi = self._is(enc, "position", "alibi")
        if alibi is not False:
            bias = alibi_slopes(self.max_heads, heads)[:, None, None] * alibi_distances(t)
            scores = jnp.where(alibi, scores + bias, scores)
        mixed = jnp.einsum("bhts,bsf->bthf", jax.nn.softmax(scores, -1), v)
        mixed = jnp.einsum("bthf,fh->btf", mixed, assign)
        return mixed @ p["out"]["kernel"] + p["out"]["bias"]

    # ------------------------------------------------------------------ architectures
    def largest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: ``enc`` with the most layers, the largest hidden size and FFN multiplier in
        every layer (norm, activation, position kept; head counts kept where they divide the new hidden size,
        else the nearest that does). Jit-able; the "largest" end of the sandwich rule."""
        return self._with_size(enc, pick=max)

    def smallest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: one layer of the smallest hidden size and FFN multiplier (the sandwich's small
        end; head counts repaired as in `largest`)."""
        return self._with_size(enc, pick=min)

    def _with_size(self, enc, pick):
        space = self.space
        enc = jnp.asarray(enc, jnp.int32)
        layers, hidden = space["layers"].options, space["hidden"].options
        enc = enc.at[..., space.index("layers")].set(layers.index(pick(layers)))
        enc = enc.at[..., space.index("hidden")].set(hidden.index(pick(hidden)))
        heads = space["layer1.heads"].options
        divides = np.array([pick(hidden) % n == 0 for n in heads])
        allowed = np.flatnonzero(divides)
        # Static repair table: head option index -> itself if it divides the new hidden size, else the nearest.
        repair = jnp.asarray([i if divides[i] else allowed[np.argmin(np.abs(allowed - i))] for i in range(len(heads))])
        for i in range(1, self.max_layers + 1):
            mults = space[f"layer{i}.ffn_mult"].options
            enc = enc.at[..., space.index(f"layer{i}.ffn_mult")].set(mults.index(pick(mults)))
            column = space.index(f"layer{i}.heads")
            enc = enc.at[..., column].set(repair[enc[..., column]])
        return space.canonicalize(enc)

    def arch(self, enc: jax.Array) -> TransformerArch:
        """Typed view of a valid ``enc`` [n_choices] (ValueError naming the bad choice otherwise)."""
        return TransformerArch.from_encoding(self.space, np.asarray(enc))

    def param_count(self, enc: jax.Array) -> int:
        """Analytic parameter count of the candidate (= the scalars of its twin's parameters).

        Embedding (patch kernel + bias, or the token table), CLS token, learned position table, per layer two
        norms (layernorm: scale + bias; rmsnorm: scale), q / k / v / out kernels + biases, FFN up / down (and
        gate for swiglu) kernels + biases; the final norm and the head.
        """
        arch = self.arch(enc)
        d = arch.hidden
        norm = 2 * d if arch.norm == "layernorm" else d
        total = self.in_features * d + (d if self.input == "patches" else 0)
        total += d if self.pool == "cls" else 0
        total += self.positions * d if arch.position == "learned" else 0
        for mult in arch.ffn_mult:
            f = mult * d
            projections = 3 if arch.activation == "swiglu" else 2
            total += 2 * norm + 4 * (d * d + d) + (projections - 1) * (d * f + f) + (f * d + d)
        return total + norm + d * self.num_classes + self.num_classes

    def macs(self, enc: jax.Array, seq_len: int | None = None) -> int:
        """Analytic multiply-accumulates per example (MACs) of the candidate's own matmuls.

        With T tokens (incl. a CLS token), hidden d and FFN width f = ffn_mult d per layer: the patch
        embedding (patches x patch^2 C x d; a token lookup costs none), per layer q / k / v / out 4 T d^2,
        attention scores T^2 d and values T^2 d (summed over heads), the FFN 2 T d f (3 T d f with swiglu's
        gate), and the head d x classes. Element-wise work (bias, norm, softmax, RoPE, ALiBi, activation,
        pooling) is not counted, as usual for MACs. ``seq_len``: tokens per example for input "tokens"
        (default the supernet's seq_len); images always give their own patch count.
        """
        arch = self.arch(enc)
        d = arch.hidden
        if self.input == "patches":
            if seq_len is not None:
                raise ValueError("seq_len applies to input='tokens'; images always have their own patch count")
            tokens = self.positions - (self.pool == "cls")
            total = tokens * self.in_features * d
        else:
            tokens = self.seq_len if seq_len is None else seq_len
            if not 1 <= tokens <= self.seq_len:
                raise ValueError(f"seq_len must lie in 1 .. {self.seq_len} (the supernet's), got {seq_len}")
            total = 0
        t = tokens + (self.pool == "cls")
        for mult in arch.ffn_mult:
            projections = 3 if arch.activation == "swiglu" else 2
            total += 4 * t * d * d + 2 * t * t * d + projections * t * d * mult * d
        return total + d * self.num_classes

    # ------------------------------------------------------------------ twin
    def extract(self, params: dict, enc: jax.Array) -> tuple[dict, TwinTransformer]:
        """The standalone twin of ``enc`` [n_choices]: ``(twin_params, twin)``.

        ``twin`` is a `TwinTransformer` holding the supernet weights sliced to the candidate's hidden size and
        FFN widths, inactive layers left out; ``twin_params`` is its parameter state as a plain dict (what gets
        exported and counted). Its logits equal ``apply(params, enc, x, train=False)`` up to float summation
        order.
        """
        arch = self.arch(enc)
        d = arch.hidden
        twin = nnx.eval_shape(
            lambda: TwinTransformer(
                arch,
                input=self.input,
                in_features=self.in_features,
                positions=self.positions,
                num_classes=self.num_classes,
                patch=self.patch or 1,
                pool=self.pool,
                dropout=self.dropout,
                rope_base=self.rope_base,
                rngs=nnx.Rngs(0),
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
            if arch.activation == "swiglu":
                ffn["gate"] = linear(p["ffn"]["gate"], d, f)
            attn = {name: linear(p["attn"][name], d, d) for name in ("query", "key", "value", "out")}
            layers[i] = {"norm1": norm(p["norm1"]), "attn": attn, "norm2": norm(p["norm2"]), "ffn": ffn}
        embed = params["embed"]
        if self.input == "patches":
            embed = linear(embed, self.in_features, d)
        else:
            embed = {"embedding": embed["embedding"][:, :d]}
        sliced = {
            "embed": embed,
            "layers": layers,
            "norm": norm(params["norm"]),
            "head": {"kernel": params["head"]["kernel"][:d], "bias": params["head"]["bias"]},
        }
        if self.pool == "cls":
            sliced["cls_token"] = params["cls_token"][:d]
        if arch.position == "learned":
            sliced["position"] = params["position"][:, :d]
        state = nnx.state(twin, nnx.Param)
        state.replace_by_pure_dict(sliced)
        nnx.update(twin, state)
        return state.to_pure_dict(), concrete_rngs(twin)


def dropout_on(train: bool, rate: float, key) -> bool:
    """Whether a masked apply drops out (``train`` and ``rate`` > 0); ValueError when it would and has no key."""
    dropping = train and rate > 0.0
    if dropping and key is None:
        raise ValueError("apply(..., train=True) with dropout needs a PRNG key; pass key=jax.random.key(seed)")
    return dropping


def dropped(a: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout of ``a`` with the drawn ``keep`` mask (None: no dropout)."""
    return a if keep is None else jnp.where(keep, a / (1.0 - rate), 0.0)


@dataclasses.dataclass(frozen=True)
class Stream:
    """The residual stream's active width in a masked transformer apply: ``hidden`` (traced), ``feature`` =
    arange(largest width), ``mask`` = feature < hidden; ``masked`` zeroes the inactive features and ``norm`` is
    `masked_norm` with the encoding's norm (LayerNorm where ``layernorm``, else RMSNorm)."""

    hidden: jax.Array
    feature: jax.Array
    mask: jax.Array
    layernorm: jax.Array | bool

    @classmethod
    def of(cls, hidden: jax.Array, max_hidden: int, layernorm: jax.Array | bool) -> Stream:
        feature = jnp.arange(max_hidden)
        return cls(hidden, feature, feature < hidden, layernorm)

    def masked(self, z: jax.Array) -> jax.Array:
        return jnp.where(self.mask, z, 0.0)

    def norm(self, z: jax.Array, p: dict) -> jax.Array:
        return masked_norm(z, self.mask, self.hidden, p, self.layernorm)


def masked_norm(z: jax.Array, mask: jax.Array, width: jax.Array, p: dict, layernorm: jax.Array | bool) -> jax.Array:
    """LayerNorm or RMSNorm of z [..., D] over the ``width`` active features (mask bool [D]); inactive outputs 0.

    RMSNorm is LayerNorm without centring and bias, so one expression serves both (half the program of computing
    both and selecting); the order of operations is flax's (use_fast_variance=False), so the twin agrees.
    """
    n = width.astype(z.dtype)
    mean = jnp.where(layernorm, jnp.sum(jnp.where(mask, z, 0.0), -1, keepdims=True) / n, 0.0)
    centred = jnp.where(mask, z - mean, 0.0)
    var = jnp.sum(centred * centred, -1, keepdims=True) / n
    y = centred * (jax.lax.rsqrt(var + NORM_EPSILON) * p["scale"])
    if "bias" in p:
        y = y + jnp.where(layernorm, p["bias"], 0.0)
    return jnp.where(mask, y, 0.0)


def transformer_init(key: jax.Array, shapes: dict) -> dict:
    """Arrays for the ShapeDtypeStruct tree ``shapes``: every ``kernel`` [..., fan_in, fan_out] LeCun-normal, every
    ``embedding`` / ``position`` / ``cls_token`` normal with std EMBEDDING_STD (both truncated at 2 std, cut from
    one draw), every ``scale`` 1, everything else 0."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    random = ("kernel", "embedding", "position", "cls_token")

    def name(path):
        return path[-1].key

    draw = jax.random.truncated_normal(key, -2.0, 2.0, (sum(leaf.size for p, leaf in leaves if name(p) in random),))
    # Standard deviation of a unit normal truncated to [-2, 2]; dividing by it gives the intended std.
    truncated_std = 0.87962566103423978
    values, start = [], 0
    for path, leaf in leaves:
        if name(path) in random:
            std = 1.0 / np.sqrt(leaf.shape[-2]) if name(path) == "kernel" else EMBEDDING_STD
            values.append(draw[start : start + leaf.size].reshape(leaf.shape) * (std / truncated_std))
            start += leaf.size
        else:
            values.append(jnp.full(leaf.shape, 1.0 if name(path) == "scale" else 0.0, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)
