"""Population training at every candidate's exact sizes: one program, no masks, no padded FLOPs.

`jaxnas.population.train_population` vmaps one masked train step over the population: on GPU / TPU that is
the fastest form, but on CPU the masked program trains every block at the largest width, depth and kernel, with
every activation of a `lax.switch` and Adam updating the padded weights (in the macro space only ~18% of its
FLOPs are the candidates' own, benchmarks/population.py), and XLA:CPU runs vmapped per-candidate convolutions
densely (SPEC.md). `train_population_exact` is the CPU formulation of the same function for the macro space's
families (MLP, CNN, ResNet, MobileNet; an `MLPSupernet`, a `ConvSupernet` or a search model holding both):

- Each candidate runs **its own layers at their real sizes**: the layer programs of `jaxnas.exact` (widths,
  centre-cropped kernels, expansion) on weights cut to those sizes, with its activation, norm and skip as plain
  ops (no masks, no `lax.switch`), BatchNorm on the batch's statistics as the masked supernet trains. P
  candidates are one program: a jitted step (forward, backward and the optimiser of every candidate, its
  gradient being its own loss's) per **plan** of up to `CHUNK` candidates, called once per batch, plus a jitted
  validation batch and one conversion each way between the supernet layout (``params_P`` leaves ``[P, ...]`` at
  the largest sizes) and the candidates' own. A population compiles once for all its epochs; a new population
  (a search's next generation) compiles its own plans.
- Measured on our CPU (one epoch, P = 16): batching same-shape layers of different candidates into one batched
  matmul was no faster than the candidates' own matmuls and compiled slower, so candidates are not grouped;
  XLA compiles a plan at ~2 s per MLP candidate and one 64-candidate program was still compiling after 4 minutes
  (four plans of 16: under 3), hence plans; the epoch is a Python loop over the jitted step because XLA:CPU ran
  the CNNs' convolutions inside a ``lax.scan`` body ~10x slower than the same step called from Python (MLPs:
  the same speed either way).
- The semantics are `train_population`'s: the same batches (``epoch_indices``), the same dropout keys and
  masks (drawn at the largest width and cut to the candidate's) and ``shift`` translations, per-candidate
  early stopping with patience and NaN / inf isolation (a failing candidate is frozen at its last finite
  weights; the others train on unaffected), validation in the same padded batches, the same
  `PopulationResult`. Weights outside a candidate's sizes are returned as given (a masked Adam / SGD step
  leaves them unchanged too). tests/test_exact_train.py checks the result against `train_population` for every
  family (to float tolerance with SGD; with Adam, float-rounding differences of near-zero gradients become sign
  flips of Adam's first steps, so trained networks agree in accuracy, not bit for bit).

Differences: the optimiser states live in the candidates' own layout for the call and are not returned
(``PopulationResult.opt_state`` is None, and ``opt_state`` cannot be passed in); one device (no sharding).

    result = train_population_exact(supernet, params_P, encs, optax.adam(1e-3), x, y, vx, vy, epochs=3, batch_size=64)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import exact
from jaxnas.data import epoch_indices
from jaxnas.distributed import to_host
from jaxnas.population import PopulationResult, _all_finite, _batched, _shifted, check_training, run_epochs
from jaxnas.supernet.conv import ConvSupernet
from jaxnas.supernet.mlp import MLPSupernet

# XLA's own convolution for the candidates' dense convolutions (the fast one at a single network's real sizes
# on CPU, benchmarks/population.py); depthwise ones run as shifted slices (`jaxnas.exact.DEPTHWISE_FORMULATION`).
FORMULATION = "lax"


CHUNK = 16  # candidates per compiled program (see the module docstring: compile time of bigger programs)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static structure of some candidates (``members``: their rows in the population; hashable).

    ``chains``: each member's layer programs (`jaxnas.exact` ops run on weights at their own sizes), the head
    last; ``max_widths``: the width of the member's family at the head's input (dropout masks are drawn there
    and cut, as the masked supernet draws them); ``rates``: dropout before the head.
    """

    members: tuple[int, ...]
    chains: tuple[tuple[exact.Op, ...], ...]
    max_widths: tuple[int, ...]
    rates: tuple[float, ...]


