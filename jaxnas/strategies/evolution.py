"""Evolutionary strategies: regularized evolution (aging) and a generational genetic algorithm. Both jittable."""

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
    clean_fitness,
    mutate_changed,
    mutate_one,
    option_entropy,
    rates_array,
    tournament,
    uniform,
)

MUTATIONS = ("rates", "one")
"""``"rates"``: each choice redrawn with its per-choice rate, at least one; ``"one"``: exactly one choice."""


@struct.dataclass
class EvolutionState:
    """Regularized evolution's population, a ring buffer in order of birth.

    Attributes:
      population: int32 [N, n_choices] members (rows not yet told hold zeros).
      fitness: float32 [N] their fitness (-inf: empty or failed).
      told: int32 scalar, candidates told so far; the next one replaces slot ``told % N``, the oldest member.
    """

    population: jax.Array
    fitness: jax.Array
    told: jax.Array


@dataclasses.dataclass(frozen=True)
class RegularizedEvolution:
    """Regularized (aging) evolution, Real et al. 2019. Jittable.

    Until N candidates have been told, asks are uniform samples. Then each asked child is a mutant of the
    fittest of ``sample_size`` members drawn without replacement; each told child joins the population and
    the oldest member dies, whatever its fitness (aging).

    Args:
      space: the search space.
      population_size: N, members kept.
      sample_size: S, members drawn per parent selection (S <= N).
      batch_size: P, children per ask (1: the published one mutant per step; P <= N).
      mutation: ``"one"`` (exactly one choice redrawn, as published) or ``"rates"`` (each choice with its
        per-choice rate, at least one).
      mutation_rates: for ``"rates"``: None (the space's declared rates), one rate or one per choice.
    """

    space: Space
    population_size: int = 20
    sample_size: int = 5
    batch_size: int = 1
    mutation: str = "rates"
    mutation_rates: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = "RegularizedEvolution"
        check_positive(name, population_size=self.population_size, sample_size=self.sample_size,
                       batch_size=self.batch_size)
        if self.sample_size > self.population_size or self.batch_size > self.population_size:
            raise ValueError(
                f"{name}: sample_size ({self.sample_size}) and batch_size ({self.batch_size}) must not exceed "
                f"population_size ({self.population_size}); raise the population or lower them"
            )
        if self.mutation not in MUTATIONS:
            raise ValueError(f"{name}: mutation must be one of {MUTATIONS}, got {self.mutation!r}")
        check_rates(name, self)

    def init(self, key: jax.Array) -> EvolutionState:
        del key  # the population starts empty; the first asks sample it
        n = self.population_size
        return EvolutionState(
            population=jnp.zeros((n, self.space.n_choices), jnp.int32),
            fitness=jnp.full(n, -jnp.inf, jnp.float32),
            told=jnp.zeros((), jnp.int32),
        )

    def ask(self, key: jax.Array, state: EvolutionState) -> tuple[jax.Array, EvolutionState]:
        """(int32 [P, n_choices]: uniform samples while the population fills, then mutants; state unchanged)."""
        k_sample, k_select, k_mutate = jax.random.split(key, 3)
        n, p = self.population_size, self.batch_size
        # top_k of i.i.d. uniforms: S distinct members per child, drawn uniformly.
        _, entrants = jax.lax.top_k(uniform(k_select, (p, n)), self.sample_size)
        parents = state.population[entrants[jnp.arange(p), jnp.argmax(state.fitness[entrants], -1)]]
        if self.mutation == "one":
            children = mutate_one(self.space, k_mutate, parents)
        else:
            children = mutate_changed(self.space, k_mutate, parents, rates_array(self.space, self.mutation_rates))
        filling = state.told < n
        return jnp.where(filling, self.space.sample(k_sample, p), children), state

    def tell(self, state: EvolutionState, encodings: jax.Array, fitness: jax.Array) -> EvolutionState:
        check_batch("RegularizedEvolution", encodings, fitness, self.space)
        slots = (state.told + jnp.arange(encodings.shape[0])) % self.population_size
        return EvolutionState(
            population=state.population.at[slots].set(jnp.asarray(encodings, jnp.int32)),
            fitness=state.fitness.at[slots].set(clean_fitness(fitness)),
            told=state.told + encodings.shape[0],
        )

    def metrics(self, state: EvolutionState) -> dict[str, jax.Array]:
        """``diversity``: `option_entropy` of the members told so far (nats)."""
        filled = jnp.arange(self.population_size) < state.told
        return {"diversity": option_entropy(self.space, state.population, filled)}


