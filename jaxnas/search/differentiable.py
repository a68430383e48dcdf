"""Differentiable architecture search over the NAS-Bench-201 cell and the macro space: DARTS, PC-DARTS and GDAS.

The cell's discrete choice (one op per edge) is relaxed: architecture parameters ``alpha`` [6 edges, 5 ops] give
every edge a mixed operation ``sum_k w[e, k] op_k(x)`` (`NB201Supernet.apply_mixed`) with

    darts     w = softmax(alpha) per edge                                                  (Liu et al., 2019)
    pc_darts  w = softmax(alpha) on the first c / K channels of each edge's input, the rest bypassing it, then a
              channel shuffle; node j = sum_i softmax_i(beta)[i -> j] * edge(i -> j)        (Xu et al., 2020)
    gdas      w = one-hot of argmax((alpha + Gumbel noise) / tau), one op per edge, a new draw every step;
              backward the gradient of softmax((alpha + noise) / tau) (straight-through); tau anneals linearly from
              tau_max to tau_min over the epochs                                             (Dong & Yang, 2019)

The macro space's conv families are relaxed choice by choice (FBNetV2-style masks, `ConvSupernet.apply_relaxed`):
``alpha`` holds one vector per choice (depth, channels, kernel, expansion, activation, norm, skip of every stage,
and the family), w = softmax(alpha) (darts) or a Gumbel one-hot (gdas) per choice; the derived network takes each
choice's argmax (`derive_choices`). PC-DARTS' partial channels belong to cell edges and are not offered there.

Bilevel optimisation (`bilevel_step`): the weights w minimise the loss on the train split, the architecture
parameters the loss of w on held-out data (the validation split). One compiled step does both: the architecture
step on a validation batch, then the weight step on a training batch with the updated architecture (DARTS' order).
First order uses grad_alpha L_val(w, alpha). Second order (`unrolled_arch_grad`) unrolls one virtual SGD step
w' = w - xi grad_w L_train(w, alpha) (xi: the weights' current learning rate) and approximates the
Hessian-vector product by central finite differences (Liu et al., eq. 7-8):

    grad_alpha L_val(w', alpha) - xi [grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)] / (2 eps),
    w+- = w +- eps v,   v = grad_w' L_val(w', alpha),   eps = 0.01 / ||v||

Derivation (`derive`): every edge keeps argmax_k alpha[e, k] (NAS-Bench-201 keeps all six edges, so PC-DARTS'
betas pick nothing here); "none" is excluded by default, as DARTS does (NAS-Bench-201's own code includes it).
Collapse guard: the share of parameter-free ops (`PARAMETER_FREE`) and the skip connections of the cell derived
after every epoch are recorded; DARTS+ early stopping (``differentiable.stop_skips``) ends the search once the
derived cell has that many skip connections.

`DifferentiableSearch` runs the epochs of a search run (`jaxnas.search.loop`, mode differentiable): the
weights learn with SGD + momentum on a cosine schedule, clipped and weight-decayed as DARTS; the architecture
with Adam (betas 0.5, 0.999) and L2 weight decay.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas.config import RunConfig
from jaxnas.data import epoch_indices
from jaxnas.spaces import Space
from jaxnas.spaces.nb201 import EDGES, OPS
from jaxnas.supernet.conv import ConvSupernet
from jaxnas.supernet.nb201 import NB201Supernet

PARAMETER_FREE = ("none", "skip_connect", "avg_pool_3x3")
"""The ops without weights: a cell made mostly of them is DARTS' well-known failure mode (collapse)."""

_NONE, _SKIP = OPS.index("none"), OPS.index("skip_connect")
_FREE = np.array([op in PARAMETER_FREE for op in OPS])
_INTO = np.array([[to == node for to, _ in EDGES] for node in (1, 2, 3)])  # [node, edge]: edge e enters node
INIT_SCALE = 1e-3
"""Architecture parameters start as N(0, INIT_SCALE^2), as DARTS, PC-DARTS and GDAS do."""