def _part(model, enc):
    """The supernet of ``enc``'s family: the model itself, or a search model's ``mlp`` / ``conv``."""
    if isinstance(model, MLPSupernet | ConvSupernet):
        return model
    return model.mlp if model.family(enc) == "mlp" else model.conv


def plans_for(model, encs, chunk: int | None = None) -> list[_Plan]:
    """Plans of population ``encs`` [P, n_choices] of ``model``, ``chunk`` (default `CHUNK`) candidates each."""
    chunk = CHUNK if chunk is None else chunk
    encs = np.asarray(encs)
    plans = []
    for first in range(0, len(encs), chunk):
        rows = encs[first : first + chunk]
        chains = tuple(tuple(op.own() for op in exact.ops_for(model, enc, FORMULATION)) for enc in rows)
        parts = [_part(model, enc) for enc in rows]
        plans.append(_Plan(
            tuple(range(first, first + len(rows))), chains, tuple(part.max_width for part in parts),
            tuple(float(part.arch(enc).dropout) for part, enc in zip(parts, rows, strict=True)),
        ))
    return plans


# ---------------------------------------------------------------------------------------------- layouts
def _cut(shapes: dict, full: dict, c: int) -> dict:
    """Member ``c``'s weights of supernet-layout leaves ``full`` ([P, ...]) cut to an op's ``shapes`` tree."""
    return {
        name: _cut(shape, full[name], c) if isinstance(shape, dict)
        else full[name][(c, *exact._crop(full[name].shape[1:], shape))]
        for name, shape in shapes.items()
    }


def _paste(shapes: dict, full: dict, own: dict, c: int) -> dict:
    """``full`` with member ``c``'s part of every leaf in ``shapes`` replaced by ``own`` (`_cut`'s inverse)."""
    pasted = dict(full)
    for name, shape in shapes.items():
        if isinstance(shape, dict):
            pasted[name] = _paste(shape, full[name], own[name], c)
        else:
            pasted[name] = full[name].at[(c, *exact._crop(full[name].shape[1:], shape))].set(own[name])
    return pasted


def _replace_at(tree, path: exact.Path, fn):
    """A copy of ``tree`` (nested dicts / lists) with the subtree at ``path`` replaced by ``fn(subtree)``."""
    if not path:
        return fn(tree)
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[path[0]] = _replace_at(tree[path[0]], path[1:], fn)
    return copy


@functools.partial(jax.jit, static_argnames="plan")
def to_plan(plan: _Plan, params_P) -> list[list[dict]]:
    """The plan's members' weights from supernet-layout ``params_P`` (leaves [P, ...]) cut to their own sizes:
    per member, per op, the op's `weight_shapes` tree of arrays."""
    return [
        [_cut(op.weight_shapes(), exact._at(params_P, op.path), c) for op in chain]
        for c, chain in zip(plan.members, plan.chains, strict=True)
    ]


@functools.partial(jax.jit, static_argnames="plan")
def from_plan(plan: _Plan, own: list[list[dict]], params_P):
    """``params_P`` with the plan's members' own-size weights replaced by ``own`` (`to_plan`'s layout)."""
    for c, chain, weights in zip(plan.members, plan.chains, own, strict=True):
        for op, w in zip(chain, weights, strict=True):
            def paste(full, op=op, w=w, c=c):
                return _paste(op.weight_shapes(), full, w, c)

            params_P = _replace_at(params_P, op.path, paste)
    return params_P


# ---------------------------------------------------------------------------------------------- programs
def _forward_one(chain: tuple[exact.Op, ...], rate: float, max_width: int, weights: list, x, dropout_key=None):
    """Logits [B, classes] of one candidate at its own sizes (its own ops only: no masks, no switch).

    BatchNorm normalises with the batch's statistics, as the masked supernet trains (and, without stored
    statistics, evaluates)."""
    h = x
    for op, w in zip(chain[:-1], weights[:-1], strict=True):
        h = op.run(w, h, None, op.arguments)[0]
    head, w = chain[-1], weights[-1]
    if head.pool:
        h = h.mean((1, 2))
    if dropout_key is not None and rate > 0:
        # Drawn at the largest width and cut, as the masked supernet draws it: the same mask.
        keep = jax.random.uniform(dropout_key, (h.shape[0], max_width))[:, : h.shape[1]] >= rate
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h @ w["kernel"] + w["bias"]


