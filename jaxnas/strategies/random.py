"""Random search: every ask is a fresh uniform sample of the space; the baseline every strategy must beat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies.base import check_batch, check_positive


@struct.dataclass
class RandomState:
    """told: int32 scalar, candidates told so far (random search needs no memory; this keeps the state a pytree)."""

    told: jax.Array


@dataclasses.dataclass(frozen=True)
class RandomSearch:
    """Uniform sampling (`Space.sample`): each choice uniform over the options earlier choices allow. Jittable.

    Args:
      space: the search space.
      batch_size: P, encodings per ask.
    """

    space: Space
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_positive("RandomSearch", batch_size=self.batch_size)

    def init(self, key: jax.Array) -> RandomState:
        del key  # nothing random to set up
        return RandomState(told=jnp.zeros((), jnp.int32))

    def ask(self, key: jax.Array, state: RandomState) -> tuple[jax.Array, RandomState]:
        """(int32 [P, n_choices] uniform samples, state unchanged)."""
        return self.space.sample(key, self.batch_size), state

    def tell(self, state: RandomState, encodings: jax.Array, fitness: jax.Array) -> RandomState:
        check_batch("RandomSearch", encodings, fitness, self.space)
        return state.replace(told=state.told + encodings.shape[0])

    def metrics(self, state: RandomState) -> dict[str, jax.Array]:
        return {}
