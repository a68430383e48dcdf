"""Populations of candidate architectures trained and scored together, in one of two backends that compute the
same networks:

- **masked** (`jaxnas.population.masked`): one compiled program for the whole population, `jax.vmap` over
  candidates of any supernet family, every candidate at the supernet's largest sizes with masks. The form for
  GPU / TPU and for populations sharded over devices (`jaxnas.population.sharding`).
- **sized** (`jaxnas.population.sized` for scoring, `jaxnas.population.sized_train` for training): each candidate
  at its own sizes through layer programs compiled once per layer size, for the macro space. The fast form on
  CPU, where XLA runs vmapped per-candidate convolutions densely. Language models train sized through
  `jaxnas.population.lm_sized` (each candidate's twin on its own, written back with `LMSupernet.embed`).

The search picks one with ``population.backend=auto|masked|sized`` (`jaxnas.config.PopulationConfig`). Both use
the same per-candidate bookkeeping and step pieces (`jaxnas.population.common`), so a candidate draws the same
randomness, stops early and fails the same way in either. Weight-sharing training of one supernet is
`jaxnas.population.weight_sharing`.

    from jaxnas import population as pop
    params_P = pop.init_population(supernet.init, jax.random.key(0), P)
    result = pop.train_population(supernet.apply, params_P, encs, optax.adam(1e-3), x, y, vx, vy, epochs=3,
                                  batch_size=64)
"""

from jaxnas.population.common import (
    STATUS_EARLY_STOPPED,
    STATUS_FAILED,
    STATUS_OK,
    Apply,
    PopulationResult,
    all_finite,
    batched,
    candidate_keys,
    check_population,
    check_training,
    classification_report,
    guard,
    init_population,
    run_epochs,
    shifted,
    step_keys,
    tile_population,
)
from jaxnas.population.masked import (
    PopulationState,
    evaluate_population,
    evaluate_shared,
    predict,
    train_population,
)
from jaxnas.population.sharding import population_mesh, replicate, shard_population
from jaxnas.population.weight_sharing import SubnetSampler, train_supernet

__all__ = [
    "STATUS_EARLY_STOPPED",
    "STATUS_FAILED",
    "STATUS_OK",
    "Apply",
    "PopulationResult",
    "PopulationState",
    "SubnetSampler",
    "all_finite",
    "batched",
    "candidate_keys",
    "check_population",
    "check_training",
    "classification_report",
    "evaluate_population",
    "evaluate_shared",
    "guard",
    "init_population",
    "population_mesh",
    "predict",
    "replicate",
    "run_epochs",
    "shard_population",
    "shifted",
    "step_keys",
    "tile_population",
    "train_population",
    "train_supernet",
]