# ------------------------------------------------------------------------------------------- relaxations
def init_arch(strategy: str, key: jax.Array) -> dict:
    """Architecture parameters: ``{"alpha": float32 [6, 5]}`` (edges in `EDGES` order, ops in `OPS` order), plus
    ``"beta": float32 [6]`` (edge normalisation) for pc_darts."""
    alpha_key, beta_key = jax.random.split(key)
    arch = {"alpha": INIT_SCALE * jax.random.normal(alpha_key, (len(EDGES), len(OPS)))}
    if strategy == "pc_darts":
        arch["beta"] = INIT_SCALE * jax.random.normal(beta_key, (len(EDGES),))
    return arch


def edge_softmax(beta: jax.Array) -> jax.Array:
    """float [6]: each edge's share of its node, softmax(beta) over the edges that enter the same node (PC-DARTS'
    edge normalisation; node 1 has one edge, which always gets 1)."""
    logits = jnp.where(_INTO, beta[None, :], -jnp.inf)
    return jnp.where(_INTO, jax.nn.softmax(logits, axis=-1), 0.0).sum(0)


def gumbel_one_hot(alpha: jax.Array, key: jax.Array, tau: jax.Array) -> jax.Array:
    """GDAS' sample, float [edges, ops]: exactly one-hot forward (the argmax of softmax((alpha + G) / tau), G
    Gumbel noise drawn with ``key``), the gradient of that softmax backward (straight-through)."""
    soft = jax.nn.softmax((alpha + jax.random.gumbel(key, alpha.shape, alpha.dtype)) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), alpha.shape[-1], dtype=soft.dtype)
    return hard + (soft - jax.lax.stop_gradient(soft))  # the bracket is exactly 0: the forward is exactly one-hot


def init_choices(supernet: ConvSupernet, key: jax.Array) -> dict:
    """Architecture parameters of the macro space: ``{"alpha": {choice name: float32 [n_options]}}`` for every
    choice `ConvSupernet.apply_relaxed` weighs."""
    names = supernet.relaxed_choices
    keys = jax.random.split(key, len(names))
    return {"alpha": {name: INIT_SCALE * jax.random.normal(k, (len(supernet.space[name].options),))
                      for name, k in zip(names, keys, strict=True)}}


