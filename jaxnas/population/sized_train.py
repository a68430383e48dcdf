"""Population training at every candidate's exact sizes: one program, no masks, no padded FLOPs.

`jaxnas.population.masked.train_population` vmaps one masked train step over the population: on GPU / TPU that is
the fastest form, but on CPU the masked program trains every block at the largest width, depth and kernel, with
every activation of a `lax.switch` and Adam updating the padded weights (in the macro space only ~18% of its
FLOPs are the candidates' own, benchmarks/population.py), and XLA:CPU runs vmapped per-candidate convolutions
densely (docs/benchmarks.md). `train_population_sized` is the CPU formulation of the same function for the macro space's
families (MLP, CNN, ResNet, MobileNet; an `MLPSupernet`, a `ConvSupernet` or a search model holding both):

- Each candidate runs **its own layers at their real sizes**: the layer programs of `jaxnas.population.sized` (widths,
  centre-cropped kernels, expansion) on weights cut to those sizes, with its activation, norm and skip as plain
  ops (no masks, no `lax.switch`), BatchNorm on the batch's statistics as the masked supernet trains. P
  candidates are one program: a jitted step (forward, backward and the optimiser of every candidate, its
  gradient being its own loss's) per **plan** of up to `CHUNK` candidates, called once per batch, plus a jitted
  validation batch and one conversion each way between the supernet layout (``params_P`` leaves ``[P, ...]`` at
  the largest sizes) and the candidates' own. A population compiles once for all its epochs; a new population
  (a search's next generation) compiles its own plans. With several local devices the plans are spread over
  them (fewer candidates per plan, so that each device has one) and run side by side, each batch dispatching
  every plan's step (for hosts with real devices: on a CPU, XLA already uses every core inside one plan).
- Candidates are not grouped into batched matmuls (no faster, slower to compile), populations are split into
  plans (one large program compiles for minutes), and an epoch is a Python loop over the jitted step (XLA:CPU
  runs convolutions inside a ``lax.scan`` body much slower): the measurements are in docs/benchmarks.md.
- The semantics are `train_population`'s: the same batches (``epoch_indices``), the same dropout keys and
  masks (drawn at the largest width and cut to the candidate's) and ``shift`` translations, per-candidate
  early stopping with patience and NaN / inf isolation (a failing candidate is frozen at its last finite
  weights; the others train on unaffected), validation in the same padded batches, the same
  `PopulationResult`. Weights outside a candidate's sizes are returned as given (a masked Adam / SGD step
  leaves them unchanged too). tests/test_population_sized_train.py checks the result against `train_population` for every
  family (to float tolerance with SGD; with Adam, float-rounding differences of near-zero gradients become sign
  flips of Adam's first steps, so trained networks agree in accuracy, not bit for bit).

Differences: the optimiser states live in the candidates' own layout for the call and are not returned
(``PopulationResult.opt_state`` is None, and ``opt_state`` cannot be passed in). Plans are spread over the
local devices instead of sharding one program: each plan runs on one device, side by side with the others.

    result = train_population_sized(supernet, params_P, encs, optax.adam(1e-3), x, y, vx, vy, epochs=3, batch_size=64)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas.data import epoch_indices
from jaxnas.distributed import to_host
from jaxnas.population import sized
from jaxnas.population.common import (
    PopulationResult,
    all_finite,
    batched,
    check_training,
    guard,
    run_epochs,
    shifted,
    step_keys,
)
from jaxnas.supernet.conv import ConvSupernet
from jaxnas.supernet.mlp import MLPSupernet
from jaxnas.supernet.weights import own_slices

# XLA's own convolution for the candidates' dense convolutions (the fast one at a single network's real sizes
# on CPU, benchmarks/population.py); depthwise ones run as shifted slices (`jaxnas.sized.DEPTHWISE_FORMULATION`).
FORMULATION = "lax"


CHUNK = 16  # candidates per compiled program (see the module docstring: compile time of bigger programs)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static structure of some candidates (``members``: their rows in the population; hashable).

    ``chains``: each member's layer programs (`jaxnas.population.sized` ops run on weights at their own sizes), the head
    last; ``max_widths``: the width of the member's family at the head's input (dropout masks are drawn there
    and cut, as the masked supernet draws them); ``rates``: dropout before the head.
    """

    members: tuple[int, ...]
    chains: tuple[tuple[sized.Op, ...], ...]
    max_widths: tuple[int, ...]
    rates: tuple[float, ...]


def _part(model, enc):
    """The supernet of ``enc``'s family: the model itself, or a search model's ``mlp`` / ``conv``."""
    if isinstance(model, MLPSupernet | ConvSupernet):
        return model
    return model.mlp if model.family(enc) == "mlp" else model.conv