@struct.dataclass
class GeneticState:
    """A genetic algorithm's current generation.

    Attributes:
      population: int32 [N, n_choices] members (elites first, then the last generation's children).
      fitness: float32 [N] their fitness (-inf: empty or failed).
      filled: bool [N] which rows hold told members (before the first tell, none).
      generation: int32 scalar, generations told so far.
      entropy: float32 scalar, `option_entropy` of the filled members, updated every generation.
    """

    population: jax.Array
    fitness: jax.Array
    filled: jax.Array
    generation: jax.Array
    entropy: jax.Array


@dataclasses.dataclass(frozen=True)
class GeneticAlgorithm:
    """A generational genetic algorithm with elitism (S-NAS style). Jittable.

    Each ask is a generation of P = N - E children: two parents by tournament selection; when they are
    `Space.compatible` (e.g. the same network family) and with probability ``crossover_rate``, the child is
    their uniform crossover, otherwise a copy of the first; then it is mutated with per-choice rates (at
    least one choice changes, so no child is a clone). The first generation is uniform samples. Tell keeps
    the E fittest members of the previous population (elitism) and all P told children, and records the
    population's Shannon entropy (`option_entropy`) as its diversity.

    Args:
      space: the search space.
      population_size: N.
      elites: E, members carried over unchanged (0 <= E < N).
      tournament_size: members per tournament (drawn with replacement).
      crossover_rate: probability that compatible parents are crossed.
      mutation_rates: None (the space's declared rates, e.g. a lower one for the network type), one rate
        or one per choice.
    """

    space: Space
    population_size: int = 20
    elites: int = 2
    tournament_size: int = 3
    crossover_rate: float = 0.5
    mutation_rates: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = "GeneticAlgorithm"
        check_positive(name, population_size=self.population_size, tournament_size=self.tournament_size)
        if not 0 <= self.elites < self.population_size:
            raise ValueError(f"{name}: elites must lie in [0, population_size) = [0, {self.population_size}), "
                             f"got {self.elites}")
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise ValueError(f"{name}: crossover_rate must lie in [0, 1], got {self.crossover_rate}")
        check_rates(name, self)

    @property
    def batch_size(self) -> int:
        """P = N - E children per generation."""
        return self.population_size - self.elites

    def init(self, key: jax.Array) -> GeneticState:
        del key  # the first generation is sampled by the first ask
        n = self.population_size
        return GeneticState(
            population=jnp.zeros((n, self.space.n_choices), jnp.int32),
            fitness=jnp.full(n, -jnp.inf, jnp.float32),
            filled=jnp.zeros(n, bool),
            generation=jnp.zeros((), jnp.int32),
            entropy=jnp.zeros((), jnp.float32),
        )

    def ask(self, key: jax.Array, state: GeneticState) -> tuple[jax.Array, GeneticState]:
        """(int32 [P, n_choices] the next generation's children, state unchanged)."""
        k_sample, k_a, k_b, k_cross, k_coin, k_mutate = jax.random.split(key, 6)
        p = self.batch_size
        a = state.population[tournament(k_a, state.fitness, p, self.tournament_size)]
        b = state.population[tournament(k_b, state.fitness, p, self.tournament_size)]
        cross = uniform(k_coin, (p, 1)) < self.crossover_rate
        # crossover() itself returns a copy of `a` for incompatible parents.
        child = jnp.where(cross, self.space.crossover(k_cross, a, b), a)
        children = mutate_changed(self.space, k_mutate, child, rates_array(self.space, self.mutation_rates))
        return jnp.where(state.generation == 0, self.space.sample(k_sample, p), children), state

    def tell(self, state: GeneticState, encodings: jax.Array, fitness: jax.Array) -> GeneticState:
        check_batch("GeneticAlgorithm", encodings, fitness, self.space)
        if encodings.shape[0] != self.batch_size:
            raise ValueError(
                f"GeneticAlgorithm.tell: tell a whole generation of {self.batch_size} children (population_size - "
                f"elites), got {encodings.shape[0]}"
            )
        _, elite = jax.lax.top_k(jnp.where(state.filled, state.fitness, -jnp.inf), self.elites)
        population = jnp.concatenate([state.population[elite], jnp.asarray(encodings, jnp.int32)])
        filled = jnp.concatenate([state.filled[elite], jnp.ones(self.batch_size, bool)])
        return GeneticState(
            population=population,
            fitness=jnp.concatenate([state.fitness[elite], clean_fitness(fitness)]),
            filled=filled,
            generation=state.generation + 1,
            entropy=option_entropy(self.space, population, filled),
        )

    def metrics(self, state: GeneticState) -> dict[str, jax.Array]:
        """``diversity``: the population's entropy, ``generation``: generations told."""
        return {"diversity": state.entropy, "generation": state.generation}
