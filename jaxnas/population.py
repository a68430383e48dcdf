"""A population as one compiled program: vmapped evaluation and training of P candidates (any supernet family).

Every function takes the family's pure ``apply(params, enc, x, *, train, key) -> logits [B, classes]`` (e.g.
`jaxnas.supernet.MLPSupernet.apply`); it is a static argument of `jax.jit`, so it must be hashable (a bound
method of a frozen dataclass is). Encodings are ``[P, n_choices] int32``; "params_P" means a parameter pytree
whose every leaf has a leading population axis ``[P, ...]``.

- `evaluate_shared`: shared weights, vmapped over encodings (one supernet scores a whole population);
- `evaluate_population`: vmapped over (params, encodings) (P trained candidates);
- `predict` + `classification_report`: logits of one chosen candidate, then per-class precision / recall / F1;
- `init_population` / `tile_population`: params_P from scratch or copied from supernet weights (warm start);
- `train_population`: P independent candidates, each with its own params and optimiser state, trained by
  `jax.vmap` of one train step inside a jitted `lax.scan` over an epoch; per-candidate early stopping and
  NaN / inf isolation. Warm start from a supernet: ``params_P = tile(supernet params, P)``;
- `train_supernet`: weight-sharing training of one supernet on subnets drawn by a `SubnetSampler` (uniform or
  the sandwich rule: largest, smallest and random subnets, gradients averaged);
- `shard_population`: pad the population axis to the device count and shard it across a mesh; `replicate`
  places shared weights beside it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxnas.data import epoch_indices
from jaxnas.distributed import to_host
from jaxnas.status import Status

Apply = Callable[..., jax.Array]
"""``apply(params, enc [n_choices] int32, x [B, ...], *, train: bool, key) -> logits [B, classes]``."""

STATUS_OK, STATUS_EARLY_STOPPED, STATUS_FAILED = Status.OK, Status.EARLY_STOPPED, Status.FAILED


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_shared(
    apply: Apply, params, encs: jax.Array, x: jax.Array, y: jax.Array, batch_size: int = 256
) -> dict[str, jax.Array]:
    """Loss and accuracy of every encoding in ``encs`` [P, n_choices] int32 with one shared ``params``.

    x [N, ...] inputs, y [N] int32 labels; N need not divide ``batch_size`` (the last batch is padded and the
    padding ignored). Returns ``{"loss": [P] mean cross-entropy, "accuracy": [P] in [0, 1]}``. One compile
    serves every population of the same shape.
    """
    return _evaluate(apply, params, encs, x, y, batch_size, shared=True)


def evaluate_population(
    apply: Apply, params_P, encs: jax.Array, x: jax.Array, y: jax.Array, batch_size: int = 256
) -> dict[str, jax.Array]:
    """Like `evaluate_shared`, but candidate p uses its own parameters: leaves of ``params_P`` are [P, ...]."""
    return _evaluate(apply, params_P, encs, x, y, batch_size, shared=False)


def predict(apply: Apply, params, enc: jax.Array, x: jax.Array, batch_size: int = 256) -> jax.Array:
    """logits [N, classes] of one candidate ``enc`` [n_choices] int32 (e.g. for `classification_report`)."""
    xb, _ = _batched(jnp.asarray(x), batch_size)
    logits = _predict_batches(apply, params, jnp.asarray(enc, jnp.int32), xb)
    return logits.reshape(-1, logits.shape[-1])[: x.shape[0]]


@functools.partial(jax.jit, static_argnames="apply")
def _predict_batches(apply, params, enc, xb):
    return jax.lax.map(lambda x: apply(params, enc, x, train=False, key=None), xb)


def _evaluate(apply, params, encs, x, y, batch_size, shared):
    _check_population(encs, None if shared else params)
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels; they must match")
    xb, weight = _batched(x, batch_size)
    yb, _ = _batched(y, batch_size)
    loss_sum, correct = _evaluate_sums(apply, params, jnp.asarray(encs, jnp.int32), xb, yb, weight, shared)
    n = x.shape[0]
    return {"loss": loss_sum / n, "accuracy": correct / n}


def _batched(a: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """a [N, ...] -> ([n_batches, batch_size, ...] zero-padded, weight [n_batches, batch_size] 1 real / 0 pad)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = a.shape[0]
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    padded = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    weight = (jnp.arange(n_batches * batch_size) < n).astype(jnp.float32)
    return padded.reshape(n_batches, batch_size, *a.shape[1:]), weight.reshape(n_batches, batch_size)


