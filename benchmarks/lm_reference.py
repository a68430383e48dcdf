"""PyTorch eager re-implementation of `jaxnas.supernet.lm.TwinLM`: the eager peer of the language-model benchmark.

`TorchLM` computes what ``TwinLM.__call__`` computes (dropout 0) for every option of `lm_space`:

- pre-norm layers ``h = h + out(mixer(norm1(h))); h = h + down(act(norm2(h)))``, a weight-tied output head
  ``norm(h) @ embedding^T`` (no bias), learned positions added to the token embedding;
- norms: LayerNorm (scale + bias) and RMSNorm (scale only), epsilon 1e-5 (the twin's ``NORM_EPSILON``);
- FFN activations: gelu with the tanh approximation (``jax.nn.gelu``'s default), silu, and the gated swiglu /
  geglu ``act(gate(x)) * up(x)`` (the gate goes through the activation, ``up`` does not);
- mixers: causal softmax attention (`F.scaled_dot_product_attention`, kv_heads key / value heads, query head
  ``h`` reading kv head ``h // (heads / kv_heads)``: the twin's ``(b, t, kv_heads, group, head_dim)`` reshape),
  causal linear attention with elu + 1 features in the twin's parallel form (RoPE rotates the numerator's features
  only), and the gated linear recurrence ``h_t = a h_{t-1} + (1 - a) sigmoid(gate_in x_t) value(x_t)``,
  ``a = sigmoid(decay)``, in a parallel form (a per-channel constant decay makes it one weighted sum over tokens);
- positions: learned, RoPE (adjacent feature pairs (2m, 2m + 1) rotated by ``t base^(-2m / head_dim)`` with m
  counted within the head) and ALiBi (query head h biased by ``2^(-8 (h + 1) / heads) * -|t - s|``).

`torch_lm_from_twin` reads the architecture off a twin (`twin_arch`) and copies its weights (flax kernels are
[in, out], torch weights [out, in]); `train_sequential` trains a list of models one after another with Adam on
the batch order jaxnas's population training uses, and reports each model's losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from jaxnas.spaces.lm import LMArch

NORM_EPSILON = 1e-5  # jaxnas.supernet.transformer.NORM_EPSILON, which `twin_norm` uses
EMBEDDING_STD = 0.02  # standalone initialisation only; `torch_lm_from_twin` overwrites every weight
EVAL_BATCH = 256


def gelu(z: torch.Tensor) -> torch.Tensor:
    """``jax.nn.gelu``: the tanh approximation by default."""
    return F.gelu(z, approximate="tanh")


def ffn_inner(name: str, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The FFN's hidden activations, as `jaxnas.supernet.transformer.ffn_inner`."""
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "geglu":
        return gelu(gate) * up
    if name == "gelu":
        return gelu(up)
    if name == "silu":
        return F.silu(up)
    raise ValueError(f"unknown activation {name!r}")


def inverse_frequencies(features: int, head_dim: int, base: float) -> torch.Tensor:
    """[features] float32 base^(-2m / head_dim), m = (f mod head_dim) // 2: `rope_angles` without the position."""
    local = torch.arange(features) % head_dim
    even = (local - local % 2).to(torch.float32)
    return torch.pow(torch.tensor(base, dtype=torch.float32), -even / float(head_dim))


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., T, F]: pairs (2m, 2m + 1) rotated by angles [T, F] (equal within a pair)."""
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * torch.cos(angles) + swapped * torch.sin(angles)


def decay_logits(width: int) -> torch.Tensor:
    """The twin's initial recurrent decay logits (`jaxnas.supernet.lm.decay_logits`)."""
    return torch.log(torch.exp2(1.0 + (torch.arange(width) % 8).to(torch.float32)) - 1.0)


def _norm(kind: str, features: int) -> torch.nn.Module:
    if kind == "layernorm":
        return torch.nn.LayerNorm(features, eps=NORM_EPSILON)
    if kind == "rmsnorm":
        return torch.nn.RMSNorm(features, eps=NORM_EPSILON)
    raise ValueError(f"unknown norm {kind!r}")


