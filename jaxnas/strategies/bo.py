"""Bayesian optimisation: a Gaussian process over the told candidates picks, among many proposals, what to ask.

The surrogate is `jaxnas.strategies.gp`: an exponentiated-Hamming (ARD) kernel on one-hot choices (an inactive
choice is all zero, half a mismatch away from any option), its length scales, signal and noise variances fitted at
every tell by Adam steps on the marginal likelihood (warm-started from the previous fit). The targets are the
told fitness turned into normal scores by rank, y = Phi^-1((rank - 1/2) / n): the GP then models the order of
the candidates, unmoved by outliers such as the collapsed networks of a NAS table or by a monotone rescaling
of the fitness. A failed candidate (told NaN or -inf) is kept in the fit with the worst rank, so the search learns to
avoid its neighbourhood (until the archive is full: then failures are the first dropped).

Each ask scores a pool of proposals - mutants of the best told candidates and uniform samples, without
candidates told before or repeated - by the acquisition, and asks the best P:

- ``"ei"`` (default): expected improvement over the best target, for a batch by the Kriging believer: after each
  pick, the GP is conditioned on the pick's fantasised observation equal to its posterior mean (the mean is
  unchanged, the variance shrinks around the pick, the incumbent rises to the fantasy if it is higher), and the
  next pick maximises the updated EI.
- ``"thompson"``: one joint draw of f over the pool per asked slot; slot p asks the argmax of draw p among the
  candidates not yet picked.

Until ``initial`` candidates are told, asks are uniform samples. At every tell, before refitting, the GP's mean
for the told candidates is compared with their real fitness: the Spearman rank correlation is kept in the state
(``spearman``, and its running mean) as for `jaxnas.strategies.predictor`. Jittable; the state has fixed shapes:
an archive of capacity C keeps the best C told candidates (a failed one ranks below every success).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
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
)

ACQUISITIONS = ("ei", "thompson")
"""``"ei"``: expected improvement, batches by the Kriging believer; ``"thompson"``: one posterior draw per slot."""


@struct.dataclass
class BOState:
    """Archive, GP hyper-parameters and the surrogate's measured quality.

    Attributes:
      archive: int32 [C, n_choices] the best C told candidates, fittest first (rows from ``told`` on are empty).
      fitness: float32 [C] their fitness, descending (-inf: empty or failed).
      told: int32 scalar, candidates told so far.
      gp: `gp.GPParams`, the hyper-parameters of the last fit.
      spearman: float32 scalar, rank correlation of the GP's mean and the real fitness on the last told batch
        (NaN until the GP has been fitted).
      spearman_sum, spearman_count: float32 / int32 scalars, for the running mean over batches.
    """

    archive: jax.Array
    fitness: jax.Array
    told: jax.Array
    gp: gp.GPParams
    spearman: jax.Array
    spearman_sum: jax.Array
    spearman_count: jax.Array


def normal_scores(fitness: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [C]: Phi^-1((rank - 1/2) / n) of ``fitness`` float [C] among the n rows where ``mask`` holds (0
    elsewhere); ties share their average rank, -inf ranks below every finite value."""
    below = jnp.sum(mask[None, :] & (fitness[None, :] < fitness[:, None]), -1)
    equal = jnp.sum(mask[None, :] & (fitness[None, :] == fitness[:, None]), -1)
    n = jnp.maximum(jnp.sum(mask), 1)
    scores = jax.scipy.special.ndtri((below + 0.5 * equal) / n)  # average rank - 1/2 = below + equal / 2
    return jnp.where(mask, scores, 0.0).astype(jnp.float32)