@functools.partial(jax.jit, static_argnames=("apply", "shared"))
def _evaluate_sums(apply, params, encs, xb, yb, weight, shared):
    """Summed loss [P] and correct predictions [P] over all batches (padding weighted out)."""

    def one(p, enc, x, y, w):
        logits = apply(p, enc, x, train=False, key=None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(loss * w), jnp.sum((jnp.argmax(logits, -1) == y) * w)

    def batch(totals, data):
        x, y, w = data
        loss, correct = jax.vmap(one, in_axes=(None if shared else 0, 0, None, None, None))(params, encs, x, y, w)
        return (totals[0] + loss, totals[1] + correct), None

    zeros = jnp.zeros(encs.shape[0], jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(batch, (zeros, zeros), (xb, yb, weight))
    return loss_sum, correct


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


# ---------------------------------------------------------------------------------------------- training
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


class PopulationState(NamedTuple):
    """What one training epoch carries: params_P, optimiser state (leaves [P, ...]), keys [P], failed bool [P]."""

    params: object
    opt_state: object
    keys: jax.Array
    failed: jax.Array


@dataclasses.dataclass(frozen=True)
class PopulationResult:
    """Outcome of `train_population` for P candidates over the E epochs that ran.

    Attributes:
      params: params_P after training; early-stopped candidates hold their weights from their stop epoch,
        failed ones their last finite weights.
      opt_state: the optimiser states, leaves [P, ...] (pass back to resume).
      status: [P] str, ``"ok"`` / ``"early_stopped"`` / ``"failed"`` (loss, gradients or update not finite).
      best_epoch: [P] int, epoch (0-based) of the best validation accuracy, -1 if it failed in its first epoch.
      best_accuracy: [P] float, that accuracy.
      history: [E, P] float, validation accuracy after each epoch.
      train_loss: [E, P] float, mean training loss over each epoch's steps (non-finite once a candidate failed).
    """

    params: object
    opt_state: object
    status: np.ndarray
    best_epoch: np.ndarray
    best_accuracy: np.ndarray
    history: np.ndarray
    train_loss: np.ndarray


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
) -> PopulationResult:
    """Train P independent candidates at once: `jax.vmap` of one train step inside a jitted `lax.scan` epoch.

    Args:
      apply: the family's pure apply (static: hashable).
      params_P: leaves [P, ...]; `init_population` for scratch, `tile_population` to warm-start from a supernet.
      encs: [P, n_choices] int32, candidate p's architecture.
      optimizer: any optax transformation; each candidate gets its own state. Reuse one object across calls
        to reuse the compiled epoch (it is a static argument of jit).
      train_x, train_y: [N, ...] inputs and [N] int32 labels, kept on device; every epoch walks the batches
        of ``epoch_indices(N, batch_size, seed, epoch)`` (shared by all candidates, remainder dropped).
      val_x, val_y: validation split, scored after every epoch (early stopping, ``history``).
      patience: stop (freeze) a candidate after this many epochs without a better validation accuracy;
        None: never stop early.
      keys: [P] dropout keys (default ``candidate_keys(key(seed), P)``), so a candidate trained alone with its
        key matches its run inside a population.
      opt_state: optimiser states [P, ...] to resume from, or to give candidates their own hyper-parameters
        (``optax.inject_hyperparams``); default ``vmap(optimizer.init)(params_P)``.
      shift: data augmentation for images [N, H, W, C]: every training example is translated by a random
        offset of up to ``shift`` pixels in each direction (zero fill), drawn from the candidate's own key;
        0 (default) trains on the images as they are.

    A candidate whose loss, gradients or updated weights are not finite is marked failed and frozen at its
    last finite weights; stopped and failed candidates keep being carried (masked by ``jnp.where``), so the
    others' numbers are the same as in a run without them. The loop ends early once no candidate trains.
    """
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
        accuracy = to_host(evaluate_population(apply, state.params, encs, val_x, val_y, eval_batch_size)["accuracy"])
        return accuracy, to_host(losses).mean(0), to_host(state.failed)

    outcome = run_epochs(population, epochs, patience, run_epoch)
    return PopulationResult(params=state.params, opt_state=state.opt_state, **outcome)


def run_epochs(population: int, epochs: int, patience: int | None, run_epoch) -> dict[str, np.ndarray]:
    """The per-candidate bookkeeping of a population's training: early stopping with ``patience``, failures.

    ``run_epoch(epoch, running [P] bool) -> (validation accuracy [P], mean training loss [P], failed [P] bool)``
    trains the candidates still running for one epoch. Returns `PopulationResult`'s ``status``, ``best_epoch``,
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
    _check_population(encs, params_P)
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


def _shifted(key: jax.Array, images: jax.Array, shift: int) -> jax.Array:
    """images [B, H, W, C], each translated by its own random offset in [-shift, shift]^2 (zero fill)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * shift + 1)

    def crop(img, o):
        return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("apply", "optimizer", "shift"))