@dataclasses.dataclass(frozen=True)
class MixedLoss:
    """``loss(weights, arch, x, y, key, tau) -> (mean cross-entropy, accuracy)`` of the relaxed supernet.

    Hashable, so it can be a static argument of `jax.jit`. ``key`` draws GDAS' Gumbel noise and ``tau`` is its
    temperature (both unused by darts and pc_darts).

    Attributes:
      supernet: an NB201 supernet (the cell: `NB201Supernet.apply_mixed`) or a conv supernet of the macro space
        (every choice relaxed: `ConvSupernet.apply_relaxed`; darts and gdas).
      strategy: darts, pc_darts or gdas.
      pc_k: pc_darts' partial-channel divisor K (1: every channel).
      edge_normalisation: pc_darts' betas scale the edges (needs ``arch["beta"]``).
      cost_weight: macro space: the loss adds cost_weight x E[MACs] / the MACs of the space's largest network
        (`ConvSupernet.expected_macs`), a resource-aware search in the manner of FBNet and ProxylessNAS; it depends
        on the architecture parameters only, so only their step feels it.
    """

    supernet: NB201Supernet | ConvSupernet
    strategy: str
    pc_k: int = 1
    edge_normalisation: bool = False
    cost_weight: float = 0.0

    @property
    def cell(self) -> bool:
        """Whether the search is over the NB201 cell (else over the macro space)."""
        return isinstance(self.supernet, NB201Supernet)

    def init_arch(self, key: jax.Array) -> dict:
        return init_arch(self.strategy, key) if self.cell else init_choices(self.supernet, key)

    def relaxed(self, arch: dict, key: jax.Array, tau) -> tuple:
        """(op weights, edge weights [6] or None) of the architecture parameters ``arch``: the cell's op weights
        [6, 5], or the macro space's {choice: weights [n_options]}."""
        alpha = arch["alpha"]
        if self.strategy == "gdas":
            leaves, treedef = jax.tree.flatten(alpha)
            keys = [key] if len(leaves) == 1 else list(jax.random.split(key, len(leaves)))
            return treedef.unflatten([gumbel_one_hot(a, k, tau) for a, k in zip(leaves, keys, strict=True)]), None
        edges = edge_softmax(arch["beta"]) if self.edge_normalisation else None
        return jax.tree.map(lambda a: jax.nn.softmax(a, axis=-1), alpha), edges

    def __call__(self, weights, arch: dict, x: jax.Array, y: jax.Array, key: jax.Array, tau):
        op_weights, edge_weights = self.relaxed(arch, key, tau)
        if self.cell:
            logits = self.supernet.apply_mixed(weights, op_weights, x, edge_weights=edge_weights, partial=self.pc_k)
        else:
            logits = self.supernet.apply_relaxed(weights, op_weights, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        if self.cost_weight:
            loss = loss + self.cost_weight * self.supernet.expected_macs(op_weights) / largest_macs(self.supernet)
        return loss, (jnp.argmax(logits, -1) == y).mean()


@functools.lru_cache(maxsize=16)
def largest_macs(supernet: ConvSupernet) -> float:
    """MACs per example of the largest network of ``supernet``'s space (over its families): the cost term's unit."""
    space, index = supernet.space, supernet.space.index("family")
    options = space["family"].options
    with jax.ensure_compile_time_eval():  # first called while the loss is traced: these are constants
        encs = [np.array(space.sample(jax.random.key(0), 1))[0] for _ in supernet.families]
        for enc, family in zip(encs, supernet.families, strict=True):
            enc[index] = options.index(family)
        return float(max(supernet.macs(np.asarray(supernet.largest(space.canonicalize(enc)))) for enc in encs))


# ------------------------------------------------------------------------------------------- bilevel step
class Bilevel(NamedTuple):
    """What a bilevel search carries: network weights, architecture parameters, and their optimiser states."""

    weights: object
    arch: dict
    weight_opt: object
    arch_opt: object


def init_bilevel(weights, arch: dict, weight_opt: optax.GradientTransformation,
                 arch_opt: optax.GradientTransformation) -> Bilevel:
    return Bilevel(weights, arch, weight_opt.init(weights), arch_opt.init(arch))


def _where(take, new, old):
    return jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)


def _arch_update(arch_opt, state: Bilevel, grads, learn) -> Bilevel:
    updates, opt_state = arch_opt.update(grads, state.arch_opt, state.arch)
    new = (optax.apply_updates(state.arch, updates), opt_state)
    arch, opt_state = _where(learn, new, (state.arch, state.arch_opt))  # warm-up epochs: the architecture waits
    return state._replace(arch=arch, arch_opt=opt_state)


def _weight_update(weight_opt, state: Bilevel, grads) -> Bilevel:
    updates, opt_state = weight_opt.update(grads, state.weight_opt, state.weights)
    return state._replace(weights=optax.apply_updates(state.weights, updates), weight_opt=opt_state)


def unrolled_arch_grad(loss, weights, arch: dict, train_batch, val_batch, key, tau, xi):
    """(DARTS' second-order gradient of the validation loss w.r.t. ``arch``, (validation loss, accuracy) at w').

    w' = w - xi grad_w L_train(w, alpha) is one virtual plain SGD step (the paper's equation; DARTS' code adds
    the momentum and weight decay, which do not depend on alpha); the Hessian-vector product
    grad^2_{alpha, w} L_train(w, alpha) v, v = grad_w' L_val(w', alpha), is approximated by central finite
    differences at w +- eps v with eps = 0.01 / ||v|| (Liu et al., 2019, eq. 7-8). ``loss`` as `MixedLoss`.
    """
    (xt, yt), (xv, yv) = train_batch, val_batch

    def train_loss(w, a):
        return loss(w, a, xt, yt, key, tau)[0]

    virtual = jax.tree.map(lambda w, g: w - xi * g, weights, jax.grad(train_loss)(weights, arch))
    out, (v, direct) = jax.value_and_grad(loss, (0, 1), has_aux=True)(virtual, arch, xv, yv, key, tau)
    eps = 0.01 / jnp.maximum(optax.global_norm(v), 1e-12)

    def arch_grad_at(sign):
        return jax.grad(train_loss, 1)(jax.tree.map(lambda w, d: w + sign * eps * d, weights, v), arch)

    plus, minus = arch_grad_at(1.0), arch_grad_at(-1.0)
    return jax.tree.map(lambda g, p, m: g - xi * (p - m) / (2 * eps), direct, plus, minus), out


