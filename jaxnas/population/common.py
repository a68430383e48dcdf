"""What both population backends share: the population conventions, the per-candidate bookkeeping of training
(early stopping, failures), its argument checks, and the pieces of one train step (key splits, translations, the
NaN / inf guard), so a candidate draws the same randomness and fails the same way whichever backend trains it.

Conventions: a family's pure ``apply(params, enc, x, *, train, key) -> logits [B, classes]`` (`Apply`; hashable, a
static argument of `jax.jit`); encodings ``[P, n_choices] int32``; "params_P" is a pytree whose every leaf has a
leading population axis ``[P, ...]``. Language models (the lm space) fit the same conventions with x [B, T] token
ids, labels [B, T] (the next tokens) and logits [B, T, vocab]: a training loss is the mean over every position.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.status import Status

Apply = Callable[..., jax.Array]
"""``apply(params, enc [n_choices] int32, x [B, ...], *, train: bool, key) -> logits [B, classes]``."""

STATUS_OK, STATUS_EARLY_STOPPED, STATUS_FAILED = Status.OK, Status.EARLY_STOPPED, Status.FAILED


def batched(a: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """a [N, ...] -> ([n_batches, batch_size, ...] zero-padded, weight [n_batches, batch_size] 1 real / 0 pad)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = a.shape[0]
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    padded = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    weight = (jnp.arange(n_batches * batch_size) < n).astype(jnp.float32)
    return padded.reshape(n_batches, batch_size, *a.shape[1:]), weight.reshape(n_batches, batch_size)


def classification_report(outputs: jax.Array, labels: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Per-class and macro precision / recall / F1 and the confusion matrix of one candidate.

    Args:
      outputs: logits [N, classes] float, or predicted classes [N] int.
      labels: [N] int32 true classes.
    Returns ``precision``, ``recall``, ``f1`` [classes]; ``macro_precision``, ``macro_recall``, ``macro_f1``
    scalars (unweighted means over classes); ``confusion`` [classes, classes] int32, rows = true class,
    columns = predicted class. A ratio with a zero denominator (class never predicted / absent) is 0.
    Pure jnp, so it vmaps over a leading candidate axis.
    """
    outputs = jnp.asarray(outputs)
    preds = jnp.argmax(outputs, -1) if outputs.ndim == 2 else outputs.astype(jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    if preds.shape != labels.shape:
        raise ValueError(f"got {preds.shape[0]} predictions for {labels.shape[0]} labels; pass one per example")
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
    guess = jax.nn.one_hot(preds, num_classes, dtype=jnp.int32)
    confusion = truth.T @ guess
    hits = jnp.diagonal(confusion).astype(jnp.float32)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = jnp.where(predicted > 0, hits / jnp.maximum(predicted, 1), 0.0)
    recall = jnp.where(actual > 0, hits / jnp.maximum(actual, 1), 0.0)
    both = precision + recall
    f1 = jnp.where(both > 0, 2 * precision * recall / jnp.where(both > 0, both, 1.0), 0.0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_precision": precision.mean(),
        "macro_recall": recall.mean(),
        "macro_f1": f1.mean(),
        "confusion": confusion,
    }


def init_population(init_fn: Callable[[jax.Array], object], key: jax.Array, population: int):
    """params_P: ``population`` independent initialisations, leaves [P, ...] (candidate p uses fold_in(key, p))."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    return _vmapped_init(init_fn)(candidate_keys(key, population))


@functools.lru_cache(maxsize=32)
def _vmapped_init(init_fn):
    """One jitted vmapped init per init function (bound methods of equal supernets share it)."""
    return jax.jit(jax.vmap(init_fn))


def candidate_keys(key: jax.Array, population: int) -> jax.Array:
    """[P] keys, candidate p's = fold_in(key, p): a prefix of a larger population gets the same keys."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(population))


def tile_population(params, population: int):
    """params_P with ``population`` copies of ``params`` (warm start of every candidate from supernet weights)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (population, *jnp.shape(a))), params)


@dataclasses.dataclass(frozen=True)
class PopulationResult:
    """Outcome of `train_population` for P candidates over the E epochs that ran.

    Attributes:
      params: params_P after training; early-stopped candidates hold their weights from their stop epoch,
        failed ones their last finite weights.
      opt_state: the optimiser states, leaves [P, ...] (pass back to resume).
      status: [P] str, ``"ok"`` / ``"early_stopped"`` / ``"failed"`` (loss, gradients or update not finite).
      best_epoch: [P] int, epoch (0-based) of the best monitored validation score, -1 if it failed in its first
        epoch.
      best_accuracy: [P] float, that score.
      history: [E, P] float, the monitored validation score after each epoch: accuracy, or the negated mean
        loss with ``monitor="loss"`` (higher is better either way).
      train_loss: [E, P] float, mean training loss over each epoch's steps (non-finite once a candidate failed).
    """

    params: object
    opt_state: object
    status: np.ndarray
    best_epoch: np.ndarray
    best_accuracy: np.ndarray
    history: np.ndarray
    train_loss: np.ndarray


