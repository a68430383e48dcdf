"""Causal decoder-only language models: depth, width and token mixer global, heads and FFN multiplier per layer.

    layers                    1 .. max_layers
    hidden                    model width, shared by every layer (residual stream)
    norm, activation          global: layernorm | rmsnorm, gelu | silu | swiglu | geglu
    mixer                     global token mixer: attention (causal softmax) | linear (causal linear attention,
                              elu + 1 features) | recurrent (gated linear recurrence, per-channel learned decay)
    position                  learned | rope | alibi; only for the attention mixers (a recurrence orders tokens
                              itself), and alibi only for softmax attention (it biases the softmax's scores)
    layer i: heads, kv_heads  only for layers that exist (i <= layers) and an attention mixer; heads divide hidden,
                              kv_heads divide heads (kv_heads = heads: MHA, 1 < kv_heads < heads: GQA, 1: MQA)
    layer i: ffn_mult         only for layers that exist

As in the transformer space, per-layer choices are what an elastic supernet masks cheaply, while hidden size
and mixer are global. Every constraint is a ``valid_if`` rule on an earlier choice (hidden before heads, heads
before kv_heads, mixer before position), so ``sample``, ``mutate`` and ``crossover`` never produce an invalid
architecture: a mutated head count moves an inherited kv_heads to the nearest one that divides it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxnas.spaces.core import Choice, Compatible, Space, at_least, is_in

ATTENTION_MIXERS = ("attention", "linear")
"""The mixers with heads, keys and values (and hence kv_heads and a position encoding)."""


@dataclasses.dataclass(frozen=True)
class LMArch:
    """Typed view of a language-model architecture; per-layer tuples hold one entry per layer.

    ``position`` is None and ``heads`` / ``kv_heads`` are empty for the recurrent mixer, which has none.
    """

    layers: int
    hidden: int
    norm: str
    activation: str
    mixer: str
    position: str | None
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ffn_mult: tuple[int, ...]

    @classmethod
    def from_encoding(cls, space: Space, enc: Any) -> LMArch:
        """The view of a valid encoding int [n_choices] of an `lm_space`."""
        arch = space.decode(enc)
        layers = range(1, arch["layers"] + 1)
        attends = arch["mixer"] in ATTENTION_MIXERS
        return cls(
            layers=arch["layers"],
            hidden=arch["hidden"],
            norm=arch["norm"],
            activation=arch["activation"],
            mixer=arch["mixer"],
            position=arch.get("position"),
            heads=tuple(arch[f"layer{i}.heads"] for i in layers) if attends else (),
            kv_heads=tuple(arch[f"layer{i}.kv_heads"] for i in layers) if attends else (),
            ffn_mult=tuple(arch[f"layer{i}.ffn_mult"] for i in layers),
        )

    @property
    def gated(self) -> bool:
        """Whether the FFN has a gate projection (swiglu, geglu)."""
        return self.activation in ("swiglu", "geglu")


def lm_space(
    *,
    max_layers: int = 6,
    hidden: Sequence[int] = (64, 128, 192, 256),
    heads: Sequence[int] = (1, 2, 4, 8),
    kv_heads: Sequence[int] = (1, 2, 4, 8),
    ffn_mults: Sequence[int] = (1, 2, 4),
    norms: Sequence[str] = ("layernorm", "rmsnorm"),
    activations: Sequence[str] = ("gelu", "silu", "swiglu", "geglu"),
    mixers: Sequence[str] = ("attention", "linear", "recurrent"),
    positions: Sequence[str] = ("learned", "rope", "alibi"),
    mutation_rate: float = 0.1,
) -> Space:
    """The language-model space; shrink any option list for tiny test spaces.

    Raises ValueError if some hidden size is divisible by none of the head counts, some head count by none of
    the kv_heads counts, or some attention mixer allows none of the positions (linear with only alibi).
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    with_heads = [m for m in ATTENTION_MIXERS if m in mixers]
    attends = is_in("mixer", *with_heads) if with_heads else None  # None: a recurrent-only space
    divides = Compatible("hidden", lambda width, h: width % h == 0, "the hidden size must be divisible by the heads")
    grouped = "the heads must be divisible by kv_heads"
    alibi = Compatible("mixer", lambda m, p: p != "alibi" or m == "attention", "ALiBi biases softmax scores")
    choices = [
        Choice("layers", range(1, max_layers + 1)),
        Choice("hidden", hidden),
        Choice("norm", norms),
        Choice("activation", activations),
        Choice("mixer", mixers),
    ]
    if attends is not None:
        choices.append(Choice("position", positions, active_if=attends, valid_if=alibi))
    for i in range(1, max_layers + 1):
        exists = at_least("layers", i)
        if attends is not None:
            groups = Compatible(f"layer{i}.heads", lambda h, kv: h % kv == 0, grouped)
            choices += [
                Choice(f"layer{i}.heads", heads, active_if=exists & attends, valid_if=divides),
                Choice(f"layer{i}.kv_heads", kv_heads, active_if=exists & attends, valid_if=groups),
            ]
        choices.append(Choice(f"layer{i}.ffn_mult", ffn_mults, active_if=exists))
    return Space("lm", choices, mutation_rate=mutation_rate)