def bilevel_step(loss, weight_opt, arch_opt, state: Bilevel, train_batch, val_batch, key, tau, xi, learn_arch,
                 *, second_order: bool = False) -> tuple[Bilevel, dict]:
    """One architecture step on ``val_batch`` (x, y), then one weight step on ``train_batch`` with the updated
    architecture; returns (state, {"val_loss", "val_accuracy", "train_loss", "train_accuracy"} scalars).

    ``loss`` as `MixedLoss`; ``key`` its randomness (the two steps draw apart); ``tau`` GDAS' temperature; ``xi``
    the virtual step of ``second_order`` (the weights' learning rate); ``learn_arch`` False leaves the architecture
    and its optimiser as they are (warm-up). Pure: jit it with ``loss``, the optimisers and ``second_order``
    static. The first-order step runs its two updates as a two-step `lax.scan` over one body, so XLA compiles
    the network's gradient once (the body computes both gradients in either step: a little more work per step for
    a much shorter compile; docs/benchmarks.md). Both
    batches must have the same shape. The validation metrics are the architecture step's (second order: at the
    virtual weights w').
    """
    arch_key, weight_key = jax.random.split(key)
    (xt, yt), (xv, yv) = train_batch, val_batch
    if second_order:
        grads, (val_loss, val_accuracy) = unrolled_arch_grad(
            loss, state.weights, state.arch, train_batch, val_batch, arch_key, tau, xi
        )
        state = _arch_update(arch_opt, state, grads, learn_arch)
        (train_loss, train_accuracy), grads = jax.value_and_grad(loss, has_aux=True)(
            state.weights, state.arch, xt, yt, weight_key, tau
        )
        state = _weight_update(weight_opt, state, grads)
    else:
        def update(state, inputs):
            x, y, k, arch_turn = inputs
            out, (weight_grads, arch_grads) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
                state.weights, state.arch, x, y, k, tau
            )
            arched = _arch_update(arch_opt, state, arch_grads, learn_arch)
            return _where(arch_turn, arched, _weight_update(weight_opt, state, weight_grads)), out

        inputs = (jnp.stack([xv, xt]), jnp.stack([yv, yt]), jnp.stack([arch_key, weight_key]), jnp.array([True, False]))
        state, (losses, accuracies) = jax.lax.scan(update, state, inputs)
        (val_loss, train_loss), (val_accuracy, train_accuracy) = losses, accuracies
    metrics = {"val_loss": val_loss, "val_accuracy": val_accuracy, "train_loss": train_loss,
               "train_accuracy": train_accuracy}
    return state, metrics


# ------------------------------------------------------------------------------------------- derivation
def derive(alpha, exclude_none: bool = True) -> np.ndarray:
    """int32 [6]: the discrete cell, each edge's op of largest alpha (``exclude_none``: among the other four)."""
    scores = np.array(alpha, np.float64)
    if exclude_none:
        scores[:, _NONE] = -np.inf
    return scores.argmax(-1).astype(np.int32)


def derive_choices(space: Space, alpha: dict) -> np.ndarray:
    """int32 [n_choices]: the macro-space architecture of each choice's largest alpha (dropout: its first option),
    canonical (choices of stages that do not exist are inactive)."""
    enc = np.zeros(space.n_choices, np.int32)
    for name, a in alpha.items():
        enc[space.index(name)] = int(np.argmax(np.asarray(a)))
    return np.asarray(space.canonicalize(enc), np.int32)