def _rank_key(fitness: jax.Array, filled: jax.Array) -> jax.Array:
    """float32 [C]: ``fitness`` with failed rows (-inf) just below every finite value and empty rows below those."""
    failed = -jnp.finfo(jnp.float32).max
    return jnp.where(filled, jnp.where(jnp.isfinite(fitness), fitness, failed), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class BayesianOptimization:
    """GP-based Bayesian optimisation over a pool of proposals; see the module docstring.

    Args:
      space: the search space.
      batch_size: P, encodings per ask.
      initial: candidates sampled uniformly before the GP is used (at least 2).
      candidates: proposals scored per ask (at least P).
      random_fraction: share of the proposals that are uniform samples rather than mutants, in [0, 1].
      parents: how many of the best told candidates are mutated (in turn) into proposals.
      acquisition: ``"ei"`` or ``"thompson"`` (`ACQUISITIONS`).
      fit_steps: Adam steps on the marginal likelihood per tell.
      learning_rate: Adam's step size on the log hyper-parameters, in (0, 1].
      capacity: C, archive rows (static shape); every fit solves a [C, C] system, so it costs O(C^3).
    """

    space: Space
    batch_size: int = 5
    initial: int = 10
    candidates: int = 512
    random_fraction: float = 0.25
    parents: int = 10
    acquisition: Literal["ei", "thompson"] = "ei"
    fit_steps: int = 10
    learning_rate: float = 0.1
    capacity: int = 256

    def __post_init__(self) -> None:
        name = "BayesianOptimization"
        check_positive(name, batch_size=self.batch_size, candidates=self.candidates, parents=self.parents,
                       fit_steps=self.fit_steps, capacity=self.capacity)
        if not isinstance(self.initial, int) or self.initial < 2:
            raise ValueError(f"{name}: initial must be an integer >= 2 (a GP needs data to fit), got {self.initial!r}")
        if self.candidates < self.batch_size:
            raise ValueError(f"{name}: candidates ({self.candidates}) must be at least batch_size ({self.batch_size}):"
                             " the acquisition picks the asked ones among them")
        if self.capacity < max(self.initial, self.batch_size):
            raise ValueError(f"{name}: capacity ({self.capacity}) must be at least initial ({self.initial}) and "
                             f"batch_size ({self.batch_size}): the archive holds what the GP is fitted on")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ValueError(f"{name}: random_fraction must lie in [0, 1], got {self.random_fraction!r}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"{name}: learning_rate must lie in (0, 1] (Adam on log hyper-parameters), "
                             f"got {self.learning_rate!r}")
        if self.acquisition not in ACQUISITIONS:
            raise ValueError(f"{name}: acquisition must be one of {', '.join(ACQUISITIONS)}, got {self.acquisition!r}")

    def _data(self, state: BOState) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(features [C, n_choices, M], targets float32 [C], mask bool [C]) of the archive's told rows."""
        filled = jnp.arange(self.capacity) < state.told
        return one_hot_choices(self.space, state.archive), normal_scores(state.fitness, filled), filled

    def predict(self, state: BOState, encodings: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, std) float32 [P]: the GP posterior of the normal-score fitness at ``encodings`` [P, n_choices]."""
        mean, cov = gp.posterior(state.gp, *self._data(state), one_hot_choices(self.space, encodings))
        return mean, jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0))

    def init(self, key: jax.Array) -> BOState:
        del key  # the first asks are uniform samples
        c = self.capacity
        return BOState(
            archive=jnp.zeros((c, self.space.n_choices), jnp.int32),
            fitness=jnp.full(c, -jnp.inf, jnp.float32),
            told=jnp.zeros((), jnp.int32),
            gp=gp.init_params(self.space.n_choices),
            spearman=jnp.full((), jnp.nan, jnp.float32),
            spearman_sum=jnp.zeros((), jnp.float32),
            spearman_count=jnp.zeros((), jnp.int32),
        )

    def _pool(self, key: jax.Array, state: BOState) -> tuple[jax.Array, jax.Array]:
        """(int32 [N, n_choices] proposals, bool [N] those that may be asked: new and first of their kind)."""
        k_mutate, k_random = jax.random.split(key)
        n_random = round(self.candidates * self.random_fraction)
        n_mutants = self.candidates - n_random
        filled = jnp.arange(self.capacity) < state.told
        parents = min(self.parents, self.capacity)
        best = jnp.where(filled[:parents], jnp.arange(parents), 0)  # the archive is sorted; few told: the best more
        pool = jnp.concatenate([
            mutate_changed(self.space, k_mutate, state.archive[best[jnp.arange(n_mutants) % parents]]),
            self.space.sample(k_random, n_random),
        ])
        seen = jnp.any(jnp.all(pool[:, None, :] == state.archive[None, :, :], -1) & filled[None, :], -1)
        return pool, ~seen & self.space.first_occurrence(pool)

    def _pick_ei(self, mean: jax.Array, cov: jax.Array, allowed: jax.Array, best: jax.Array,
                 noise: jax.Array) -> jax.Array:
        """int32 [P]: pool rows by expected improvement, one after the other with Kriging-believer updates."""

        def pick(p, carry):
            cov, allowed, best, picked = carry
            std = jnp.sqrt(jnp.maximum(jnp.diag(cov), 1e-10))
            score = jnp.where(allowed, gp.log_expected_improvement(mean, std, best), -jnp.inf)
            j = jnp.argmax(score)
            cov = cov - jnp.outer(cov[:, j], cov[j, :]) / (cov[j, j] + noise)
            return cov, allowed.at[j].set(False), jnp.maximum(best, mean[j]), picked.at[p].set(j)

        picked = jnp.zeros(self.batch_size, jnp.int32)
        return jax.lax.fori_loop(0, self.batch_size, pick, (cov, allowed, best, picked))[3]

    def _pick_thompson(self, key: jax.Array, mean: jax.Array, cov: jax.Array, allowed: jax.Array) -> jax.Array:
        """int32 [P]: pool rows, slot p the argmax of the p-th joint posterior draw among rows not yet picked."""
        n = mean.shape[0]
        jitter = 1e-4 * jnp.maximum(jnp.mean(jnp.diag(cov)), 1e-6)
        chol = jnp.linalg.cholesky(cov + jitter * jnp.eye(n))
        z = jax.random.normal(key, (n * self.batch_size,)).reshape(n, self.batch_size)
        draws = (mean[:, None] + chol @ z).T  # [P, N]
        draws = jnp.where(jnp.isnan(draws), -jnp.inf, draws)

        def pick(p, carry):
            allowed, picked = carry
            j = jnp.argmax(jnp.where(allowed, draws[p], -jnp.inf))
            return allowed.at[j].set(False), picked.at[p].set(j)

        return jax.lax.fori_loop(0, self.batch_size, pick, (allowed, jnp.zeros(self.batch_size, jnp.int32)))[1]

    def ask(self, key: jax.Array, state: BOState) -> tuple[jax.Array, BOState]:
        """(int32 [P, n_choices]: uniform samples until ``initial`` are told, then the acquisition's best P; state)."""
        k_init, k_pool, k_draw = jax.random.split(key, 3)
        pool, allowed = self._pool(k_pool, state)
        x, y, mask = self._data(state)
        mean, cov = gp.posterior(state.gp, x, y, mask, one_hot_choices(self.space, pool))
        if self.acquisition == "ei":
            best = jnp.max(jnp.where(mask, y, -jnp.inf))
            picked = self._pick_ei(mean, cov, allowed, best, jnp.exp(state.gp.log_noise))
        else:
            picked = self._pick_thompson(k_draw, mean, cov, allowed)
        warming_up = state.told < self.initial
        return jnp.where(warming_up, self.space.sample(k_init, self.batch_size), pool[picked]), state

    def tell(self, state: BOState, encodings: jax.Array, fitness: jax.Array) -> BOState:
        check_batch("BayesianOptimization", encodings, fitness, self.space)
        p = encodings.shape[0]
        if p > self.capacity:
            raise ValueError(f"BayesianOptimization.tell: {p} candidates exceed the archive's capacity "
                             f"{self.capacity}; raise capacity")
        encodings, fitness = jnp.asarray(encodings, jnp.int32), clean_fitness(fitness)
        fitted = state.told >= self.initial
        rho = jnp.where(fitted, spearman(self.predict(state, encodings)[0], fitness, jnp.isfinite(fitness)), jnp.nan)
        counted = fitted & ~jnp.isnan(rho)
        # The best C of the archive and the batch, in order of fitness (failed below successes, empty rows last):
        # rows [0, min(told, C)) are filled.
        rows = jnp.concatenate([state.archive, encodings])
        values = jnp.concatenate([state.fitness, fitness])
        filled = jnp.concatenate([jnp.arange(self.capacity) < state.told, jnp.ones(p, bool)])
        _, kept = jax.lax.top_k(_rank_key(values, filled), self.capacity)
        archive, archive_fitness = rows[kept], values[kept]
        told = state.told + p
        filled = jnp.arange(self.capacity) < told
        x = one_hot_choices(self.space, archive)
        y = normal_scores(archive_fitness, filled)
        params = jax.lax.cond(
            told >= self.initial,
            lambda q: gp.fit(q, x, y, filled, self.fit_steps, self.learning_rate),
            lambda q: q,
            state.gp,
        )
        return BOState(
            archive=archive,
            fitness=archive_fitness,
            told=told,
            gp=params,
            spearman=rho,
            spearman_sum=state.spearman_sum + jnp.where(counted, rho, 0.0),
            spearman_count=state.spearman_count + counted.astype(jnp.int32),
        )

    def metrics(self, state: BOState) -> dict[str, jax.Array]:
        """``spearman``: on the last told batch; ``spearman_mean``: over every batch since the GP was fitted;
        ``noise_share``: the fitted noise variance / (signal + noise) (near 1: the GP explains little)."""
        mean = jnp.where(state.spearman_count > 0, state.spearman_sum / jnp.maximum(state.spearman_count, 1), jnp.nan)
        signal, noise = jnp.exp(state.gp.log_signal), jnp.exp(state.gp.log_noise)
        return {"spearman": state.spearman, "spearman_mean": mean, "noise_share": noise / (signal + noise)}