def plans_for(model, encs, chunk: int | None = None, devices: int = 1) -> list[_Plan]:
    """Plans of population ``encs`` [P, n_choices] of ``model``, ``chunk`` candidates each (default: `CHUNK`, or
    fewer so that every one of ``devices`` devices gets a plan)."""
    encs = np.asarray(encs)
    chunk = min(CHUNK, -(-len(encs) // devices)) if chunk is None else chunk
    plans = []
    for first in range(0, len(encs), chunk):
        rows = encs[first : first + chunk]
        chains = tuple(sized.ops_for(model, enc, FORMULATION) for enc in rows)
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
        else full[name][(c, *own_slices(full[name].shape[1:], shape))]
        for name, shape in shapes.items()
    }


def _paste(shapes: dict, full: dict, own: dict, c: int) -> None:
    """Write ``own`` into member ``c``'s part of every leaf of ``full`` (writable numpy arrays) in ``shapes``."""
    for name, shape in shapes.items():
        if isinstance(shape, dict):
            _paste(shape, full[name], own[name], c)
        else:
            full[name][(c, *own_slices(full[name].shape[1:], shape))] = own[name]


# The conversions run in numpy on the host: jitted, they compiled for seconds per population for what is copying
# of slices (docs/benchmarks.md).
def to_plan(plan: _Plan, host_P) -> list[list[dict]]:
    """The plan's members' weights from supernet-layout ``host_P`` (numpy leaves [P, ...]) cut to their own
    sizes: per member, per op, the op's `weight_shapes` tree of arrays."""
    return [
        [_cut(op.weight_shapes(), sized.at(host_P, op.path), c) for op in chain]
        for c, chain in zip(plan.members, plan.chains, strict=True)
    ]


def from_plan(plan: _Plan, own: list[list[dict]], host_P) -> None:
    """Write the plan's members' own-size weights ``own`` (`to_plan`'s layout) into ``host_P`` (writable numpy
    leaves [P, ...])."""
    for c, chain, weights in zip(plan.members, plan.chains, own, strict=True):
        for op, w in zip(chain, weights, strict=True):
            _paste(op.weight_shapes(), sized.at(host_P, op.path), jax.tree.map(np.asarray, w), c)


# ---------------------------------------------------------------------------------------------- programs
def _forward_one(chain: tuple[sized.Op, ...], rate: float, max_width: int, weights: list, x, dropout_key=None):
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
    keys, dropout_keys, shift_keys = jax.vmap(lambda k: step_keys(k, shift))(keys)
    # each candidate's own translations, from its own key (as the masked backend draws them)
    xbs = [shifted(k, xb, shift) for k in shift_keys] if shift else [xb] * len(plan.members)
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(own, xbs, y[rows], list(dropout_keys))
    new_own, new_states = [], []
    for i, (w, g, state) in enumerate(zip(own, grads, opt_states, strict=True)):
        updates, new_state = optimizer.update(g, state, w)
        # Non-finite gradients give non-finite updates (and a finite weight plus a finite update stays finite).
        take, failed_i = guard(jnp.isfinite(losses[i]) & all_finite(updates), running[i], failed[i])
        failed = failed.at[i].set(failed_i)
        # A frozen candidate's update is zero, inside the optimiser's own elementwise pass (no extra copy of the
        # weights); its optimiser state runs on but is never used again (frozen candidates stay frozen).
        new_own.append(jax.tree.map(lambda p, u, take=take: p + jnp.where(take, u, 0).astype(p.dtype), w, updates))
        new_states.append(new_state)
    return new_own, new_states, keys, failed, losses


def _epoch(plans: list[_Plan], optimizer, states: list[list], running: list, data: list, index, shift=0):
    """One epoch of every plan over batches ``index`` [n_batches, B] (a numpy array); ``states[k]`` is plan k's
    [own, opt_states, keys, failed], updated in place, ``running[k]`` its members' flags and ``data[k]`` its
    (x, y, index) on its device. Returns each plan's mean step loss per member [n_members].

    A Python loop over one jitted step, not a ``lax.scan``: XLA:CPU runs the convolutions inside a scan's loop
    body much slower than the same step called from Python (docs/benchmarks.md). Each
    batch dispatches every plan's step before the next batch's, so plans on different devices run side by side.
    The step donates the weights and optimiser states: the arrays in ``states`` are consumed and replaced.
    """
    losses = [[] for _ in plans]
    for b in range(len(index)):
        for k, plan in enumerate(plans):
            x, y, rows = data[k]
            *states[k], loss = _step(plan, optimizer, *states[k], running[k], x, y, rows[b], shift)
            losses[k].append(loss)
    return [to_host(jnp.stack(ls)).mean(0) for ls in losses]


@functools.partial(jax.jit, static_argnames="plan")
def _evaluate_batch(plan: _Plan, own, x, y, weight):
    """Summed loss and correct predictions [n_members] over one padded batch x [B, ...] (weight [B])."""
    logits = jnp.stack([_forward_one(chain, rate, width, w, x)
                        for chain, rate, width, w in zip(plan.chains, plan.rates, plan.max_widths, own, strict=True)])
    loss = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, y))(logits)
    correct = jnp.argmax(logits, -1) == y
    return (loss * weight).sum(-1), (correct * weight).sum(-1)