def alpha_entropy(alpha) -> float:
    """Mean over edges (cell) or over choices with more than one option (macro space) of the entropy of
    softmax(alpha), in nats (uniform over the cell's 5 ops: log 5 = 1.609; decided: 0)."""
    if isinstance(alpha, dict):
        rows = [a for a in alpha.values() if np.size(a) > 1]
        return float(np.mean([alpha_entropy(np.asarray(a)[None]) for a in rows])) if rows else 0.0
    p = jax.nn.softmax(jnp.asarray(alpha, jnp.float32), axis=-1)
    return float(-(p * jnp.log(jnp.maximum(p, 1e-30))).sum(-1).mean())


def param_free_share(enc) -> float:
    """Share of the cell's edges whose op has no weights (none, skip_connect, avg_pool_3x3)."""
    return float(_FREE[np.asarray(enc)].mean())


def skip_connections(enc) -> int:
    """How many of the cell's edges are skip_connect."""
    return int((np.asarray(enc) == _SKIP).sum())


def columns(strategy: str, cell: bool = True) -> tuple[str, ...]:
    """The per-epoch metrics `DifferentiableSearch.epoch` reports for ``strategy`` (history.csv columns); the
    collapse guard's two only for the ``cell``."""
    tau = ("tau",) if strategy == "gdas" else ()
    guard = ("param_free_share", "skip_connections") if cell else ()
    return ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "alpha_entropy", *guard, *tau)


def summary(rows: list[dict]) -> dict:
    """summary.json's ``differentiable`` entry from a run's per-epoch history rows (oldest first): the architecture
    derived at the end, its op weights softmax(alpha) ([6][5] for the cell, {choice: [n_options]} for the macro
    space), and (cell) the collapse guard's numbers per epoch."""
    last = rows[-1]
    guard = {f"{name}_per_epoch": [r[name] for r in rows]
             for name in ("param_free_share", "skip_connections") if name in last}
    return {"epochs": len(rows), "derived_arch": last["arch"], "alpha_entropy": last["alpha_entropy"], **guard,
            "op_weights": last["op_weights"]}


