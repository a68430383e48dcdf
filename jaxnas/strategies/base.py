"""The strategy protocol (pure, jittable ask / tell over a pytree state) and the operators strategies are built from.

A strategy is an immutable object holding its hyper-parameters and the search space, with three pure
functions over a pytree state::

    state = strategy.init(key)
    encodings, state = strategy.ask(key, state)      # int32 [P, n_choices], P = strategy.batch_size
    state = strategy.tell(state, encodings, fitness)  # fitness float32 [P] (or [P, M] for NSGA-II), maximised

Failed or infeasible candidates are told NaN or -inf; every strategy treats both as the worst fitness.
The state is a `flax.struct` dataclass whose leaves are all arrays of shapes fixed at construction (archives
have a capacity), so ``jax.jit(strategy.ask)`` compiles once, ``jax.vmap`` runs many searches at once, and
Orbax can save it: a run resumed from saved leaves asks exactly what the uninterrupted run asks.
``strategy.metrics(state)`` gives scalar diagnostics (diversity, surrogate rank correlation ...) to log.

Wrappers (`jaxnas.strategies.wrappers`) take a strategy and return one, like optax transformations chain.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.core import Space

State = Any
"""A strategy state: a pytree (flax.struct dataclass) whose leaves are arrays."""


@runtime_checkable
class Strategy(Protocol):
    """What every strategy and wrapper provides; see the module docstring.

    Attributes:
      space: the search space the encodings belong to.
      batch_size: P, the number of encodings each `ask` returns (static).
    """

    space: Space
    batch_size: int

    def init(self, key: jax.Array) -> State:
        """The initial state."""
        ...

    def ask(self, key: jax.Array, state: State) -> tuple[jax.Array, State]:
        """(int32 [P, n_choices] valid canonical encodings to evaluate next, the new state)."""
        ...

    def tell(self, state: State, encodings: jax.Array, fitness: jax.Array) -> State:
        """The state after learning the fitness (float32 [P], maximised; NaN/-inf: failed) of ``encodings``."""
        ...

    def metrics(self, state: State) -> dict[str, jax.Array]:
        """Scalar diagnostics of ``state`` by name (empty if the strategy has none)."""
        ...


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 ``shape`` i.i.d. uniform in [0, 1), drawn flat and reshaped.

    XLA:CPU compiles multi-dimensional threefry draws (and ``jax.random.randint``) several times slower than
    one flat draw; strategies draw all their randomness through here to keep compiles short.
    """
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def randint(key: jax.Array, shape: tuple[int, ...], high: int) -> jax.Array:
    """int32 ``shape`` i.i.d. uniform in [0, high), through `uniform`."""
    return jnp.minimum(jnp.floor(uniform(key, shape) * high), high - 1).astype(jnp.int32)


def clean_fitness(fitness: jax.Array) -> jax.Array:
    """float32 [...]: ``fitness`` with NaN (a failed evaluation) turned into -inf, the worst value."""
    fitness = jnp.asarray(fitness, jnp.float32)
    return jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)


def check_batch(name: str, encodings: jax.Array, fitness: jax.Array, space: Space, n_objectives: int = 0) -> None:
    """Raise ValueError if told shapes do not match: encodings [P, n_choices], fitness [P] (or [P, M]).

    Runs on static shapes, so it costs nothing under jit.
    """
    enc_shape, fit_shape = jnp.shape(encodings), jnp.shape(fitness)
    if len(enc_shape) != 2 or enc_shape[1] != space.n_choices:
        raise ValueError(
            f"{name}.tell: encodings must have shape [P, {space.n_choices}] (one row per candidate of space "
            f"{space.name!r}), got {enc_shape}"
        )
    expected = (enc_shape[0],) if n_objectives == 0 else (enc_shape[0], n_objectives)
    if fit_shape != expected:
        what = "one value per candidate" if n_objectives == 0 else f"{n_objectives} objectives per candidate"
        raise ValueError(f"{name}.tell: fitness must have shape {list(expected)} ({what}), got {list(fit_shape)}")


def check_positive(name: str, **values: int) -> None:
    """Raise ValueError naming the first hyper-parameter of ``values`` that is not a positive int."""
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")


def rates_array(space: Space, mutation_rates: float | tuple[float, ...] | None) -> jax.Array | None:
    """float32 [n_choices] per-choice mutation rates from one rate or one per choice (None stays None)."""
    if mutation_rates is None:
        return None
    return jnp.broadcast_to(jnp.asarray(mutation_rates, jnp.float32), (space.n_choices,))


def check_rates(name: str, strategy) -> None:
    """Validate ``strategy.mutation_rates`` and store a sequence as a tuple (strategies stay hashable)."""
    rates = strategy.mutation_rates
    if rates is None:
        return
    values = np.atleast_1d(np.asarray(rates, np.float64))
    n = strategy.space.n_choices
    if values.ndim != 1 or len(values) not in (1, n) or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(
            f"{name}: mutation_rates must be None (the space's declared rates), one rate in [0, 1] or {n} rates "
            f"in [0, 1] (one per choice: {', '.join(strategy.space.names)}), got {rates!r}"
        )
    if np.ndim(rates):
        object.__setattr__(strategy, "mutation_rates", tuple(float(v) for v in values))


