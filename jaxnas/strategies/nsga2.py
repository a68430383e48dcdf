"""NSGA-II (Deb et al. 2002) with constraint-domination, for multi-objective search. Jittable.

Objectives are maximised (negate a cost such as params or latency); fitness is float32 [P, M]. A
candidate's constraint violation (float32 [P], 0 when feasible, larger is worse) is passed to ``tell``;
constraint-domination then orders candidates: a feasible one beats an infeasible one, of two infeasible
ones the smaller violation wins, and two feasible ones compare by Pareto dominance. A failed evaluation
(any objective NaN or -inf) counts as infeasible with the largest finite violation, so it ranks below
every candidate that ran.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies.base import (
    check_batch,
    check_positive,
    check_rates,
    mutate_changed,
    option_entropy,
    randint,
    rates_array,
    uniform,
)

_FAILED = float(jnp.finfo(jnp.float32).max)
"""Violation of a failed evaluation: worse than any real violation, better than an empty slot (+inf)."""


def constrained_dominates(objectives: jax.Array, violation: jax.Array) -> jax.Array:
    """bool [K, K]: entry [i, j] says candidate i constraint-dominates candidate j.

    ``objectives`` float [K, M] (maximised; ignored for infeasible candidates), ``violation`` float [K]
    (0: feasible).
    """
    feasible = violation <= 0
    ge = jnp.all(objectives[:, None, :] >= objectives[None, :, :], -1)
    gt = jnp.any(objectives[:, None, :] > objectives[None, :, :], -1)
    both = feasible[:, None] & feasible[None, :]
    neither = ~feasible[:, None] & ~feasible[None, :]
    return (
        (feasible[:, None] & ~feasible[None, :])
        | (neither & (violation[:, None] < violation[None, :]))
        | (both & ge & gt)
    )


def non_dominated_ranks(dominates: jax.Array) -> jax.Array:
    """int32 [K]: front of each candidate (0: dominated by none) given ``dominates`` bool [K, K] ([i, j]: i over j).

    Fronts are peeled one at a time: a front is every remaining candidate no remaining candidate dominates.
    """
    k = dominates.shape[0]

    def peel(carry):
        ranks, remaining, front = carry
        dominated = jnp.any(dominates & remaining[:, None], 0)
        current = remaining & ~dominated
        return jnp.where(current, front, ranks), remaining & ~current, front + 1

    ranks, _, _ = jax.lax.while_loop(
        lambda carry: jnp.any(carry[1]), peel, (jnp.zeros(k, jnp.int32), jnp.ones(k, bool), jnp.zeros((), jnp.int32))
    )
    return ranks


def crowding_distance(objectives: jax.Array, ranks: jax.Array) -> jax.Array:
    """float32 [K]: crowding distance of each candidate within its front (Deb et al. 2002).

    For each objective, a front's members are sorted by it; the two extremes get +inf and every other
    member adds (next - previous) / (front's max - min) of that objective (0 if the front is flat there).
    ``objectives`` float [K, M], ``ranks`` int [K] from `non_dominated_ranks`.
    """
    k, m = objectives.shape
    objectives = jnp.where(jnp.isfinite(objectives), objectives, 0.0)  # failed rows: no NaN from inf - inf
    distance = jnp.zeros(k, jnp.float32)
    for j in range(m):
        column = objectives[:, j]
        order = jnp.lexsort((column, ranks))
        sorted_rank, sorted_value = ranks[order], column[order]
        has_prev = jnp.concatenate([jnp.zeros(1, bool), sorted_rank[1:] == sorted_rank[:-1]])
        has_next = jnp.concatenate([sorted_rank[:-1] == sorted_rank[1:], jnp.zeros(1, bool)])
        prev = jnp.concatenate([sorted_value[:1], sorted_value[:-1]])
        nxt = jnp.concatenate([sorted_value[1:], sorted_value[-1:]])
        low = jax.ops.segment_min(column, ranks, num_segments=k)[sorted_rank]
        high = jax.ops.segment_max(column, ranks, num_segments=k)[sorted_rank]
        span = high - low
        gap = jnp.where(span > 0, (nxt - prev) / jnp.where(span > 0, span, 1.0), 0.0)
        contribution = jnp.where(has_prev & has_next, gap, jnp.inf)
        distance = distance.at[order].add(contribution.astype(jnp.float32))
    return distance


def _rank_and_crowd(objectives: jax.Array, violation: jax.Array) -> tuple[jax.Array, jax.Array]:
    ranks = non_dominated_ranks(constrained_dominates(objectives, violation))
    return ranks, crowding_distance(objectives, ranks)


def survivors(objectives: jax.Array, violation: jax.Array, n: int) -> jax.Array:
    """int32 [n]: indices of the n best candidates by (front ascending, crowding distance descending)."""
    ranks, crowding = _rank_and_crowd(objectives, violation)
    return jnp.lexsort((-crowding, ranks))[:n].astype(jnp.int32)


@struct.dataclass
class NSGA2State:
    """The current population with its ranking.

    Attributes:
      population: int32 [N, n_choices] members.
      objectives: float32 [N, M] their objectives (maximised).
      violation: float32 [N] their constraint violation (0: feasible; +inf: empty slot before the first tell).
      rank: int32 [N] front of each member (0: non-dominated).
      crowding: float32 [N] crowding distance within its front.
      generation: int32 scalar, generations told so far.
    """

    population: jax.Array
    objectives: jax.Array
    violation: jax.Array
    rank: jax.Array
    crowding: jax.Array
    generation: jax.Array


@dataclasses.dataclass(frozen=True)
class NSGA2:
    """NSGA-II: each ask is N children of binary tournaments on (rank, crowding), crossed and mutated. Jittable.

    The first ask is N uniform samples. Tell merges the population and the N told children and keeps the
    N best by constraint-domination fronts, then crowding distance.

    Args:
      space: the search space.
      n_objectives: M, objectives per candidate.
      population_size: N, also the children per ask.
      crossover_rate: probability that `Space.compatible` parents are crossed.
      mutation_rates: None (the space's declared rates), one rate or one per choice; at least one choice of
        every child changes.
    """

    space: Space
    n_objectives: int = 2
    population_size: int = 20
    crossover_rate: float = 0.5
    mutation_rates: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_positive("NSGA2", n_objectives=self.n_objectives, population_size=self.population_size)
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise ValueError(f"NSGA2: crossover_rate must lie in [0, 1], got {self.crossover_rate}")
        check_rates("NSGA2", self)

    @property
    def batch_size(self) -> int:
        return self.population_size

    def init(self, key: jax.Array) -> NSGA2State:
        del key  # the first generation is sampled by the first ask
        n, m = self.population_size, self.n_objectives
        return NSGA2State(
            population=jnp.zeros((n, self.space.n_choices), jnp.int32),
            objectives=jnp.zeros((n, m), jnp.float32),
            violation=jnp.full(n, jnp.inf, jnp.float32),
            rank=jnp.zeros(n, jnp.int32),
            crowding=jnp.zeros(n, jnp.float32),
            generation=jnp.zeros((), jnp.int32),
        )

    def _binary_tournament(self, key: jax.Array, state: NSGA2State) -> jax.Array:
        pairs = randint(key, (self.population_size, 2), self.population_size)
        i, j = pairs[:, 0], pairs[:, 1]
        same_front = state.rank[i] == state.rank[j]
        i_wins = (state.rank[i] < state.rank[j]) | (same_front & (state.crowding[i] >= state.crowding[j]))
        return state.population[jnp.where(i_wins, i, j)]

    def ask(self, key: jax.Array, state: NSGA2State) -> tuple[jax.Array, NSGA2State]:
        """(int32 [N, n_choices] children, state unchanged)."""
        k_sample, k_a, k_b, k_coin, k_cross, k_mutate = jax.random.split(key, 6)
        a, b = self._binary_tournament(k_a, state), self._binary_tournament(k_b, state)
        cross = uniform(k_coin, (self.population_size, 1)) < self.crossover_rate
        child = jnp.where(cross, self.space.crossover(k_cross, a, b), a)
        children = mutate_changed(self.space, k_mutate, child, rates_array(self.space, self.mutation_rates))
        return jnp.where(state.generation == 0, self.space.sample(k_sample, self.population_size), children), state

    def tell(self, state: NSGA2State, encodings: jax.Array, fitness: jax.Array,
             violation: jax.Array | None = None) -> NSGA2State:
        """Merge the told children (fitness float32 [N, M]; violation float32 [N], None: all feasible)."""
        check_batch("NSGA2", encodings, fitness, self.space, self.n_objectives)
        if encodings.shape[0] != self.population_size:
            raise ValueError(f"NSGA2.tell: tell a whole generation of {self.population_size} children, "
                             f"got {encodings.shape[0]}")
        fitness = jnp.asarray(fitness, jnp.float32)
        told_violation = jnp.zeros(encodings.shape[0], jnp.float32) if violation is None else jnp.asarray(
            violation, jnp.float32)
        if told_violation.shape != (encodings.shape[0],):
            raise ValueError(f"NSGA2.tell: violation must have shape [{encodings.shape[0]}] (one per candidate, "
                             f"0 when feasible), got {list(told_violation.shape)}")
        failed = jnp.any(jnp.isnan(fitness) | (fitness == -jnp.inf), -1)
        told_violation = jnp.where(failed | jnp.isnan(told_violation), _FAILED, jnp.maximum(told_violation, 0.0))
        objectives = jnp.concatenate([state.objectives, jnp.where(failed[:, None], 0.0, fitness)])
        violations = jnp.concatenate([state.violation, told_violation])
        population = jnp.concatenate([state.population, jnp.asarray(encodings, jnp.int32)])
        keep = survivors(objectives, violations, self.population_size)
        rank, crowding = _rank_and_crowd(objectives[keep], violations[keep])
        return NSGA2State(
            population=population[keep],
            objectives=objectives[keep],
            violation=violations[keep],
            rank=rank,
            crowding=crowding,
            generation=state.generation + 1,
        )

    def metrics(self, state: NSGA2State) -> dict[str, jax.Array]:
        """``front_size``: feasible members of the first front; ``diversity``: `option_entropy` (nats)."""
        filled = jnp.isfinite(state.violation)
        return {
            "front_size": jnp.sum((state.rank == 0) & (state.violation <= 0)),
            "diversity": option_entropy(self.space, state.population, filled),
        }