class TorchHeads(torch.nn.Module):
    """Causal softmax (``kind="attention"``) or linear (``kind="linear"``) attention with kv_heads key / value heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, kind: str, position: str | None, rope_base: float):
        super().__init__()
        head_dim = hidden // heads
        self.query = torch.nn.Linear(hidden, hidden)
        self.key = torch.nn.Linear(hidden, kv_heads * head_dim)
        self.value = torch.nn.Linear(hidden, kv_heads * head_dim)
        self.out = torch.nn.Linear(hidden, hidden)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.kind, self.position = kind, position
        self.register_buffer("inv_freq", inverse_frequencies(hidden, head_dim, rope_base), persistent=False)
        slopes = torch.exp2(-8.0 * (torch.arange(heads, dtype=torch.float32) + 1.0) / float(heads))
        self.register_buffer("slopes", slopes, persistent=False)

    def _angles(self, t: int) -> torch.Tensor:
        return torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]

    def _rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return rotate_pairs(x, angles[:, : x.shape[-1]]) if self.position == "rope" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, hidden = x.shape
        k_, g, e = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q, k, v = self.query(x), self.key(x), self.value(x)
        angles = self._angles(t) if self.position == "rope" else None
        if self.kind == "attention":
            q, k = self._rotate(q, angles), self._rotate(k, angles)
            # [B, heads, T, E] / [B, kv_heads, T, E]; enable_gqa maps query head h to kv head h // g.
            q, k, v = (a.unflatten(-1, (-1, e)).transpose(1, 2) for a in (q, k, v))
            if self.position == "alibi":
                pos = torch.arange(t, dtype=torch.float32, device=x.device)
                bias = self.slopes[:, None, None] * -(pos[:, None] - pos[None, :]).abs()
                bias = bias.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=x.device).tril(), -math.inf)
                mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=g > 1)
            else:
                mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=g > 1)
            mixed = mixed.transpose(1, 2).reshape(b, t, hidden)
        else:
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
            q_num, k_num = (self._rotate(q, angles), self._rotate(k, angles)) if angles is not None else (q, k)
            q, q_num = (a.reshape(b, t, k_, g, e) for a in (q, q_num))
            k, v, k_num = (a.reshape(b, t, k_, e) for a in (k, v, k_num))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            den = torch.einsum("btkge,bske->bkgts", q, k).masked_fill(~mask, 0.0).sum(-1, keepdim=True)
            num = torch.einsum("btkge,bske->bkgts", q_num, k_num).masked_fill(~mask, 0.0)
            mixed = torch.einsum("bkgts,bske->btkge", num / den, v).reshape(b, t, hidden)
        return self.out(mixed)


class TorchRecurrent(torch.nn.Module):
    """The gated linear recurrence in a parallel form: the decay is a per-channel constant, so
    ``h_t = sum_{s <= t} a^(t - s) u_s`` is one [T, T, hidden] weighted sum (``a^(t - s) = exp((t - s) log a)``,
    log a = logsigmoid(decay) <= 0, so no power overflows) instead of a Python loop over tokens."""

    def __init__(self, hidden: int):
        super().__init__()
        self.value = torch.nn.Linear(hidden, hidden)
        self.gate_in = torch.nn.Linear(hidden, hidden)
        self.gate_out = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.decay = torch.nn.Parameter(decay_logits(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.decay)
        u = (1.0 - a) * torch.sigmoid(self.gate_in(x)) * self.value(x)
        t = torch.arange(x.shape[1], device=x.device)
        lag = (t[:, None] - t[None, :]).to(x.dtype)  # [T, S]
        weights = torch.exp(lag[..., None].clamp(min=0) * F.logsigmoid(self.decay)) * (lag >= 0)[..., None]
        states = torch.einsum("tsd,bsd->btd", weights, u)
        return self.out(F.silu(self.gate_out(x)) * states)


class TorchFFN(torch.nn.Module):
    def __init__(self, hidden: int, neurons: int, activation: str, gated: bool):
        super().__init__()
        self.up = torch.nn.Linear(hidden, neurons)
        self.gate = torch.nn.Linear(hidden, neurons) if gated else None
        self.down = torch.nn.Linear(neurons, hidden)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = None if self.gate is None else self.gate(x)
        return self.down(ffn_inner(self.activation, self.up(x), gate))


class TorchLayer(torch.nn.Module):
    def __init__(self, arch: LMArch, i: int, rope_base: float):
        super().__init__()
        d = arch.hidden
        self.norm1 = _norm(arch.norm, d)
        if arch.mixer == "recurrent":
            self.mixer = TorchRecurrent(d)
        else:
            self.mixer = TorchHeads(d, arch.heads[i], arch.kv_heads[i], arch.mixer, arch.position, rope_base)
        self.norm2 = _norm(arch.norm, d)
        self.ffn = TorchFFN(d, arch.ffn_mult[i] * d, arch.activation, arch.gated)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.norm1(h))
        return h + self.ffn(self.norm2(h))


class TorchLM(torch.nn.Module):
    """The causal language model of one `lm_space` architecture, the layout of `TwinLM` (module names included).

    ``model(tokens [B, T] long) -> logits [B, T, vocab]``. ``positions`` sizes the learned position table (unused
    otherwise). A standalone model gets torch's default linear initialisation, embedding N(0, 0.02^2), zero
    positions and the twin's decay logits; `torch_lm_from_twin` copies a twin's weights instead.
    """

    def __init__(self, arch: LMArch, *, vocab_size: int, positions: int, rope_base: float = 10000.0):
        super().__init__()
        self.arch = arch
        d = arch.hidden
        self.embed = torch.nn.Embedding(vocab_size, d)
        torch.nn.init.normal_(self.embed.weight, std=EMBEDDING_STD)
        self.position = torch.nn.Parameter(torch.zeros(positions, d)) if arch.position == "learned" else None
        self.layers = torch.nn.ModuleList([TorchLayer(arch, i, rope_base) for i in range(arch.layers)])
        self.norm = _norm(arch.norm, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.position is not None:
            h = h + self.position[: h.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return F.linear(self.norm(h), self.embed.weight)


# ---------------------------------------------------------------------------------------------- from a twin
def twin_arch(twin) -> tuple[LMArch, dict]:
    """``(arch, sizes)`` of a `TwinLM`, read off its modules (it keeps no arch object): sizes = ``{"vocab_size",
    "positions" (rows of the learned table, 0 without one), "rope_base"}``, the `TorchLM` keyword arguments."""
    from flax import nnx  # the twin's framework; only needed here

    vocab_size, d = np.shape(twin.embed.embedding[...])
    layers = list(twin.layers)
    first = layers[0]
    recurrent = hasattr(first.mixer, "decay")
    heads = () if recurrent else tuple(layer.mixer.heads for layer in layers)
    kv_heads = () if recurrent else tuple(layer.mixer.kv_heads for layer in layers)
    arch = LMArch(
        layers=len(layers),
        hidden=int(d),
        norm="layernorm" if isinstance(twin.norm, nnx.LayerNorm) else "rmsnorm",
        activation=first.ffn.activation,
        mixer="recurrent" if recurrent else first.mixer.kind,
        position=None if recurrent else first.mixer.position,
        heads=heads,
        kv_heads=kv_heads,
        ffn_mult=tuple(layer.ffn.up.out_features // d for layer in layers),
    )
    positions = 0 if twin.position is None else int(np.shape(twin.position[...])[0])
    rope_base = 10000.0 if recurrent else float(first.mixer.rope_base)
    return arch, {"vocab_size": int(vocab_size), "positions": positions, "rope_base": rope_base}


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))  # a writable host copy


@torch.no_grad()
def load_twin_weights(model: TorchLM, twin) -> TorchLM:
    """Copy every weight of ``twin`` (a `TwinLM` of the same architecture) into ``model``; returns ``model``."""

    def copy(dst: torch.Tensor, src) -> None:
        value = _tensor(src[...])
        if value.shape != dst.shape:
            raise ValueError(f"shape mismatch: twin {tuple(value.shape)} vs torch {tuple(dst.shape)}")
        dst.copy_(value)

    def linear(dst: torch.nn.Linear, src) -> None:
        copy(dst.weight, np.asarray(src.kernel[...]).T)  # flax kernel [in, out] -> torch weight [out, in]
        copy(dst.bias, src.bias)

    def norm(dst: torch.nn.Module, src) -> None:
        copy(dst.weight, src.scale)
        if isinstance(dst, torch.nn.LayerNorm):
            copy(dst.bias, src.bias)

    copy(model.embed.weight, twin.embed.embedding)
    if model.position is not None:
        copy(model.position, twin.position)
    for mine, theirs in zip(model.layers, twin.layers, strict=True):
        norm(mine.norm1, theirs.norm1)
        norm(mine.norm2, theirs.norm2)
        recurrent = isinstance(mine.mixer, TorchRecurrent)
        for name in ("value", "gate_in", "gate_out", "out") if recurrent else ("query", "key", "value", "out"):
            linear(getattr(mine.mixer, name), getattr(theirs.mixer, name))
        if recurrent:
            copy(mine.mixer.decay, theirs.mixer.decay)
        for name in ("up", "gate", "down"):
            if getattr(mine.ffn, name) is not None:
                linear(getattr(mine.ffn, name), getattr(theirs.ffn, name))
    norm(model.norm, twin.norm)
    return model


def torch_lm_from_twin(
    twin,
    arch: LMArch | None = None,
    *,
    vocab_size: int | None = None,
    positions: int | None = None,
    rope_base: float | None = None,
) -> TorchLM:
    """A `TorchLM` with ``twin``'s architecture and a copy of its weights (independent leaves: training one never
    touches the twin).

    Everything is read off the twin (`twin_arch`); ``arch``, ``vocab_size``, ``positions`` and ``rope_base`` are
    optional cross-checks (e.g. ``LMSupernet.arch(enc)``, its vocab_size and seq_len): ValueError if ``arch`` or
    ``vocab_size`` differs from the twin's, or ``positions`` from its learned table's rows (ignored without one).
    """
    found, sizes = twin_arch(twin)
    if arch is not None and arch != found:
        raise ValueError(f"arch {arch} is not the twin's {found}")
    if vocab_size is not None and vocab_size != sizes["vocab_size"]:
        raise ValueError(f"vocab_size {vocab_size} is not the twin's {sizes['vocab_size']}")
    if positions is not None:
        if found.position == "learned" and positions != sizes["positions"]:
            raise ValueError(f"positions {positions} is not the twin's {sizes['positions']} learned rows")
        sizes["positions"] = positions
    if rope_base is not None:
        sizes["rope_base"] = float(rope_base)
    return load_twin_weights(TorchLM(found, **sizes), twin)


# ---------------------------------------------------------------------------------------------- training
def _tokens(x) -> torch.Tensor:
    # np.array copies: the data splits are read-only
    return x.long() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)).long()


def token_loss(model: TorchLM, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the next-token targets y [B, T] over every position (mean or sum over B x T tokens)."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: TorchLM, x, y, batch_size: int = EVAL_BATCH) -> float:
    """Mean token cross-entropy over the whole split (eval mode, batches of ``batch_size``)."""
    model.eval()
    x, y = _tokens(x), _tokens(y)
    total = sum(
        float(token_loss(model, x[i : i + batch_size], y[i : i + batch_size], "sum"))
        for i in range(0, x.shape[0], batch_size)
    )
    return total / y.numel()


def train_sequential(
    models: Sequence[TorchLM],
    train_x,
    train_y,
    val_x,
    val_y,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    batches: Sequence,
) -> list[dict]:
    """Train each model in turn (plain eager PyTorch): Adam(lr, betas (0.9, 0.999), eps 1e-8, optax.adam's
    defaults), loss the mean token cross-entropy over [B, T], batch order ``batches[epoch]`` (index arrays
    [n_batches, batch_size], e.g. `jaxnas.data.epoch_indices`, so every model sees the JAX side's batches).

    Tokens / targets are int arrays [N, T] (numpy or torch). Returns per model ``{"train_loss": mean over the last
    epoch's steps, "val_loss": `evaluate` after training, "step_losses": every step's loss in order}``.
    """
    if len(batches) < epochs:
        raise ValueError(f"batches holds {len(batches)} epoch orders; {epochs} epochs need one each")
    orders = [torch.from_numpy(np.asarray(b)).long() for b in batches[:epochs]]
    for order in orders:
        if order.ndim != 2 or order.shape[1] != batch_size:
            raise ValueError(f"each epoch's order must be [n_batches, {batch_size}], got {tuple(order.shape)}")
    x, y = _tokens(train_x), _tokens(train_y)
    results = []
    for model in models:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        steps = []
        for order in orders:
            for index in order:
                loss = token_loss(model, x[index], y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps.append(loss.detach())
        last = torch.stack(steps[-len(orders[-1]) :]) if steps else torch.full((1,), math.nan)
        results.append(
            {
                "train_loss": float(last.mean()),
                "val_loss": evaluate(model, val_x, val_y),
                "step_losses": [float(s) for s in steps],
            }
        )
    return results
