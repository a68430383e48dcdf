"""The masked backend: a population as one compiled program, vmapped over candidates of any supernet family.

- `evaluate_shared`: shared weights, vmapped over encodings (one supernet scores a whole population);
- `evaluate_population`: vmapped over (params, encodings) (P trained candidates);
- `predict`: logits of one chosen candidate (then `classification_report`);
- `train_population`: P independent candidates, each with its own params and optimiser state, trained by
  `jax.vmap` of one train step inside a jitted `lax.scan` over an epoch; per-candidate early stopping and
  NaN / inf isolation. Warm start from a supernet: ``params_P = tile_population(supernet params, P)``.

Every candidate computes at the supernet's largest sizes with masks: the form for GPU / TPU and for populations
sharded over devices (`jaxnas.population.sharding`). On CPU the sized backend (`jaxnas.population.sized`,
`sized_train`) computes the same numbers at each candidate's own sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxnas.data import epoch_indices
from jaxnas.distributed import to_host
from jaxnas.population.common import (
    Apply,
    PopulationResult,
    all_finite,
    batched,
    check_population,
    check_training,
    guard,
    per_example,
    run_epochs,
    shifted,
    step_keys,
)


def evaluate_shared(
    apply: Apply, params, encs: jax.Array, x: jax.Array, y: jax.Array, batch_size: int = 256
) -> dict[str, jax.Array]:
    """Loss and accuracy of every encoding in ``encs`` [P, n_choices] int32 with one shared ``params``.

    x [N, ...] inputs, y [N] int32 labels; N need not divide ``batch_size`` (the last batch is padded and the
    padding ignored). Returns ``{"loss": [P] mean cross-entropy, "accuracy": [P] in [0, 1]}``. One compile
    serves every population of the same shape. Sequences (language models: x [N, T] tokens, y [N, T] next
    tokens, logits [B, T, vocab]) score every position: the loss is the mean token NLL (its exp the perplexity),
    the accuracy the share of positions whose argmax is the next token.
    """
    return _evaluate(apply, params, encs, x, y, batch_size, shared=True)


def evaluate_population(
    apply: Apply, params_P, encs: jax.Array, x: jax.Array, y: jax.Array, batch_size: int = 256
) -> dict[str, jax.Array]:
    """Like `evaluate_shared`, but candidate p uses its own parameters: leaves of ``params_P`` are [P, ...]."""
    return _evaluate(apply, params_P, encs, x, y, batch_size, shared=False)


def predict(apply: Apply, params, enc: jax.Array, x: jax.Array, batch_size: int = 256) -> jax.Array:
    """logits [N, classes] of one candidate ``enc`` [n_choices] int32 (e.g. for `classification_report`)."""
    xb, _ = batched(jnp.asarray(x), batch_size)
    logits = _predict_batches(apply, params, jnp.asarray(enc, jnp.int32), xb)
    return logits.reshape(-1, logits.shape[-1])[: x.shape[0]]


@functools.partial(jax.jit, static_argnames="apply")
def _predict_batches(apply, params, enc, xb):
    return jax.lax.map(lambda x: apply(params, enc, x, train=False, key=None), xb)


def _evaluate(apply, params, encs, x, y, batch_size, shared):
    check_population(encs, None if shared else params)
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels; they must match")
    xb, weight = batched(x, batch_size)
    yb, _ = batched(y, batch_size)
    loss_sum, correct = _evaluate_sums(apply, params, jnp.asarray(encs, jnp.int32), xb, yb, weight, shared)
    n = x.shape[0]
    return {"loss": loss_sum / n, "accuracy": correct / n}


@functools.partial(jax.jit, static_argnames=("apply", "shared"))
def _evaluate_sums(apply, params, encs, xb, yb, weight, shared):
    """Summed loss [P] and correct predictions [P] over all batches (padding weighted out)."""

    def one(p, enc, x, y, w):
        logits = apply(p, enc, x, train=False, key=None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, -1) == y
        if loss.ndim > 1:  # sequences: y [B, T]; an example's loss / accuracy is its mean over positions
            loss, correct = per_example(loss), per_example(correct)
        return jnp.sum(loss * w), jnp.sum(correct * w)

    def batch(totals, data):
        x, y, w = data
        loss, correct = jax.vmap(one, in_axes=(None if shared else 0, 0, None, None, None))(params, encs, x, y, w)
        return (totals[0] + loss, totals[1] + correct), None

    zeros = jnp.zeros(encs.shape[0], jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(batch, (zeros, zeros), (xb, yb, weight))
    return loss_sum, correct


class PopulationState(NamedTuple):
    """What one training epoch carries: params_P, optimiser state (leaves [P, ...]), keys [P], failed bool [P]."""

    params: object
    opt_state: object
    keys: jax.Array
    failed: jax.Array


def train_population(
    apply: Apply,
    params_P,
    encs: jax.Array,
    optimizer: optax.GradientTransformation,
    train_x: jax.Array,
    train_y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    patience: int | None = None,
    keys: jax.Array | None = None,
    opt_state=None,
    eval_batch_size: int = 256,
    shift: int = 0,
    monitor: str = "accuracy",
) -> PopulationResult:
    """Train P independent candidates at once: `jax.vmap` of one train step inside a jitted `lax.scan` epoch.

    Args:
      apply: the family's pure apply (static: hashable).
      params_P: leaves [P, ...]; `init_population` for scratch, `tile_population` to warm-start from a supernet.
      encs: [P, n_choices] int32, candidate p's architecture.
      optimizer: any optax transformation; each candidate gets its own state. Reuse one object across calls
        to reuse the compiled epoch (it is a static argument of jit).
      train_x, train_y: [N, ...] inputs and [N] int32 labels (sequences: [N, T] tokens and [N, T] next tokens,
        the loss a mean over every position), kept on device; every epoch walks the batches
        of ``epoch_indices(N, batch_size, seed, epoch)`` (shared by all candidates, remainder dropped).
      val_x, val_y: validation split, scored after every epoch (early stopping, ``history``).
      patience: stop (freeze) a candidate after this many epochs without a better validation score (see
        ``monitor``); None: never stop early.
      keys: [P] dropout keys (default ``candidate_keys(key(seed), P)``), so a candidate trained alone with its
        key matches its run inside a population.
      opt_state: optimiser states [P, ...] to resume from, or to give candidates their own hyper-parameters
        (``optax.inject_hyperparams``); default ``vmap(optimizer.init)(params_P)``.
      shift: data augmentation for images [N, H, W, C]: every training example is translated by a random
        offset of up to ``shift`` pixels in each direction (zero fill), drawn from the candidate's own key;
        0 (default) trains on the images as they are.
      monitor: the validation score of early stopping and ``history``: ``"accuracy"`` (default), or ``"loss"``
        (its negation is maximised: what a language model's perplexity follows, where token accuracy does not).

    A candidate whose loss, gradients or updated weights are not finite is marked failed and frozen at its
    last finite weights; stopped and failed candidates keep being carried (masked by ``jnp.where``), so the
    others' numbers are the same as in a run without them. The loop ends early once no candidate trains.
    """
    if monitor not in ("accuracy", "loss"):
        raise ValueError(f"monitor must be 'accuracy' or 'loss', got {monitor!r}")
    encs = jnp.asarray(encs, jnp.int32)
    train_x, train_y, keys = check_training(encs, params_P, train_x, train_y, epochs, patience, shift, keys, seed)
    population = encs.shape[0]
    if opt_state is None:
        opt_state = jax.vmap(optimizer.init)(params_P)
    failed = np.zeros(population, bool)
    sharding = getattr(encs, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        # A sharded population: the state starts sharded as every epoch leaves it, so one compile serves all.
        opt_state, failed = jax.device_put((opt_state, failed), sharding)
    state = PopulationState(params_P, opt_state, keys, jnp.asarray(failed))

    def run_epoch(epoch, running):
        nonlocal state
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        state, losses = _train_epoch(apply, optimizer, state, jnp.asarray(running), encs, train_x, train_y, index, shift)
        scores = evaluate_population(apply, state.params, encs, val_x, val_y, eval_batch_size)
        score = to_host(scores["accuracy"]) if monitor == "accuracy" else -to_host(scores["loss"])
        return score, to_host(losses).mean(0), to_host(state.failed)

    outcome = run_epochs(population, epochs, patience, run_epoch)
    return PopulationResult(params=state.params, opt_state=state.opt_state, **outcome)


@functools.partial(jax.jit, static_argnames=("apply", "optimizer", "shift"))
def _train_epoch(apply, optimizer, state: PopulationState, running, encs, x, y, index, shift=0):
    """One epoch over the batches ``index`` [n_batches, B]; returns (state, per-step loss [n_batches, P])."""

    def loss_fn(params, enc, xb, yb, key):
        logits = apply(params, enc, xb, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(params, opt_state, key, failed, running, enc, xb, yb):
        key, dropout_key, shift_key = step_keys(key, shift)
        if shift:
            xb = shifted(shift_key, xb, shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, enc, xb, yb, dropout_key)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        take, failed = guard(jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params), running, failed)

        def keep(new, old):
            return jnp.where(take, new, old)

        return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), key, failed, loss

    def batch(state, rows):
        xb, yb = x[rows], y[rows]
        out = jax.vmap(step, in_axes=(0, 0, 0, 0, 0, 0, None, None))(*state, running, encs, xb, yb)
        return PopulationState(*out[:4]), out[4]

    return jax.lax.scan(batch, state, index)

