"""Transformer variants: depth and width global, attention heads and FFN multiplier per layer (as in AutoFormer).

    layers                    1 .. max_layers
    hidden                    model width, shared by every layer (residual stream)
    norm, activation, position  global: layernorm | rmsnorm, gelu | silu | swiglu, learned | rope | alibi
    layer i: heads, ffn_mult  only for layers that exist (i <= layers); heads must divide hidden

Per-layer heads and FFN multipliers are what an elastic supernet masks cheaply (head and neuron masks),
while hidden size is global because every layer adds into one residual stream. Whether the input is
image patches or tokens is the supernet's business, not a choice.

The head constraint is a ``valid_if`` rule: ``hidden`` is decided before the heads, and each layer's heads
are drawn only from the counts that divide it, so ``sample``, ``mutate`` and ``crossover`` never produce an
invalid architecture (a mutated hidden size moves an inherited head count to the nearest one that divides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxnas.spaces.core import Choice, Compatible, Space, at_least


@dataclasses.dataclass(frozen=True)
class TransformerArch:
    """Typed view of a transformer architecture; ``heads`` and ``ffn_mult`` hold one entry per layer."""

    layers: int
    hidden: int
    norm: str
    activation: str
    position: str
    heads: tuple[int, ...]
    ffn_mult: tuple[int, ...]

    @classmethod
    def from_encoding(cls, space: Space, enc: Any) -> TransformerArch:
        """The view of a valid encoding int [n_choices] of a `transformer_space`."""
        arch = space.decode(enc)
        layers = range(1, arch["layers"] + 1)
        return cls(
            layers=arch["layers"],
            hidden=arch["hidden"],
            norm=arch["norm"],
            activation=arch["activation"],
            position=arch["position"],
            heads=tuple(arch[f"layer{i}.heads"] for i in layers),
            ffn_mult=tuple(arch[f"layer{i}.ffn_mult"] for i in layers),
        )


def transformer_space(
    *,
    max_layers: int = 6,
    hidden: Sequence[int] = (64, 128, 192, 256),
    heads: Sequence[int] = (1, 2, 4, 8),
    ffn_mults: Sequence[int] = (1, 2, 4),
    norms: Sequence[str] = ("layernorm", "rmsnorm"),
    activations: Sequence[str] = ("gelu", "silu", "swiglu"),
    positions: Sequence[str] = ("learned", "rope", "alibi"),
    mutation_rate: float = 0.1,
) -> Space:
    """The transformer space; shrink any option list for tiny test spaces.

    Raises ValueError if some hidden size is divisible by none of the head counts.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    divides = Compatible("hidden", lambda width, h: width % h == 0, "the hidden size must be divisible by the heads")
    choices = [
        Choice("layers", range(1, max_layers + 1)),
        Choice("hidden", hidden),
        Choice("norm", norms),
        Choice("activation", activations),
        Choice("position", positions),
    ]
    for i in range(1, max_layers + 1):
        exists = at_least("layers", i)
        choices += [
            Choice(f"layer{i}.heads", heads, active_if=exists, valid_if=divides),
            Choice(f"layer{i}.ffn_mult", ffn_mults, active_if=exists),
        ]
    return Space("transformer", choices, mutation_rate=mutation_rate)