@functools.partial(jax.jit, static_argnames=("plan", "optimizer", "shift"), donate_argnums=(2, 3))
def _step(plan: _Plan, optimizer, own, opt_states, keys, failed, running, x, y, rows, shift=0):
    """One optimiser step of the plan's members on batch ``rows`` [B].

    ``own`` / ``opt_states``: lists over the members; ``keys``, ``failed``, ``running`` [n_members]. Returns
    (own, opt_states, keys, failed, losses [n_members]).
    """

    def loss_fn(own, xbs, yb, dropout_keys):
        losses = jnp.stack([
            optax.softmax_cross_entropy_with_integer_labels(_forward_one(chain, rate, width, w, xb, key), yb).mean()
            for chain, rate, width, w, xb, key in zip(
                plan.chains, plan.rates, plan.max_widths, own, xbs, dropout_keys, strict=True)
        ])
        # A sum of independent candidates' losses: each one's gradient is its own loss's.
        return losses.sum(), losses

    xb = x[rows]
    if shift:  # each candidate's own translations, from its own key (as train_population draws them)
        split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
        keys, dropout_keys = split[:, 0], split[:, 1]
        xbs = [_shifted(k, xb, shift) for k in split[:, 2]]
    else:
        split = jax.vmap(jax.random.split)(keys)
        keys, dropout_keys = split[:, 0], split[:, 1]
        xbs = [xb] * len(plan.members)
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(own, xbs, y[rows], list(dropout_keys))
    new_own, new_states = [], []
    for i, (w, g, state) in enumerate(zip(own, grads, opt_states, strict=True)):
        updates, new_state = optimizer.update(g, state, w)
        # Non-finite gradients give non-finite updates (and a finite weight plus a finite update stays finite).
        finite = jnp.isfinite(losses[i]) & _all_finite(updates)
        take = running[i] & ~failed[i] & finite
        failed = failed.at[i].set(failed[i] | (running[i] & ~finite))
        # A frozen candidate's update is zero, inside the optimiser's own elementwise pass (no extra copy of the
        # weights); its optimiser state runs on but is never used again (frozen candidates stay frozen).
        new_own.append(jax.tree.map(lambda p, u, take=take: p + jnp.where(take, u, 0).astype(p.dtype), w, updates))
        new_states.append(new_state)
    return new_own, new_states, keys, failed, losses


def _epoch(plan: _Plan, optimizer, own, opt_states, keys, failed, running, x, y, index, shift=0):
    """One epoch of the plan's members over batches ``index`` [n_batches, B]: (own, opt_states, keys, failed)
    and the per-step losses [n_batches, n_members].

    A Python loop over one jitted step, not a ``lax.scan``: measured on our CPU (16 CNNs, one epoch), XLA:CPU ran
    the convolutions inside a scan's loop body about 10x slower than the same step called from Python.
    The step donates ``own`` and ``opt_states``: the caller's arrays are consumed.
    """
    losses = []
    for rows in index:
        own, opt_states, keys, failed, loss = _step(
            plan, optimizer, own, opt_states, keys, failed, running, x, y, rows, shift)
        losses.append(loss)
    return (own, opt_states, keys, failed), jnp.stack(losses)


@functools.partial(jax.jit, static_argnames="plan")
def _evaluate_batch(plan: _Plan, own, x, y, weight):
    """Summed loss and correct predictions [n_members] over one padded batch x [B, ...] (weight [B])."""
    logits = jnp.stack([_forward_one(chain, rate, width, w, x)
                        for chain, rate, width, w in zip(plan.chains, plan.rates, plan.max_widths, own, strict=True)])
    loss = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, y))(logits)
    correct = jnp.argmax(logits, -1) == y
    return (loss * weight).sum(-1), (correct * weight).sum(-1)


