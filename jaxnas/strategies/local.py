"""Local search: hill climbing over one-choice neighbours with random restarts. Jittable.

A neighbour of the current architecture differs from it in one active choice (choices that change brings
into play, or values it makes disallowed, are repaired to the nearest allowed option, as `Space.neighbours`
does). Neighbours are tried in a random order, P per ask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces.core import Space
from jaxnas.strategies.base import check_batch, check_positive, clean_fitness, uniform

MODES = ("first", "best")
"""``"first"``: move as soon as a told batch improves on the current architecture; ``"best"``: scan every
neighbour, then move to the best one."""


@struct.dataclass
class LocalState:
    """Hill-climbing state.

    Attributes:
      current: int32 [n_choices] the architecture being improved.
      fitness: float32 scalar its fitness (-inf before the first tell).
      restart: bool scalar, whether the next ask starts afresh (at the start, and at a local optimum).
      order: int32 [K] neighbour edits in the order they are tried (valid ones first), K = n_choices * (M - 1).
      n_valid: int32 scalar, how many entries of ``order`` are real neighbours of ``current``.
      fresh: bool scalar, whether ``order`` must be redrawn for a new ``current`` at the next ask.
      position: int32 scalar, edits of ``order`` asked so far.
      scan_best, scan_fitness: int32 [n_choices], float32 scalar: the best neighbour seen in this scan.
      restarts: int32 scalar, restarts so far (a local optimum was reached).
    """

    current: jax.Array
    fitness: jax.Array
    restart: jax.Array
    order: jax.Array
    n_valid: jax.Array
    fresh: jax.Array
    position: jax.Array
    scan_best: jax.Array
    scan_fitness: jax.Array
    restarts: jax.Array


@dataclasses.dataclass(frozen=True)
class LocalSearch:
    """Hill climbing over one-choice neighbours (first or best improvement), with random restarts.

    Asks are P neighbours of the current architecture at a time, in a random order; slots left once every
    neighbour has been asked hold uniform samples (a told sample that beats the current one is moved to,
    like any neighbour). When no neighbour improves (a local optimum), the next ask is P uniform samples
    and the best of them becomes the new start.

    Args:
      space: the search space.
      batch_size: P, encodings per ask.
      mode: ``"first"`` or ``"best"`` improvement (see `MODES`).
    """

    space: Space
    batch_size: int = 1
    mode: str = "first"

    def __post_init__(self) -> None:
        check_positive("LocalSearch", batch_size=self.batch_size)
        if self.mode not in MODES:
            raise ValueError(f"LocalSearch: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def _width(self) -> int:
        return int(self.space.cardinalities.max()) - 1

    def init(self, key: jax.Array) -> LocalState:
        del key  # the first ask samples the start
        n, k = self.space.n_choices, self.space.n_choices * self._width
        return LocalState(
            current=jnp.zeros(n, jnp.int32),
            fitness=jnp.full((), -jnp.inf, jnp.float32),
            restart=jnp.ones((), bool),
            order=jnp.arange(k, dtype=jnp.int32),
            n_valid=jnp.zeros((), jnp.int32),
            fresh=jnp.ones((), bool),
            position=jnp.zeros((), jnp.int32),
            scan_best=jnp.zeros(n, jnp.int32),
            scan_fitness=jnp.full((), -jnp.inf, jnp.float32),
            restarts=jnp.zeros((), jnp.int32),
        )

    def _edits(self, current: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(int32 [K, n_choices] current with choice e // W set to its (e % W + 1)-th next option, bool [K] real).

        W = M - 1. Edit e is real when its choice is active and the step is below the choice's cardinality.
        """
        w = self._width
        edit = jnp.arange(self.space.n_choices * w)
        choice, step = edit // w, edit % w + 1
        cards = jnp.asarray(self.space.cardinalities)[choice]
        rows = jnp.tile(current, (edit.shape[0], 1))
        rows = rows.at[edit, choice].set((current[choice] + step) % cards)
        real = self.space.active_mask(current)[choice] & (step < cards)
        return rows, real

    def ask(self, key: jax.Array, state: LocalState) -> tuple[jax.Array, LocalState]:
        """(int32 [P, n_choices] the next untried neighbours, or uniform samples at a restart; new state)."""
        k_order, k_sample, k_repair = jax.random.split(key, 3)
        p = self.batch_size
        rows, real = self._edits(state.current)
        shuffled = jnp.argsort(jnp.where(real, uniform(k_order, real.shape), 2.0)).astype(jnp.int32)
        order = jnp.where(state.fresh, shuffled, state.order)
        n_valid = jnp.where(state.fresh, jnp.sum(real), state.n_valid).astype(jnp.int32)
        slot = state.position + jnp.arange(p)
        # A repair with no mutation (rate 0) makes an edited row valid and canonical.
        neighbours = self.space.mutate(k_repair, rows[order[jnp.minimum(slot, order.shape[0] - 1)]], 0.0)
        use = (slot < n_valid) & ~state.restart
        asked = jnp.where(use[:, None], neighbours, self.space.sample(k_sample, p))
        state = state.replace(order=order, n_valid=n_valid, fresh=jnp.zeros((), bool), position=state.position + p)
        return asked, state

    def tell(self, state: LocalState, encodings: jax.Array, fitness: jax.Array) -> LocalState:
        check_batch("LocalSearch", encodings, fitness, self.space)
        fitness = clean_fitness(fitness)
        top = jnp.argmax(fitness)
        scan_better = fitness[top] > state.scan_fitness
        scan_best = jnp.where(scan_better, encodings[top], state.scan_best)
        scan_fitness = jnp.where(scan_better, fitness[top], state.scan_fitness)
        done = state.position >= state.n_valid
        if self.mode == "first":
            move = fitness[top] > state.fitness
            target, target_fitness = encodings[top], fitness[top]
        else:
            move = done & (scan_fitness > state.fitness)
            target, target_fitness = scan_best, scan_fitness
        # A restart's best sample is the new start, however it scores.
        target = jnp.where(state.restart, encodings[top], target)
        target_fitness = jnp.where(state.restart, fitness[top], target_fitness)
        move = move | state.restart
        stuck = ~move & done
        new_scan = move | stuck
        current = jnp.where(move, target, state.current).astype(jnp.int32)
        return LocalState(
            current=current,
            fitness=jnp.where(move, target_fitness, state.fitness),
            restart=stuck,
            order=state.order,
            n_valid=state.n_valid,
            fresh=new_scan,
            position=jnp.where(new_scan, 0, state.position),
            scan_best=jnp.where(new_scan, current, scan_best),
            scan_fitness=jnp.where(new_scan, -jnp.inf, scan_fitness),
            restarts=state.restarts + stuck.astype(jnp.int32),
        )

    def metrics(self, state: LocalState) -> dict[str, jax.Array]:
        """``restarts``: local optima left so far; ``current_fitness``: the fitness being climbed from."""
        return {"restarts": state.restarts, "current_fitness": state.fitness}
