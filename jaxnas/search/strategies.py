"""The configured strategy: ``search.strategy`` and its knobs -> a de-duplicated, jittable ask / tell strategy.

Every strategy asks ``search.population`` candidates per generation (P, the vmapped population) and is wrapped in
`deduplicated`, so it never asks an architecture it was told before (the run's cache catches what remains).
"""

from __future__ import annotations

from jaxnas.config import GRADIENT_STRATEGIES, RunConfig
from jaxnas.spaces.core import Space
from jaxnas.strategies import (
    NSGA2,
    BayesianOptimization,
    GeneticAlgorithm,
    LocalSearch,
    PredictorGuided,
    RandomSearch,
    RegularizedEvolution,
    deduplicated,
    progressive,
)


BO_MAX_POPULATION = 256
"""Most candidates search.strategy=bo asks per generation (each pick conditions the GP on the ones before)."""


def _levels(space: Space) -> list[list[str]]:
    """Complexity levels of the progressive strategy: deeper stages open one by one (macro); NB201 opens the
    edges between intermediate nodes after those from the input; other spaces open their second half of choices."""
    if space.name == "macro":
        return [[n] for n in space.names if n.endswith(".depth") and n != "stage1.depth"]
    if space.name == "nb201":
        return [["2<-1", "3<-1"], ["3<-2"]]
    names = list(space.names)
    return [names[len(names) // 2 :]]


def build_strategy(cfg: RunConfig, space: Space, n_objectives: int):
    s = cfg.search
    if s.strategy in GRADIENT_STRATEGIES:
        raise ValueError(f"search.strategy={s.strategy} is a gradient-based search, not an ask / tell strategy: "
                         "mode=differentiable runs it (jaxnas.search.differentiable)")
    P = s.population
    pool = s.pool_size or 2 * P
    if s.strategy == "random":
        inner = RandomSearch(space, batch_size=P)
    elif s.strategy == "evolution":
        if s.sample_size > pool:
            raise ValueError(f"search.sample_size={s.sample_size} exceeds search.pool_size={pool}; lower it")
        inner = RegularizedEvolution(space, population_size=max(pool, P), sample_size=s.sample_size, batch_size=P)
    elif s.strategy in ("genetic", "progressive"):
        inner = GeneticAlgorithm(space, population_size=P + s.elites, elites=s.elites, crossover_rate=s.crossover_rate)
        if s.strategy == "progressive":
            levels = _levels(space)
            inner = progressive(inner, levels, generations_per_level=s.generations_per_level) if levels else inner
    elif s.strategy == "nsga2":
        if n_objectives < 2:
            raise ValueError("search.strategy=nsga2 needs at least two objectives, e.g. "
                             "objectives.objectives=[val_accuracy,params:min]")
        inner = NSGA2(space, n_objectives=n_objectives, population_size=P, crossover_rate=s.crossover_rate)
    elif s.strategy == "local":
        inner = LocalSearch(space, batch_size=P)
    elif s.strategy == "bo":
        if P > BO_MAX_POPULATION:
            raise ValueError(f"search.strategy=bo picks each generation's candidates one by one from a Gaussian "
                             f"process: search.population must be at most {BO_MAX_POPULATION}, got {P}")
        # The GP's cost grows with the cube of its archive: capacity near the budget, the best 512 beyond.
        initial = max(10, P)
        inner = BayesianOptimization(space, batch_size=P, initial=initial, candidates=max(512, 4 * P),
                                     capacity=max(initial, min(512, s.budget + 2 * P)))
    else:
        # A GP solves a [C, C] system per fit step: its ring buffer holds the latest 512 at most.
        capacity = max(P, min(512, 2 * s.budget)) if s.surrogate == "gp" else max(512, 2 * s.budget)
        inner = PredictorGuided(space, batch_size=P, initial=max(2, P), capacity=capacity, surrogate=s.surrogate)
    return deduplicated(inner, capacity=max(1024, 2 * s.budget))