def evaluate_plans(plans: list[_Plan], own: list[list], x, y, batch_size: int = 256) -> dict[str, np.ndarray]:
    """{"loss", "accuracy"} [P] of the plans' members (weights ``own``, one list per plan) on (x, y), in the
    padded batches `jaxnas.population.evaluate_population` uses (BatchNorm sees the same batches)."""
    xb, weight = _batched(jnp.asarray(x), batch_size)
    yb, _ = _batched(jnp.asarray(y, jnp.int32), batch_size)
    loss, correct = [], []
    for plan, w in zip(plans, own, strict=True):
        sums = [_evaluate_batch(plan, w, xb[i], yb[i], weight[i]) for i in range(xb.shape[0])]
        loss.append(to_host(sum(s[0] for s in sums)))
        correct.append(to_host(sum(s[1] for s in sums)))
    n = jnp.shape(y)[0]
    return {"loss": np.concatenate(loss) / n, "accuracy": np.concatenate(correct) / n}


def supports(model) -> bool:
    """Whether `train_population_exact` trains ``model``'s candidates: an `MLPSupernet` or `ConvSupernet` (or its
    bound ``apply``), or a search model holding them (``model.mlp`` / ``model.conv``)."""
    model = getattr(model, "__self__", model)
    return exact.supports(model)


def train_population_exact(
    model,
    params_P,
    encs,
    optimizer: optax.GradientTransformation,
    train_x,
    train_y,
    val_x,
    val_y,
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
    """`jaxnas.population.train_population` with every candidate at its exact sizes (see the module docstring).

    Arguments as there, with the model itself (an `MLPSupernet`, a `ConvSupernet` or a search model holding
    them; ``params_P`` in its layout) instead of its ``apply``. ``opt_state`` must be None (the optimiser starts
    fresh; the result's ``opt_state`` is None).
    """
    if not supports(model):
        raise TypeError(
            f"train_population_exact trains macro-space supernets (MLPSupernet, ConvSupernet or a search model of "
            f"them), got {type(model).__name__}; use jaxnas.population.train_population(model.apply, ...) for it"
        )
    if opt_state is not None:
        raise ValueError(
            "train_population_exact starts every optimiser state fresh and cannot take opt_state; to resume an "
            "optimiser state use jaxnas.population.train_population(model.apply, ..., opt_state=...)"
        )
    encs = np.asarray(encs, np.int32)
    train_x, train_y, keys = check_training(
        jnp.asarray(encs), params_P, train_x, train_y, epochs, patience, shift, keys, seed)
    population = len(encs)

    plans = plans_for(model, encs)
    own = [to_plan(plan, params_P) for plan in plans]
    # The step donates its weights and optimiser states: own copies, so that no caller's array (nor an optimiser
    # state aliasing a weight) is consumed.
    own, opt_states = jax.tree.map(jnp.copy, (own, [[optimizer.init(w) for w in ws] for ws in own]))
    keys = [keys[jnp.asarray(plan.members)] for plan in plans]
    failed = [jnp.zeros(len(plan.members), bool) for plan in plans]

    def run_epoch(epoch, running):
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        losses = []
        for i, plan in enumerate(plans):
            members = np.asarray(plan.members)
            (own[i], opt_states[i], keys[i], failed[i]), loss = _epoch(
                plan, optimizer, own[i], opt_states[i], keys[i], failed[i], jnp.asarray(running[members]),
                train_x, train_y, index, shift,
            )
            losses.append(to_host(loss).mean(0))
        accuracy = evaluate_plans(plans, own, val_x, val_y, eval_batch_size)["accuracy"]
        return accuracy, np.concatenate(losses), np.concatenate([to_host(f) for f in failed])

    outcome = run_epochs(population, epochs, patience, run_epoch)
    params = params_P
    for plan, w in zip(plans, own, strict=True):
        params = from_plan(plan, w, params)
    return PopulationResult(params=params, opt_state=None, **outcome)