def _shift_one(space: Space, key: jax.Array, parents: jax.Array) -> jax.Array:
    """int32 [P, n_choices]: each parent with one active choice, drawn uniformly, set to another option in range.

    Not repaired: rules of later choices may now be broken (callers repair with ``space.mutate(k, x, 0.0)``).
    """
    u = uniform(key, (2, *parents.shape))
    scores = jnp.where(space.active_mask(parents), u[0], -1.0)
    chosen = jnp.arange(space.n_choices) == jnp.argmax(scores, -1)[:, None]
    cards = jnp.asarray(space.cardinalities)
    step = 1 + jnp.floor(u[1] * (cards - 1)).astype(jnp.int32)  # uniform in 1 .. cards - 1
    return jnp.where(chosen & (cards > 1), (parents + step) % cards, parents)


def mutate_changed(space: Space, key: jax.Array, parents: jax.Array, rates: jax.Array | None = None) -> jax.Array:
    """int32 [P, n_choices]: a mutant of each parent int32 [P, n_choices] that (almost always) differs from it.

    Each active choice is redrawn with its rate (``rates`` float [n_choices]; None: the space's declared
    rates); a row that came out unchanged (likely at low rates) instead has one active choice, drawn
    uniformly, set to another of its options - as in regularized evolution, where every child differs from
    its parent. Rules that change breaks are repaired to the nearest allowed option, which in a space with
    ``valid_if`` rules can, rarely, lead back to the parent.
    """
    k_rate, k_shift, k_repair = jax.random.split(key, 3)
    children = space.mutate(k_rate, parents, rates)
    unchanged = jnp.all(children == parents, -1, keepdims=True)
    # A mutation at rate 0 only repairs; valid canonical rows pass through it unchanged.
    return space.mutate(k_repair, jnp.where(unchanged, _shift_one(space, k_shift, parents), children), 0.0)


def mutate_one(space: Space, key: jax.Array, parents: jax.Array) -> jax.Array:
    """int32 [P, n_choices]: each parent with exactly one active choice, drawn uniformly, set to another option.

    The mutation of regularized evolution as published (Real et al. 2019 on NAS-Bench spaces); later
    choices that change affects are repaired as in `mutate_changed`.
    """
    k_shift, k_repair = jax.random.split(key)
    return space.mutate(k_repair, _shift_one(space, k_shift, parents), 0.0)


def tournament(key: jax.Array, fitness: jax.Array, n: int, size: int) -> jax.Array:
    """int32 [n]: winners of ``n`` tournaments, each the fittest of ``size`` members drawn with replacement.

    ``fitness`` float32 [N] (-inf for empty or failed members); ties go to the first drawn.
    """
    entrants = randint(key, (n, size), fitness.shape[0])
    return entrants[jnp.arange(n), jnp.argmax(fitness[entrants], -1)].astype(jnp.int32)


def one_hot_choices(space: Space, encodings: jax.Array) -> jax.Array:
    """float32 [..., n_choices, M]: each choice's option as a one-hot vector of width M (the most options of any
    choice), all zero where the choice is inactive; the features of the surrogate strategies."""
    width = int(space.cardinalities.max())
    return jax.nn.one_hot(encodings, width) * space.active_mask(encodings)[..., None]


def spearman(x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """float32 scalar: Spearman rank correlation of x, y float [n] over rows where ``mask`` (bool [n]) holds.

    Ties get their average rank (as ``scipy.stats.spearmanr``); NaN when fewer than two rows are
    selected or either side is constant. O(n^2), meant for a batch of told candidates.
    """
    n = x.shape[0]
    mask = jnp.ones(n, bool) if mask is None else mask

    def ranks(v):
        below = jnp.sum(mask[None, :] & (v[None, :] < v[:, None]), -1)
        equal = jnp.sum(mask[None, :] & (v[None, :] == v[:, None]), -1)
        return below + (equal + 1) / 2.0

    rx, ry = ranks(x), ranks(y)
    count = jnp.sum(mask)
    mx = jnp.sum(jnp.where(mask, rx, 0.0)) / count
    my = jnp.sum(jnp.where(mask, ry, 0.0)) / count
    dx, dy = jnp.where(mask, rx - mx, 0.0), jnp.where(mask, ry - my, 0.0)
    return (jnp.sum(dx * dy) / jnp.sqrt(jnp.sum(dx * dx) * jnp.sum(dy * dy))).astype(jnp.float32)


def option_entropy(space: Space, pop: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """float32 scalar: population diversity, the mean over choices of the Shannon entropy (nats) of options.

    For each choice, p_o is the fraction of members (rows of ``pop`` int32 [N, n_choices] where ``mask``
    bool [N] holds) holding option o, and H = -sum_o p_o ln p_o; the result is the mean H over all choices.
    0 for a population of clones; ln(k) per choice when its k options are equally common.
    """
    n, width = pop.shape[0], int(space.cardinalities.max())
    mask = jnp.ones(n, bool) if mask is None else mask
    counts = jnp.sum((pop[:, :, None] == jnp.arange(width)) & mask[:, None, None], 0)  # [n_choices, M]
    p = counts / jnp.maximum(jnp.sum(mask), 1)
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)).astype(jnp.float32)