def evaluate_plans(
    plans: list[_Plan], own: list[list], x, y, batch_size: int = 256, devices: list | None = None
) -> dict[str, np.ndarray]:
    """{"loss", "accuracy"} [P] of the plans' members (weights ``own``, one list per plan) on (x, y), in the
    padded batches `jaxnas.population.evaluate_population` uses (BatchNorm sees the same batches).

    ``devices``: the device of each plan's weights (the data is copied there; default: one device)."""
    xb, weight = batched(jnp.asarray(x), batch_size)
    yb, _ = batched(jnp.asarray(y, jnp.int32), batch_size)
    data = _on_devices((xb, yb, weight), devices or [None] * len(plans))
    sums = [[] for _ in plans]
    for i in range(xb.shape[0]):  # batch by batch, every plan: the devices' programs run side by side
        for k, (plan, w) in enumerate(zip(plans, own, strict=True)):
            xs, ys, ws = data[k]
            sums[k].append(_evaluate_batch(plan, w, xs[i], ys[i], ws[i]))
    n = jnp.shape(y)[0]
    loss = np.concatenate([to_host(sum(s[0] for s in ss)) for ss in sums])
    correct = np.concatenate([to_host(sum(s[1] for s in ss)) for ss in sums])
    return {"loss": loss / n, "accuracy": correct / n}


def _on_devices(tree, devices: list) -> list:
    """``tree`` on each of ``devices`` (one copy per distinct device; None: left where it is)."""
    copies: dict = {}
    return [copies.setdefault(d, tree if d is None else jax.device_put(tree, d)) for d in devices]


def supports(model) -> bool:
    """Whether `train_population_sized` trains ``model``'s candidates: an `MLPSupernet` or `ConvSupernet` (or its
    bound ``apply``), or a search model holding them (``model.mlp`` / ``model.conv``)."""
    model = getattr(model, "__self__", model)
    return sized.supports(model)


def train_population_sized(
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
    devices=None,
) -> PopulationResult:
    """`jaxnas.population.masked.train_population` with every candidate at its exact sizes (see the module docstring).

    Arguments as there, with the model itself (an `MLPSupernet`, a `ConvSupernet` or a search model holding
    them; ``params_P`` in its layout) instead of its ``apply``. ``opt_state`` must be None (the optimiser starts
    fresh; the result's ``opt_state`` is None). ``devices``: where the plans run, spread round-robin (default:
    every local device; plans on different devices run side by side).
    """
    if not supports(model):
        raise TypeError(
            f"train_population_sized trains macro-space supernets (MLPSupernet, ConvSupernet or a search model of "
            f"them), got {type(model).__name__}; use jaxnas.population.train_population(model.apply, ...) for it"
        )
    if opt_state is not None:
        raise ValueError(
            "train_population_sized starts every optimiser state fresh and cannot take opt_state; to resume an "
            "optimiser state use jaxnas.population.train_population(model.apply, ..., opt_state=...)"
        )
    encs = np.asarray(encs, np.int32)
    train_x, train_y, keys = check_training(
        jnp.asarray(encs), params_P, train_x, train_y, epochs, patience, shift, keys, seed)
    population = len(encs)

    devices = _devices(devices)
    plans = plans_for(model, encs, devices=len(devices))
    placed = [devices[k % len(devices)] for k in range(len(plans))]  # plan k runs on placed[k]
    host = jax.tree.map(lambda a: np.array(to_host(a)), params_P)  # a writable copy: the result is written into it
    states = []
    for plan, device in zip(plans, placed, strict=True):
        own = jax.device_put(to_plan(plan, host), device)
        # The step donates its weights and optimiser states: own copies, so that no caller's array (nor an
        # optimiser state aliasing a weight) is consumed.
        own, opt_state = jax.tree.map(jnp.copy, (own, [optimizer.init(w) for w in own]))
        # Every input committed to the plan's device, as the step's outputs are: one compile, not two.
        states.append(jax.device_put(
            [own, opt_state, keys[jnp.asarray(plan.members)], jnp.zeros(len(plan.members), bool)], device))
    data = _on_devices((train_x, train_y), placed)

    def run_epoch(epoch, running):
        index = epoch_indices(train_x.shape[0], batch_size, seed, epoch)
        on_device = [(*xy, rows) for xy, rows in zip(data, _on_devices(index, placed), strict=True)]
        flags = [jax.device_put(running[np.asarray(plan.members)], d) for plan, d in zip(plans, placed, strict=True)]
        losses = _epoch(plans, optimizer, states, flags, on_device, index, shift)
        accuracy = evaluate_plans(plans, [s[0] for s in states], val_x, val_y, eval_batch_size, placed)["accuracy"]
        return accuracy, np.concatenate(losses), np.concatenate([to_host(s[3]) for s in states])

    outcome = run_epochs(population, epochs, patience, run_epoch)
    for plan, state in zip(plans, states, strict=True):
        from_plan(plan, state[0], host)
    # Placed as params_P was (one device, or sharded over a mesh).
    params = jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(new),
        host, params_P)
    return PopulationResult(params=params, opt_state=None, **outcome)


def _devices(devices) -> list:
    """The devices the plans are spread over: ``devices`` as given, else this process's local devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device (e.g. jax.local_devices()), got none")
    return devices