def _train_epoch(apply, optimizer, state: PopulationState, running, encs, x, y, index, shift=0):
    """One epoch over the batches ``index`` [n_batches, B]; returns (state, per-step loss [n_batches, P])."""

    def loss_fn(params, enc, xb, yb, key):
        logits = apply(params, enc, xb, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(params, opt_state, key, failed, running, enc, xb, yb):
        if shift:
            key, dropout_key, shift_key = jax.random.split(key, 3)
            xb = _shifted(shift_key, xb, shift)
        else:
            key, dropout_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, enc, xb, yb, dropout_key)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params)
        take = running & ~failed & finite
        failed = failed | (running & ~finite)

        def keep(new, old):
            return jnp.where(take, new, old)

        return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), key, failed, loss

    def batch(state, rows):
        xb, yb = x[rows], y[rows]
        out = jax.vmap(step, in_axes=(0, 0, 0, 0, 0, 0, None, None))(*state, running, encs, xb, yb)
        return PopulationState(*out[:4]), out[4]

    return jax.lax.scan(batch, state, index)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _check_population(encs: jax.Array, params_P) -> None:
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


# ---------------------------------------------------------------------------------------------- supernet
@dataclasses.dataclass(frozen=True)
class SubnetSampler:
    """Draws the subnets one weight-sharing step trains: ``sampler(key) -> [n, n_choices] int32``.

    ``rule="uniform"``: n uniform samples of ``space``. ``rule="sandwich"``: the largest and the smallest
    subnet plus n - 2 uniform ones (largest / smallest are the family's ``enc -> enc`` maps, e.g.
    `MLPSupernet.largest`, applied to fresh samples so their categorical choices vary). Hashable, so it can be
    a static argument of jit.
    """

    space: object
    n: int
    rule: str = "sandwich"
    largest: Callable[[jax.Array], jax.Array] | None = None
    smallest: Callable[[jax.Array], jax.Array] | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("uniform", "sandwich"):
            raise ValueError(f"rule must be 'uniform' or 'sandwich', got {self.rule!r}")
        if self.rule == "sandwich" and (self.n < 2 or self.largest is None or self.smallest is None):
            raise ValueError(
                f"the sandwich rule needs n >= 2 (got {self.n}) and both largest and smallest, e.g. "
                "SubnetSampler(space, 4, 'sandwich', supernet.largest, supernet.smallest)"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1 subnets per step, got {self.n}")

    def __call__(self, key: jax.Array) -> jax.Array:
        encs = self.space.sample(key, self.n)
        if self.rule == "uniform":
            return encs
        return jnp.concatenate([self.largest(encs[:1]), self.smallest(encs[1:2]), encs[2:]])


def train_supernet(
    apply: Apply,
    params,
    optimizer: optax.GradientTransformation,
    sampler: SubnetSampler,
    train_x: jax.Array,
    train_y: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    opt_state=None,
    distill: float = 0.0,
    shift: int = 0,
) -> tuple[object, object, np.ndarray]:
    """Weight-sharing training: every step trains the shared ``params`` on ``sampler``'s subnets.

    The step's loss is the mean over the sampled subnets of their batch loss, so its gradient is the average of
    the subnets' gradients. A subnet's loss is its cross-entropy with the labels; with ``distill`` > 0 (in-place
    distillation, BigNAS / OFA: needs the sandwich rule, whose first subnet is the largest) every other subnet's
    is ``(1 - distill) * CE(labels) + distill * CE(largest's soft predictions)``, the teacher's predictions taken
    in the same step and not differentiated through. ``shift``: random translations of the batch by up to that
    many pixels (as `train_population`). Each epoch is one jitted `lax.scan` over the batches of
    ``epoch_indices(N, batch_size, seed, epoch)``; subnets and dropout are drawn from ``key(seed)``. A learning
    rate schedule belongs in ``optimizer`` (its step count is the optimiser state's, so it continues on resume).
    Returns ``(params, opt_state, loss [epochs, n_batches, n] per step and subnet: cross-entropy with the labels)``.
    """
    if distill and (sampler.rule != "sandwich" or not 0.0 < distill <= 1.0):
        raise ValueError(f"distill={distill} needs the sandwich rule (its first subnet is the teacher) and a weight "
                         "in (0, 1]")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    losses = []
    for epoch in range(epochs):
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        key = jax.random.fold_in(jax.random.key(seed), epoch)
        params, opt_state, loss = _supernet_epoch(
            apply, optimizer, sampler, float(distill), int(shift), params, opt_state, key, train_x, train_y, index
        )
        losses.append(np.asarray(loss))
    return params, opt_state, np.stack(losses)


@functools.partial(jax.jit, static_argnames=("apply", "optimizer", "sampler", "distill", "shift"))
def _supernet_epoch(apply, optimizer, sampler, distill, shift, params, opt_state, key, x, y, index):
    def mean_loss(params, encs, xb, yb, keys):
        logits = jax.vmap(lambda enc, k: apply(params, enc, xb, train=True, key=k))(encs, keys)
        ce = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, yb).mean())(logits)
        if not distill:
            return ce.mean(), ce
        teacher = jax.nn.softmax(jax.lax.stop_gradient(logits[0]))
        kd = jax.vmap(lambda lg: optax.softmax_cross_entropy(lg, teacher).mean())(logits[1:])
        student = (1.0 - distill) * ce[1:] + distill * kd
        return jnp.concatenate([ce[:1], student]).mean(), ce

    def step(carry, data):
        params, opt_state = carry
        rows, step_key = data
        sample_key, dropout_key = jax.random.split(step_key)
        encs = sampler(sample_key)
        keys = jax.random.split(dropout_key, encs.shape[0])
        xb = _shifted(jax.random.fold_in(step_key, 2), x[rows], shift) if shift else x[rows]
        grads, losses = jax.grad(mean_loss, has_aux=True)(params, encs, xb, y[rows], keys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), losses

    keys = jax.random.split(key, index.shape[0])
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (index, keys))
    return params, opt_state, losses


