"""Strategy wrappers: each takes a strategy and is one, so they compose like optax transformations.

    strategy = with_constraints(deduplicated(RegularizedEvolution(space)), fits_budget)

Order matters where a wrapper edits what the inner one asks: `with_constraints` outermost guarantees
feasibility of what is asked (its last-resort copies of a feasible row may repeat an encoding: the run's
cache counts them as hits); `deduplicated` inside it re-mutates repeats first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies.base import Strategy, check_positive, mutate_changed, uniform

Predicate = Callable[[jax.Array], jax.Array]
"""A cheap, jit-able feasibility test: int32 [P, n_choices] encodings -> bool [P] (True: feasible)."""


@struct.dataclass
class ConstrainedState:
    """`with_constraints`'s state: the inner strategy's state plus counters.

    Attributes:
      inner: the wrapped strategy's state.
      replaced: int32 scalar, infeasible rows the inner strategy asked so far (each was replaced).
      unresolved: int32 scalar, rows asked although still infeasible after every retry.
    """

    inner: object
    replaced: jax.Array
    unresolved: jax.Array


@dataclasses.dataclass(frozen=True)
class Constrained:
    """A strategy that asks only candidates a cheap predicate accepts (see `with_constraints`)."""

    inner: Strategy
    predicate: Predicate
    retries: int = 10

    def __post_init__(self) -> None:
        check_positive("with_constraints", retries=self.retries)

    @property
    def space(self) -> Space:
        return self.inner.space

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def feasible(self, encodings: jax.Array) -> jax.Array:
        """bool [P]: the predicate on ``encodings`` int32 [P, n_choices]."""
        return jnp.asarray(self.predicate(encodings), bool)

    def init(self, key: jax.Array) -> ConstrainedState:
        zero = jnp.zeros((), jnp.int32)
        return ConstrainedState(inner=self.inner.init(key), replaced=zero, unresolved=zero)

    def ask(self, key: jax.Array, state: ConstrainedState) -> tuple[jax.Array, ConstrainedState]:
        """(int32 [P, n_choices], all feasible when any feasible row was found; new state)."""
        k_inner, k_retry, k_copy = jax.random.split(key, 3)
        asked, inner = self.inner.ask(k_inner, state.inner)
        infeasible = ~self.feasible(asked)

        def retry(r, enc):
            # Half the replacements stay near the intended row (a mutant), half jump anywhere (a sample), so
            # both a slightly and a badly infeasible region are left quickly.
            k_mutate, k_sample, k_coin = jax.random.split(jax.random.fold_in(k_retry, r), 3)
            near = mutate_changed(self.space, k_mutate, enc)
            far = self.space.sample(k_sample, enc.shape[0])
            replacement = jnp.where(uniform(k_coin, (enc.shape[0], 1)) < 0.5, near, far)
            return jnp.where(self.feasible(enc)[:, None], enc, replacement)

        enc = jax.lax.fori_loop(0, self.retries, retry, asked)
        ok = self.feasible(enc)
        # Last resort: a copy of a random feasible row of the batch.
        donor = jnp.argmax(jnp.where(ok, uniform(k_copy, ok.shape), -1.0))
        enc = jnp.where((ok | ~ok[donor])[:, None], enc, enc[donor])
        state = ConstrainedState(
            inner=inner,
            replaced=state.replaced + jnp.sum(infeasible),
            unresolved=state.unresolved + jnp.sum(~self.feasible(enc)),
        )
        return enc, state

    def tell(self, state: ConstrainedState, encodings: jax.Array, fitness: jax.Array, **extra) -> ConstrainedState:
        """Forward to the inner strategy with the fitness of infeasible rows replaced by -inf."""
        fitness = jnp.asarray(fitness, jnp.float32)
        ok = self.feasible(encodings).reshape((-1,) + (1,) * (fitness.ndim - 1))
        return state.replace(inner=self.inner.tell(state.inner, encodings, jnp.where(ok, fitness, -jnp.inf), **extra))

    def metrics(self, state: ConstrainedState) -> dict[str, jax.Array]:
        """The inner metrics plus ``infeasible_replaced`` and ``infeasible_asked`` (rows, cumulative)."""
        return {**self.inner.metrics(state.inner), "infeasible_replaced": state.replaced,
                "infeasible_asked": state.unresolved}


def with_constraints(strategy: Strategy, predicate: Predicate, *, retries: int = 10) -> Constrained:
    """A strategy asking only candidates ``predicate`` accepts (e.g. analytic params <= 1e5). Jittable if both are.

    Each infeasible asked row is replaced, up to ``retries`` times, by a mutant of itself or a uniform
    sample (a coin flip each time); a row still infeasible then becomes a copy of a feasible row of the
    batch. Only if the whole batch is infeasible are infeasible rows asked; whatever is told for an
    infeasible row reaches the inner strategy as -inf, so it never becomes a parent or the best (callers may
    skip evaluating it: `Constrained.feasible`).
    """
    return Constrained(strategy, predicate, retries)


@struct.dataclass
class DedupState:
    """`deduplicated`'s state.

    Attributes:
      inner: the wrapped strategy's state.
      seen: int32 [C, n_choices] canonical encodings told so far (a ring buffer: beyond C the oldest are
        forgotten).
      told: int32 scalar, encodings told so far.
      replaced: int32 scalar, repeated rows the inner strategy asked so far (each was re-mutated).
      unresolved: int32 scalar, rows asked although still repeating after every retry.
    """

    inner: object
    seen: jax.Array
    told: jax.Array
    replaced: jax.Array
    unresolved: jax.Array


@dataclasses.dataclass(frozen=True)
class Deduplicated:
    """A strategy that does not ask encodings already told or repeated in its batch (see `deduplicated`)."""

    inner: Strategy
    capacity: int = 1024
    retries: int = 10

    def __post_init__(self) -> None:
        check_positive("deduplicated", capacity=self.capacity, retries=self.retries)

    @property
    def space(self) -> Space:
        return self.inner.space

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def repeats(self, state: DedupState, encodings: jax.Array) -> jax.Array:
        """bool [P]: rows of ``encodings`` int32 [P, n_choices] already told or repeating an earlier row."""
        enc = self.space.canonicalize(encodings)
        known = jnp.arange(self.capacity) < state.told
        told = jnp.any(jnp.all(enc[:, None, :] == state.seen[None, :, :], -1) & known[None, :], -1)
        return told | ~self.space.first_occurrence(enc)

    def init(self, key: jax.Array) -> DedupState:
        zero = jnp.zeros((), jnp.int32)
        return DedupState(
            inner=self.inner.init(key),
            seen=jnp.zeros((self.capacity, self.space.n_choices), jnp.int32),
            told=zero,
            replaced=zero,
            unresolved=zero,
        )

    def ask(self, key: jax.Array, state: DedupState) -> tuple[jax.Array, DedupState]:
        """(int32 [P, n_choices] encodings not told before and distinct within the batch when found; new state)."""
        k_inner, k_retry = jax.random.split(key)
        asked, inner = self.inner.ask(k_inner, state.inner)

        def retry(r, enc):
            mutant = mutate_changed(self.space, jax.random.fold_in(k_retry, r), enc)
            return jnp.where(self.repeats(state, enc)[:, None], mutant, enc)

        enc = jax.lax.fori_loop(0, self.retries, retry, asked)
        return enc, state.replace(
            inner=inner,
            replaced=state.replaced + jnp.sum(self.repeats(state, asked)),
            unresolved=state.unresolved + jnp.sum(self.repeats(state, enc)),
        )

    def tell(self, state: DedupState, encodings: jax.Array, fitness: jax.Array, **extra) -> DedupState:
        """Record ``encodings`` as told and forward everything to the inner strategy."""
        slots = (state.told + jnp.arange(encodings.shape[0])) % self.capacity
        return state.replace(
            inner=self.inner.tell(state.inner, encodings, fitness, **extra),
            seen=state.seen.at[slots].set(self.space.canonicalize(encodings)),
            told=state.told + encodings.shape[0],
        )

    def metrics(self, state: DedupState) -> dict[str, jax.Array]:
        """The inner metrics plus ``duplicates_replaced`` and ``duplicates_asked`` (rows, cumulative)."""
        return {**self.inner.metrics(state.inner), "duplicates_replaced": state.replaced,
                "duplicates_asked": state.unresolved}


def deduplicated(strategy: Strategy, *, capacity: int = 1024, retries: int = 10) -> Deduplicated:
    """A strategy that never asks an encoding it was told before, nor one twice in a batch. Jittable.

    Told encodings are kept (canonical) in an array of ``capacity`` rows. An asked row that repeats one is
    re-mutated (at least one choice changes), up to ``retries`` times; a row still repeating is then asked
    anyway (a cache above it counts the hit). The inner strategy is told what was actually asked.
    """
    return Deduplicated(strategy, capacity, retries)