# ------------------------------------------------------------------------------------------- the run's search
class DifferentiableSearch:
    """The epochs of one differentiable search (mode differentiable): ``init(key) -> state``, then
    ``epoch(state, e) -> (state, derived enc, metrics)`` for e = 0, 1, ... (the cell's enc int32 [6], or an encoding
    of the macro space).

    ``state = {"search": Bilevel, "key": PRNG key}`` is a pytree (what the run checkpoints). Epoch e walks the
    train split in the order ``epoch_indices(n_train, batch, seed, e)``; the architecture steps cycle through the
    validation split in its own order of epoch e; step i draws its randomness from ``fold_in(epoch key, i)``. So
    an epoch is a function of (state, e) alone, and a run resumed from a checkpoint ends exactly as one left alone.
    """

    def __init__(self, cfg: RunConfig, supernet: NB201Supernet | ConvSupernet, train: tuple, validation: tuple):
        d, self.strategy = cfg.differentiable, cfg.search.strategy
        self.d, self.seed = d, cfg.seed
        self.train, self.validation = train, validation  # (images [N, H, W, C], labels [N]) on the device
        for name, (_, labels) in (("train", train), ("validation", validation)):
            if len(labels) < d.batch_size:
                raise ValueError(f"differentiable.batch_size={d.batch_size} exceeds the {len(labels)} examples of the "
                                 f"{name} split; lower differentiable.batch_size")
        pc = self.strategy == "pc_darts"
        self.loss = MixedLoss(supernet, self.strategy, pc_k=d.pc_k if pc else 1,
                              edge_normalisation=pc and d.edge_normalisation, cost_weight=d.cost_weight)
        self.steps = len(train[1]) // d.batch_size
        self._step, self.weight_opt, self.arch_opt, self.schedule = _compiled(self.loss, d, self.steps)

    def init(self, key: jax.Array) -> dict:
        weights_key, arch_key, run_key = jax.random.split(key, 3)
        weights = self.loss.supernet.init(weights_key)
        return {"search": init_bilevel(weights, self.loss.init_arch(arch_key), self.weight_opt, self.arch_opt),
                "key": run_key}

    def tau(self, epoch: int) -> float:
        """GDAS' temperature of ``epoch``: tau_max at the first, tau_min at the last, linear in between."""
        d = self.d
        return d.tau_max - (d.tau_max - d.tau_min) * epoch / max(d.epochs - 1, 1)

    def epoch(self, state: dict, epoch: int) -> tuple[dict, np.ndarray, dict]:
        """One epoch of bilevel steps; returns (state, the architecture derived after it, metrics): the means over
        its steps of `bilevel_step`'s metrics, the alpha entropy, (cell) the derived cell's parameter-free share and
        skip connections, tau for gdas, and ``op_weights``: softmax(alpha) rounded to 4 decimals (the cell's [6][5]
        list, or {choice: [n_options]})."""
        d = self.d
        key, epoch_key = jax.random.split(state["key"])
        train_rows = epoch_indices(len(self.train[1]), d.batch_size, self.seed, epoch)
        val_rows = epoch_indices(len(self.validation[1]), d.batch_size, self.seed + 1, epoch)
        tau, learn = jnp.float32(self.tau(epoch)), jnp.bool_(epoch >= d.warmup_epochs)
        search, steps = state["search"], []
        for i, rows in enumerate(train_rows):
            xi = jnp.float32(self.schedule(epoch * self.steps + i))
            search, metrics = self._step(search, self.train, self.validation, rows, val_rows[i % len(val_rows)],
                                         jax.random.fold_in(epoch_key, i), tau, xi, learn)
            steps.append(metrics)
        means = {k: float(np.mean(v)) for k, v in jax.device_get(jax.tree.map(lambda *s: jnp.stack(s), *steps)).items()}
        alpha = jax.device_get(search.arch["alpha"])
        weights = jax.tree.map(lambda a: np.asarray(jax.nn.softmax(a, axis=-1), np.float64).round(4).tolist(), alpha)
        means.update(alpha_entropy=alpha_entropy(alpha), op_weights=weights)
        if self.loss.cell:
            enc = derive(alpha, d.exclude_none)
            means.update(param_free_share=param_free_share(enc), skip_connections=skip_connections(enc))
        else:
            enc = derive_choices(self.loss.supernet.space, alpha)
        if self.strategy == "gdas":
            means["tau"] = float(tau)
        return {"search": search, "key": key}, enc, means


@functools.lru_cache(maxsize=8)
def _compiled(loss: MixedLoss, d, steps: int):
    """(the jitted step, the weight optimiser, the architecture optimiser, the weights' learning-rate schedule) of
    ``d`` (a DifferentiableConfig) with ``steps`` steps per epoch; searches that differ only in their seed (or their
    data of the same shapes) share one compiled step."""
    schedule = optax.cosine_decay_schedule(
        d.learning_rate, max(1, d.epochs * steps),
        alpha=d.min_learning_rate / d.learning_rate if d.learning_rate > 0 else 0.0,
    )
    weight_opt = optax.chain(
        optax.clip_by_global_norm(d.grad_clip) if d.grad_clip > 0 else optax.identity(),
        optax.add_decayed_weights(d.weight_decay),
        optax.sgd(schedule, momentum=d.momentum or None),
    )
    arch_opt = optax.chain(optax.add_decayed_weights(d.arch_weight_decay),
                           optax.adam(d.arch_learning_rate, b1=0.5, b2=0.999))
    step = jax.jit(functools.partial(_data_step, loss, weight_opt, arch_opt, second_order=d.second_order))
    return step, weight_opt, arch_opt, schedule


def _data_step(loss, weight_opt, arch_opt, state, train, validation, train_rows, val_rows, key, tau, xi, learn,
               *, second_order):
    """`bilevel_step` on the batches ``train_rows`` of the train split and ``val_rows`` of the validation split
    (gathered inside the compiled step, from the splits on the device)."""
    batch = (train[0][train_rows], train[1][train_rows])
    held_out = (validation[0][val_rows], validation[1][val_rows])
    return bilevel_step(loss, weight_opt, arch_opt, state, batch, held_out, key, tau, xi, learn,
                        second_order=second_order)