# ---------------------------------------------------------------------------------------------- devices
def population_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"population"`` over ``devices`` for `shard_population`.

    The default is every global device: in a multi-process run (`jaxnas.distributed`) the devices of all
    processes, so the population axis is split across hosts (fetch results with `jaxnas.distributed.to_host`).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("population",), axis_types=(AxisType.Auto,))


def shard_population(tree, mesh: Mesh) -> tuple[object, int]:
    """(tree with leading axis padded to a multiple of the mesh size and sharded over all its axes, P).

    Every leaf of ``tree`` has the population axis P first (encodings, params_P, keys ...). Padding repeats the
    last candidate, so padded rows are valid architectures; slice results with ``[:P]`` to drop them.
    The sharding uses automatic axes whatever the mesh declares: the population programs are written per
    candidate and vmapped, so the compiler propagates the split along P without per-op annotations (explicit
    axes would demand an output sharding for every gather an encoding drives).
    """
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"every leaf needs the same population axis first, got leading sizes {sizes}")
    (population,) = sizes
    pad = -population % mesh.devices.size
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    sharding = NamedSharding(auto, PartitionSpec(mesh.axis_names))

    def place(leaf):
        leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)]) if pad else leaf
        return _place(leaf, sharding)

    return jax.tree.map(place, tree), population


def replicate(tree, mesh: Mesh):
    """``tree`` (e.g. shared supernet weights) replicated on every device of ``mesh``, to use beside sharded
    populations (needed across processes, where a process-local array cannot join a global program)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: _place(leaf, sharding), tree)


def _place(leaf, sharding: NamedSharding):
    if jax.process_count() > 1 and isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        # Across processes only host values (the same in every process) can be placed on the global mesh.
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        leaf = np.asarray(leaf)
    return jax.device_put(leaf, sharding)
