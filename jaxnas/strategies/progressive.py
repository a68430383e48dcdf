"""Progressive complexity: choices unlocked level by level as generations pass (S-NAS). Jittable if the inner is.

A wrapper around any strategy: whatever the inner strategy asks, the choices of levels not yet unlocked
are held at a base value (then the row is repaired to a valid canonical encoding), so early generations
search a small, simple sub-space and later ones the whole space. One ``tell`` is one generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies.base import Strategy, check_positive


@struct.dataclass
class ProgressiveState:
    """inner: the wrapped strategy's state; generation: int32 scalar, tells so far."""

    inner: object
    generation: jax.Array


@dataclasses.dataclass(frozen=True)
class Progressive:
    """See `progressive`. ``level_of``: int level of each choice; ``base``: int option index of each choice."""

    inner: Strategy
    level_of: tuple[int, ...]
    base: tuple[int, ...]
    generations_per_level: int

    @property
    def space(self) -> Space:
        return self.inner.space

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def n_levels(self) -> int:
        return max(self.level_of) + 1

    def level(self, state: ProgressiveState) -> jax.Array:
        """int32 scalar: the highest unlocked level."""
        return jnp.minimum(state.generation // self.generations_per_level, self.n_levels - 1)

    def init(self, key: jax.Array) -> ProgressiveState:
        return ProgressiveState(inner=self.inner.init(key), generation=jnp.zeros((), jnp.int32))

    def ask(self, key: jax.Array, state: ProgressiveState) -> tuple[jax.Array, ProgressiveState]:
        """(int32 [P, n_choices] the inner strategy's rows with locked choices at their base; new state)."""
        k_inner, k_repair = jax.random.split(key)
        asked, inner = self.inner.ask(k_inner, state.inner)
        unlocked = jnp.asarray(self.level_of) <= self.level(state)
        held = jnp.where(unlocked, asked, jnp.asarray(self.base, jnp.int32))
        # A mutation at rate 0 only repairs: values the held choices disallow move to the nearest allowed one.
        return self.space.mutate(k_repair, held, 0.0), state.replace(inner=inner)

    def tell(self, state: ProgressiveState, encodings: jax.Array, fitness: jax.Array, **extra) -> ProgressiveState:
        return ProgressiveState(inner=self.inner.tell(state.inner, encodings, fitness, **extra),
                                generation=state.generation + 1)

    def metrics(self, state: ProgressiveState) -> dict[str, jax.Array]:
        """The inner metrics plus ``level``, the highest unlocked level."""
        return {**self.inner.metrics(state.inner), "level": self.level(state)}


def progressive(
    strategy: Strategy,
    levels: Sequence[Sequence[str]],
    *,
    generations_per_level: int,
    base: Mapping[str, Any] | None = None,
) -> Progressive:
    """``strategy`` with choices unlocked level by level: level k opens after k x ``generations_per_level`` tells.

    Args:
      strategy: the inner strategy.
      levels: choice names per level, level 1 first (e.g. ``[["stage2.depth"], ["stage3.depth"]]``); choices
        named in no level are free from the start (level 0).
      generations_per_level: tells between unlocks.
      base: option value held by each locked choice, by name (default: each choice's first option).
    """
    space = strategy.space
    check_positive("progressive", generations_per_level=generations_per_level)
    level_of = np.zeros(space.n_choices, int)
    for k, names in enumerate(levels, start=1):
        if isinstance(names, str):
            raise ValueError(f"progressive: level {k} must be a list of choice names, got the string {names!r}")
        for name in names:
            if name not in space.names:
                raise ValueError(f"progressive: level {k} names {name!r}, which is not a choice of space "
                                 f"{space.name!r}; its choices are {', '.join(space.names)}")
            if level_of[space.index(name)]:
                raise ValueError(f"progressive: choice {name!r} is in more than one level; give each choice once")
            level_of[space.index(name)] = k
    base_index = np.zeros(space.n_choices, int)
    for name, value in (base or {}).items():
        if name not in space.names:
            raise ValueError(f"progressive: base names {name!r}, which is not a choice of space {space.name!r}; "
                             f"its choices are {', '.join(space.names)}")
        base_index[space.index(name)] = space[name].index_of(value)
    return Progressive(strategy, tuple(int(v) for v in level_of), tuple(int(v) for v in base_index),
                       generations_per_level)