def run_epochs(population: int, epochs: int, patience: int | None, run_epoch) -> dict[str, np.ndarray]:
    """The per-candidate bookkeeping of a population's training: early stopping with ``patience``, failures.

    ``run_epoch(epoch, running [P] bool) -> (validation score [P], mean training loss [P], failed [P] bool)``
    trains the candidates still running for one epoch; the score is what early stopping maximises. Returns `PopulationResult`'s ``status``, ``best_epoch``,
    ``best_accuracy``, ``history`` and ``train_loss``; the loop ends early once no candidate trains.
    """
    running = np.ones(population, bool)  # neither failed nor stopped
    stopped = np.zeros(population, bool)
    failed = np.zeros(population, bool)
    best_accuracy = np.full(population, -np.inf)
    best_epoch = np.full(population, -1)
    waited = np.zeros(population, int)
    history, train_loss = [], []
    for epoch in range(epochs):
        if not running.any():
            break
        accuracy, loss, failed = run_epoch(epoch, running)
        history.append(accuracy)
        train_loss.append(loss)
        running &= ~failed
        improved = running & (accuracy > best_accuracy)
        best_accuracy = np.where(improved, accuracy, best_accuracy)
        best_epoch = np.where(improved, epoch, best_epoch)
        waited = np.where(improved, 0, waited + 1)
        if patience is not None:
            stop = running & (waited >= patience)
            stopped |= stop
            running &= ~stop
    status = np.where(failed, STATUS_FAILED, np.where(stopped, STATUS_EARLY_STOPPED, STATUS_OK))
    return {"status": status, "best_epoch": best_epoch, "best_accuracy": best_accuracy,
            "history": np.stack(history), "train_loss": np.stack(train_loss)}


def check_training(encs, params_P, train_x, train_y, epochs: int, patience, shift: int, keys, seed: int):
    """The arguments every population trainer shares, checked (ValueError naming the fix); returns (train_x,
    train_y int32, keys [P]: the given ones or ``candidate_keys(key(seed), P)``)."""
    check_population(encs, params_P)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if shift < 0 or (shift and jnp.ndim(train_x) != 4):
        raise ValueError(f"shift must be >= 0 pixels and needs images [N, H, W, C]; got shift={shift} for inputs "
                         f"of shape {jnp.shape(train_x)}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 epoch (or None to never stop early), got {patience}")
    population = jnp.shape(encs)[0]
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} examples but train_y {train_y.shape[0]} labels")
    keys = candidate_keys(jax.random.key(seed), population) if keys is None else keys
    if keys.shape != (population,):
        raise ValueError(f"keys must be [P] = [{population}] PRNG keys (one per candidate), got shape {keys.shape}")
    return train_x, train_y, keys


def check_population(encs: jax.Array, params_P) -> None:
    """ValueError unless encs is [P, n_choices] and every params_P leaf (if given) has the leading axis P."""
    if jnp.ndim(encs) != 2:
        raise ValueError(
            f"encodings must be a population [P, n_choices], got shape {jnp.shape(encs)}; "
            "for one candidate pass enc[None]"
        )
    if params_P is None:
        return
    population = jnp.shape(encs)[0]
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(params_P)}
    if sizes != {population}:
        raise ValueError(
            f"params_P leaves must all have the population axis P = {population} first, got leading sizes {sizes}; "
            "use init_population / tile_population to build them"
        )


def shifted(key: jax.Array, images: jax.Array, shift: int) -> jax.Array:
    """images [B, H, W, C], each translated by its own random offset in [-shift, shift]^2 (zero fill)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * shift + 1)

    def crop(img, o):
        return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def per_example(values: jax.Array) -> jax.Array:
    """[B, ...] -> [B]: each example's mean over its other axes (a sequence's mean over its positions)."""
    return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))



def step_keys(key: jax.Array, shift: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(next key, dropout key, translation key or None when ``shift`` is 0): how every trainer splits one
    candidate's key per step, so its dropout and translations do not depend on the backend."""
    if shift:
        key, dropout_key, shift_key = jax.random.split(key, 3)
        return key, dropout_key, shift_key
    key, dropout_key = jax.random.split(key)
    return key, dropout_key, None


def guard(finite: jax.Array, running: jax.Array, failed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(take this step, failed after it): a running candidate whose step is not finite fails and stays frozen at
    its last finite weights; stopped and failed candidates never take a step."""
    return running & ~failed & finite, failed | (running & ~finite)
