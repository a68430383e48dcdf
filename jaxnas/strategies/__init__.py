"""Search strategies as functional ask / tell over pytree states (jittable, vmappable over seeds), and their wrappers.

    strategy = deduplicated(RegularizedEvolution(space, population_size=20, sample_size=5))
    state = strategy.init(key)
    encodings, state = strategy.ask(key, state)        # int32 [P, n_choices]
    state = strategy.tell(state, encodings, fitness)   # float32 [P], maximised; NaN / -inf: failed

Every strategy and wrapper here is jittable (``jax.jit(strategy.ask)``, ``jax.jit(strategy.tell)``) and
vmappable over keys and states, with array-only states of static shapes.
"""

from jaxnas.strategies.base import Strategy, mutate_changed, mutate_one, option_entropy, spearman, tournament
from jaxnas.strategies.bo import BayesianOptimization
from jaxnas.strategies.evolution import GeneticAlgorithm, RegularizedEvolution
from jaxnas.strategies.local import LocalSearch
from jaxnas.strategies.nsga2 import NSGA2, constrained_dominates, crowding_distance, non_dominated_ranks
from jaxnas.strategies.predictor import PredictorGuided
from jaxnas.strategies.progressive import progressive
from jaxnas.strategies.random import RandomSearch
from jaxnas.strategies.wrappers import deduplicated, with_constraints

__all__ = [
    "NSGA2",
    "BayesianOptimization",
    "GeneticAlgorithm",
    "LocalSearch",
    "PredictorGuided",
    "RandomSearch",
    "RegularizedEvolution",
    "Strategy",
    "constrained_dominates",
    "crowding_distance",
    "deduplicated",
    "mutate_changed",
    "mutate_one",
    "non_dominated_ranks",
    "option_entropy",
    "progressive",
    "spearman",
    "tournament",
    "with_constraints",
]
