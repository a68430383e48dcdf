"""Predictor-assisted search: a surrogate fitted on the archive screens many mutants; only the best are asked.

The surrogate is an ensemble of small MLPs on one-hot encodings (inactive choices all zero), trained with
optax Adam on the standardised fitness of every candidate told so far. Each ask mutates archive members
picked by tournament (plus some uniform samples), drops candidates already in the archive or repeated,
and asks the P with the highest predicted fitness (ensemble mean + ``exploration`` x ensemble std). At
every tell, before retraining, the ensemble's predictions for the told candidates are compared with their
real fitness: the Spearman rank correlation is kept in the state (``spearman``, and its running mean). Jittable.

``surrogate="gp"`` screens with a Gaussian process instead (`jaxnas.strategies.gp`: an exponentiated-Hamming kernel
with one length scale per choice, fitted by marginal likelihood at every tell on the same standardised fitness;
mean + exploration x std of its posterior), so the two surrogates are compared inside one strategy with the same
logged rank correlation. `jaxnas.strategies.bo` (search.strategy=bo) uses that GP with expected improvement.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies import gp
from jaxnas.strategies.base import (
    check_batch,
    check_positive,
    clean_fitness,
    mutate_changed,
    one_hot_choices,
    spearman,
    tournament,
)


@struct.dataclass
class PredictorState:
    """Archive, surrogate and its measured quality.

    Attributes:
      archive: int32 [C, n_choices] told candidates (a ring buffer: beyond C, the oldest are forgotten).
      fitness: float32 [C] their fitness (-inf: empty or failed).
      told: int32 scalar, candidates told so far.
      params: the surrogate's parameters: the ensemble's MLP weights (dict of float32 arrays with a leading [E]
        axis), or the GP's hyper-parameters (`gp.GPParams`).
      spearman: float32 scalar, rank correlation of predicted and real fitness on the last told batch
        (NaN until the surrogate has been trained).
      spearman_sum, spearman_count: float32 / int32 scalars, for the running mean over batches.
    """

    archive: jax.Array
    fitness: jax.Array
    told: jax.Array
    params: dict | gp.GPParams
    spearman: jax.Array
    spearman_sum: jax.Array
    spearman_count: jax.Array


@dataclasses.dataclass(frozen=True)
class PredictorGuided:
    """Surrogate-screened evolution; see the module docstring.

    Args:
      space: the search space.
      batch_size: P, encodings per ask.
      initial: candidates sampled uniformly before the surrogate is used (at least 2).
      candidates: mutants (and samples) scored per ask.
      random_fraction: share of those candidates that are uniform samples rather than mutants.
      tournament_size: archive members per parent tournament.
      ensemble: E, MLPs in the ensemble.
      hidden: width of each MLP's two hidden layers.
      train_steps: Adam steps per tell (warm-started from the previous weights).
      learning_rate: Adam's step size.
      exploration: weight of the ensemble's std in the screening score.
      capacity: C, archive rows (static shape); the GP solves a [C, C] system per step, O(C^3).
      surrogate: ``"mlp"`` (the ensemble) or ``"gp"`` (a Gaussian process; ensemble, hidden and train_steps unused).
      gp_fit_steps: surrogate gp: Adam steps on the marginal likelihood per tell (step size 0.1).
    """

    space: Space
    batch_size: int = 10
    initial: int = 20
    candidates: int = 256
    random_fraction: float = 0.25
    tournament_size: int = 5
    ensemble: int = 5
    hidden: int = 32
    train_steps: int = 100
    learning_rate: float = 3e-3
    exploration: float = 0.5
    capacity: int = 512
    surrogate: Literal["mlp", "gp"] = "mlp"
    gp_fit_steps: int = 10

    def __post_init__(self) -> None:
        check_positive("PredictorGuided", batch_size=self.batch_size, candidates=self.candidates,
                       tournament_size=self.tournament_size, ensemble=self.ensemble, hidden=self.hidden,
                       train_steps=self.train_steps, capacity=self.capacity)
        if self.initial < 2:
            raise ValueError(f"PredictorGuided: initial must be >= 2 (a surrogate needs data), got {self.initial}")
        if self.candidates < self.batch_size:
            raise ValueError(f"PredictorGuided: candidates ({self.candidates}) must be at least batch_size "
                             f"({self.batch_size}): the surrogate picks the asked ones among them")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ValueError(f"PredictorGuided: random_fraction must lie in [0, 1], got {self.random_fraction}")
        if self.surrogate not in ("mlp", "gp"):
            raise ValueError(f"PredictorGuided: surrogate must be mlp or gp, got {self.surrogate!r}")
        check_positive("PredictorGuided", gp_fit_steps=self.gp_fit_steps)

    @property
    def _width(self) -> int:
        return int(self.space.cardinalities.max())

    def features(self, encodings: jax.Array) -> jax.Array:
        """float32 [..., n_choices * M]: one-hot options of active choices (inactive choices all zero)."""
        return one_hot_choices(self.space, encodings).reshape(*encodings.shape[:-1], -1)

    def _init_mlp(self, key: jax.Array) -> dict:
        d, h = self.space.n_choices * self._width, self.hidden
        k1, k2, k3 = jax.random.split(key, 3)
        glorot = jax.nn.initializers.glorot_normal()
        return {
            "w1": glorot(k1, (d, h)), "b1": jnp.zeros(h),
            "w2": glorot(k2, (h, h)), "b2": jnp.zeros(h),
            "w3": glorot(k3, (h, 1)), "b3": jnp.zeros(1),
        }

    @staticmethod
    def _mlp(params: dict, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(x @ params["w1"] + params["b1"])
        x = jax.nn.relu(x @ params["w2"] + params["b2"])
        return (x @ params["w3"] + params["b3"])[..., 0]

    def _targets(self, archive_fitness: jax.Array, told: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(standardised fitness float32 [C], rows to learn from bool [C]: told and finite)."""
        use = (jnp.arange(self.capacity) < told) & jnp.isfinite(archive_fitness)
        count = jnp.maximum(jnp.sum(use), 1)
        mu = jnp.sum(jnp.where(use, archive_fitness, 0.0)) / count
        sigma = jnp.sqrt(jnp.sum(jnp.where(use, (archive_fitness - mu) ** 2, 0.0)) / count) + 1e-6
        return jnp.where(use, (archive_fitness - mu) / sigma, 0.0), use

    def predict(self, state: PredictorState, encodings: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, std) float32 [P] of the surrogate's standardised predictions for ``encodings`` [P, n_choices]:
        over the ensemble, or the GP's posterior given the archive."""
        if self.surrogate == "gp":
            target, use = self._targets(state.fitness, state.told)
            mean, cov = gp.posterior(state.params, one_hot_choices(self.space, state.archive), target, use,
                                     one_hot_choices(self.space, encodings))
            return mean, jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0))
        x = self.features(encodings)
        out = jax.vmap(self._mlp, in_axes=(0, None))(state.params, x)  # [E, P]
        return out.mean(0), out.std(0)

    def init(self, key: jax.Array) -> PredictorState:
        c = self.capacity
        return PredictorState(
            archive=jnp.zeros((c, self.space.n_choices), jnp.int32),
            fitness=jnp.full(c, -jnp.inf, jnp.float32),
            told=jnp.zeros((), jnp.int32),
            params=(gp.init_params(self.space.n_choices) if self.surrogate == "gp"
                    else jax.vmap(self._init_mlp)(jax.random.split(key, self.ensemble))),
            spearman=jnp.full((), jnp.nan, jnp.float32),
            spearman_sum=jnp.zeros((), jnp.float32),
            spearman_count=jnp.zeros((), jnp.int32),
        )

    def ask(self, key: jax.Array, state: PredictorState) -> tuple[jax.Array, PredictorState]:
        """(int32 [P, n_choices]: uniform samples until ``initial`` are told, then the surrogate's top P; state)."""
        k_init, k_parent, k_mutate, k_random = jax.random.split(key, 4)
        n_random = round(self.candidates * self.random_fraction)
        n_mutants = self.candidates - n_random
        parents = state.archive[tournament(k_parent, state.fitness, n_mutants, self.tournament_size)]
        pool = jnp.concatenate([mutate_changed(self.space, k_mutate, parents),
                                self.space.sample(k_random, n_random)])
        mean, std = self.predict(state, pool)
        seen = jnp.any(jnp.all(pool[:, None, :] == state.archive[None, :, :], -1)
                       & (jnp.arange(self.capacity) < state.told)[None, :], -1)
        score = jnp.where(seen | ~self.space.first_occurrence(pool), -jnp.inf, mean + self.exploration * std)
        _, best = jax.lax.top_k(score, self.batch_size)
        warming_up = state.told < self.initial
        return jnp.where(warming_up, self.space.sample(k_init, self.batch_size), pool[best]), state

    def _train(self, params, archive: jax.Array, fitness: jax.Array, told: jax.Array):
        """The surrogate fitted to the archive's standardised fitness: the ensemble after ``train_steps`` Adam steps
        (warm-started), or the GP's hyper-parameters after ``gp_fit_steps`` steps on its marginal likelihood."""
        target, use = self._targets(fitness, told)
        if self.surrogate == "gp":
            return gp.fit(params, one_hot_choices(self.space, archive), target, use, self.gp_fit_steps, 0.1)
        count = jnp.maximum(jnp.sum(use), 1)
        x = self.features(archive)
        optimiser = optax.adam(self.learning_rate)

        def loss(p):
            error = jax.vmap(self._mlp, in_axes=(0, None))(p, x) - target  # [E, C]
            return jnp.sum(jnp.where(use, error**2, 0.0)) / count

        def step(carry, _):
            p, opt_state = carry
            grads = jax.grad(loss)(p)
            updates, opt_state = optimiser.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, length=self.train_steps)
        return params

    def tell(self, state: PredictorState, encodings: jax.Array, fitness: jax.Array) -> PredictorState:
        check_batch("PredictorGuided", encodings, fitness, self.space)
        encodings, fitness = jnp.asarray(encodings, jnp.int32), clean_fitness(fitness)
        trained = state.told >= self.initial
        rho = jnp.where(trained, spearman(self.predict(state, encodings)[0], fitness, jnp.isfinite(fitness)), jnp.nan)
        counted = trained & ~jnp.isnan(rho)
        slots = (state.told + jnp.arange(encodings.shape[0])) % self.capacity
        archive = state.archive.at[slots].set(encodings)
        archive_fitness = state.fitness.at[slots].set(fitness)
        told = state.told + encodings.shape[0]
        params = jax.lax.cond(
            told >= self.initial,
            lambda p: self._train(p, archive, archive_fitness, told),
            lambda p: p,
            state.params,
        )
        return PredictorState(
            archive=archive,
            fitness=archive_fitness,
            told=told,
            params=params,
            spearman=rho,
            spearman_sum=state.spearman_sum + jnp.where(counted, rho, 0.0),
            spearman_count=state.spearman_count + counted.astype(jnp.int32),
        )

    def metrics(self, state: PredictorState) -> dict[str, jax.Array]:
        """``spearman``: on the last told batch; ``spearman_mean``: over every batch since the surrogate was used."""
        mean = jnp.where(state.spearman_count > 0, state.spearman_sum / jnp.maximum(state.spearman_count, 1), jnp.nan)
        return {"spearman": state.spearman, "spearman_mean": mean}
