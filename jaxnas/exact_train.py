"""Population training of MLP candidates at their exact sizes: one program, no masks, no padded FLOPs.

`jaxnas.population.train_population` vmaps one masked train step over the population: on GPU / TPU that is
the fastest form, but on CPU the masked MLP trains every block at the largest width and depth, with every
activation of a `lax.switch` and Adam updating the padded weights (in the macro space only ~18% of its FLOPs
are the candidates' own, benchmarks/population.py). `train_population_exact` is the CPU formulation of the same
function for the MLP family:

- Each candidate runs **its own layers at their real widths** (its activation, norm and skip as plain ops: no
  masks, no `lax.switch`), and P candidates are one program: a jitted epoch (``lax.scan`` over the batches;
  forward, backward and the optimiser of every candidate, its gradient being its own loss's) per **plan** of up
  to `CHUNK` candidates, plus a jitted validation pass and one conversion each way between the supernet layout
  (``params_P`` leaves ``[P, ...]`` at the largest sizes) and the candidates' own. A population compiles once
  for all its epochs; a new population (a search's next generation) compiles its own plans.
- Measured on our CPU (16 MLPs of the macro space, one epoch), batching same-shape layers of different
  candidates into one batched matmul was no faster than the candidates' own matmuls and compiled slower, so
  candidates are not grouped. Populations are cut into plans of `CHUNK`: XLA compiles a plan at ~2 s per
  candidate, but one 64-candidate program was still compiling after 4 minutes (four plans of 16: under 3).
- The semantics are `train_population`'s: the same batches (``epoch_indices``), the same dropout keys and
  masks (drawn at the largest width and cut to the candidate's) and ``shift`` translations, per-candidate
  early stopping with patience and NaN / inf isolation (a failing candidate is frozen at its last finite
  weights; the others train on unaffected), the same `PopulationResult`. Weights outside a candidate's sizes
  are returned as given (a masked Adam / SGD step leaves them unchanged too). tests/test_exact_train.py checks
  the result against `train_population` (to float tolerance with SGD; with Adam, float-rounding differences of
  near-zero gradients become sign flips of Adam's first steps, so trained networks agree in accuracy, not bit
  for bit).

Differences: the optimiser states live in the candidates' own layout for the call and are not returned
(``PopulationResult.opt_state`` is None, and ``opt_state`` cannot be passed in). Only the MLP family.

    result = train_population_exact(supernet, params_P, encs, optax.adam(1e-3), x, y, vx, vy, epochs=3, batch_size=64)
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
from jaxnas.population import (
    PopulationResult,
    _all_finite,
    _batched,
    _check_population,
    _shifted,
    candidate_keys,
    run_epochs,
)
from jaxnas.supernet.mlp import ACTIVATION_FNS, NORM_EPSILON, MLPSupernet



CHUNK = 16  # candidates per compiled program (see the module docstring: compile time of bigger programs)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One dense layer of a candidate: ``n_in -> n_out`` units, supernet block ``where`` = (stage k, block j)."""

    n_in: int
    n_out: int
    where: tuple[int, int]
    act: str
    norm: bool
    skip: bool


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static structure of some candidates (``members``: their rows in the population; hashable)."""

    members: tuple[int, ...]
    max_width: int
    chains: tuple[tuple[_Layer, ...], ...]
    widths: tuple[int, ...]  # the head's input width per member
    rates: tuple[float, ...]  # dropout before the head per member


def plans_for(supernet: MLPSupernet, encs, chunk: int | None = None) -> list[_Plan]:
    """Plans of MLP population ``encs`` [P, n_choices], ``chunk`` (default `CHUNK`) candidates each."""
    chunk = CHUNK if chunk is None else chunk
    plans = []
    encs = np.asarray(encs)
    for first in range(0, len(encs), chunk):
        chains, widths, rates = [], [], []
        for enc in encs[first : first + chunk]:
            arch = supernet.arch(enc)
            chain, width = [], supernet.in_features
            for k, stage in enumerate(arch.stages):
                for j in range(stage.depth):
                    chain.append(_Layer(width, stage.width, (k, j), stage.activation, bool(stage.norm),
                                        bool(stage.skip and j > 0)))
                    width = stage.width
            chains.append(tuple(chain))
            widths.append(width)
            rates.append(float(arch.dropout))
        members = tuple(range(first, first + len(chains)))
        plans.append(_Plan(members, supernet.max_width, tuple(chains), tuple(widths), tuple(rates)))
    return plans


# ---------------------------------------------------------------------------------------------- layouts
@functools.partial(jax.jit, static_argnames="plan")
def to_plan(plan: _Plan, params_P) -> list[dict]:
    """The plan's members' weights from supernet-layout ``params_P`` (leaves [P, ...]), cut to their real sizes:
    one ``{"layers": [{"kernel", "bias"(, "scale", "offset")}], "head": {"kernel", "bias"}}`` per member."""
    out = []
    for c, chain, width in zip(plan.members, plan.chains, plan.widths, strict=True):
        layers = []
        for layer in chain:
            block = params_P["stages"][layer.where[0]][layer.where[1]]
            w = {"kernel": block["dense"]["kernel"][c, : layer.n_in, : layer.n_out],
                 "bias": block["dense"]["bias"][c, : layer.n_out]}
            if layer.norm:
                w["scale"], w["offset"] = block["norm"]["scale"][c, : layer.n_out], block["norm"]["bias"][c, : layer.n_out]
            layers.append(w)
        head = {"kernel": params_P["head"]["kernel"][c, :width], "bias": params_P["head"]["bias"][c]}
        out.append({"layers": layers, "head": head})
    return out


@functools.partial(jax.jit, static_argnames="plan")
def from_plan(plan: _Plan, exact: list[dict], params_P):
    """``params_P`` with the plan's members' real-size weights replaced by ``exact`` (`to_plan`'s layout)."""
    params_P = jax.tree.map(lambda a: a, params_P)  # a fresh dict tree to write into
    for c, chain, width, w in zip(plan.members, plan.chains, plan.widths, exact, strict=True):
        for layer, lw in zip(chain, w["layers"], strict=True):
            block = params_P["stages"][layer.where[0]][layer.where[1]]
            block["dense"]["kernel"] = block["dense"]["kernel"].at[c, : layer.n_in, : layer.n_out].set(lw["kernel"])
            block["dense"]["bias"] = block["dense"]["bias"].at[c, : layer.n_out].set(lw["bias"])
            if layer.norm:
                block["norm"]["scale"] = block["norm"]["scale"].at[c, : layer.n_out].set(lw["scale"])
                block["norm"]["bias"] = block["norm"]["bias"].at[c, : layer.n_out].set(lw["offset"])
        head = params_P["head"]
        head["kernel"] = head["kernel"].at[c, :width].set(w["head"]["kernel"])
        head["bias"] = head["bias"].at[c].set(w["head"]["bias"])
    return params_P


# ---------------------------------------------------------------------------------------------- programs
def _forward_one(chain: tuple[_Layer, ...], rate: float, max_width: int, w: dict, x, dropout_key=None):
    """Logits [B, classes] of one candidate at its real sizes (its own ops only: no masks, no switch)."""
    h = x.reshape(x.shape[0], -1)
    for layer, lw in zip(chain, w["layers"], strict=True):
        z = h @ lw["kernel"] + lw["bias"]
        if layer.norm:  # flax's LayerNorm (use_fast_variance=False), as the masked supernet's
            centred = z - z.mean(-1, keepdims=True)
            var = (centred * centred).mean(-1, keepdims=True)
            z = centred * jax.lax.rsqrt(var + NORM_EPSILON) * lw["scale"] + lw["offset"]
        a = ACTIVATION_FNS[layer.act](z)
        h = h + a if layer.skip else a
    if dropout_key is not None:
        # Drawn at the largest width and cut, as the masked supernet draws it: the same mask.
        keep = jax.random.uniform(dropout_key, (h.shape[0], max_width))[:, : h.shape[1]] >= rate
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h @ w["head"]["kernel"] + w["head"]["bias"]


@functools.partial(jax.jit, static_argnames=("plan", "optimizer", "shift"))
def _epoch(plan: _Plan, optimizer, exact, opt_states, keys, failed, running, x, y, index, shift=0):
    """One epoch of the plan's members over batches ``index`` [n_batches, B].

    ``exact`` / ``opt_states``: lists over the members; ``keys``, ``failed``, ``running`` [n_members]. Returns
    (exact, opt_states, keys, failed) and the per-step losses [n_batches, n_members].
    """

    def loss_fn(exact, xbs, yb, dropout_keys):
        losses = jnp.stack([
            optax.softmax_cross_entropy_with_integer_labels(
                _forward_one(chain, rate, plan.max_width, w, xb, key), yb).mean()
            for chain, rate, w, xb, key in zip(plan.chains, plan.rates, exact, xbs, dropout_keys, strict=True)
        ])
        # A sum of independent candidates' losses: each one's gradient is its own loss's.
        return losses.sum(), losses

    def step(carry, rows):
        exact, opt_states, keys, failed = carry
        xb = x[rows]
        if shift:  # each candidate's own translations, from its own key (as train_population draws them)
            split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
            keys, dropout_keys = split[:, 0], split[:, 1]
            xbs = [_shifted(k, xb, shift) for k in split[:, 2]]
        else:
            split = jax.vmap(jax.random.split)(keys)
            keys, dropout_keys = split[:, 0], split[:, 1]
            xbs = [xb] * len(plan.members)
        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(exact, xbs, y[rows], list(dropout_keys))
        new_exact, new_states = [], []
        for i, (w, g, state) in enumerate(zip(exact, grads, opt_states, strict=True)):
            updates, new_state = optimizer.update(g, state, w)
            # Non-finite gradients give non-finite updates (and a finite weight plus a finite update stays finite).
            finite = jnp.isfinite(losses[i]) & _all_finite(updates)
            take = running[i] & ~failed[i] & finite
            failed = failed.at[i].set(failed[i] | (running[i] & ~finite))
            # A frozen candidate's update is zero, inside the optimiser's own elementwise pass (no extra copy of
            # the weights); its optimiser state runs on but is never used again (frozen candidates stay frozen).
            new_exact.append(jax.tree.map(lambda p, u, take=take: p + jnp.where(take, u, 0).astype(p.dtype), w, updates))
            new_states.append(new_state)
        return (new_exact, new_states, keys, failed), losses

    return jax.lax.scan(step, (exact, opt_states, keys, failed), index)


@functools.partial(jax.jit, static_argnames="plan")
def _evaluate(plan: _Plan, exact, xb, yb, weight):
    """Summed loss and correct predictions [n_members] over padded batches xb [n, B, ...] (weight [n, B])."""

    def batch(totals, data):
        x, y, w = data
        logits = jnp.stack([_forward_one(chain, rate, plan.max_width, p, x)
                            for chain, rate, p in zip(plan.chains, plan.rates, exact, strict=True)])
        loss = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, y))(logits)
        correct = jnp.argmax(logits, -1) == y
        return (totals[0] + (loss * w).sum(-1), totals[1] + (correct * w).sum(-1)), None

    zeros = jnp.zeros(len(plan.members), jnp.float32)
    (loss, correct), _ = jax.lax.scan(batch, (zeros, zeros), (xb, yb, weight))
    return loss, correct


def evaluate_plans(plans: list[_Plan], exact: list[list[dict]], x, y, batch_size: int = 256) -> dict[str, np.ndarray]:
    """{"loss", "accuracy"} [P] of the plans' members (weights ``exact``, one list per plan) on (x, y)."""
    xb, weight = _batched(jnp.asarray(x), batch_size)
    yb, _ = _batched(jnp.asarray(y, jnp.int32), batch_size)
    sums = [_evaluate(plan, w, xb, yb, weight) for plan, w in zip(plans, exact, strict=True)]
    n = jnp.shape(y)[0]
    return {"loss": np.concatenate([to_host(s[0]) for s in sums]) / n,
            "accuracy": np.concatenate([to_host(s[1]) for s in sums]) / n}


def supports(apply_or_model) -> bool:
    """Whether `train_population_exact` trains this family: an `MLPSupernet` (or its bound ``apply``)."""
    return isinstance(getattr(apply_or_model, "__self__", apply_or_model), MLPSupernet)


def train_population_exact(
    supernet: MLPSupernet,
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
    """`jaxnas.population.train_population` for MLP candidates at their exact sizes (see the module docstring).

    Arguments as there, with the supernet itself instead of its ``apply``. ``opt_state`` must be None (the
    optimiser starts fresh; the result's ``opt_state`` is None).
    """
    if not isinstance(supernet, MLPSupernet):
        raise TypeError(
            f"train_population_exact trains MLPSupernet populations, got {type(supernet).__name__}; use "
            "jaxnas.population.train_population(supernet.apply, ...) for other families"
        )
    if opt_state is not None:
        raise ValueError(
            "train_population_exact starts every optimiser state fresh and cannot take opt_state; to resume an "
            "optimiser state use jaxnas.population.train_population(supernet.apply, ..., opt_state=...)"
        )
    if shift < 0 or (shift and jnp.ndim(train_x) != 4):
        raise ValueError(f"shift must be >= 0 pixels and needs images [N, H, W, C]; got shift={shift} for inputs "
                         f"of shape {jnp.shape(train_x)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 epoch (or None to never stop early), got {patience}")
    encs = np.asarray(encs, np.int32)
    _check_population(jnp.asarray(encs), params_P)
    population = len(encs)
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} examples but train_y {train_y.shape[0]} labels")
    keys = candidate_keys(jax.random.key(seed), population) if keys is None else keys
    if keys.shape != (population,):
        raise ValueError(f"keys must be [P] = [{population}] PRNG keys (one per candidate), got shape {keys.shape}")

    plans = plans_for(supernet, encs)
    exact = [to_plan(plan, params_P) for plan in plans]
    opt_states = [[optimizer.init(w) for w in ws] for ws in exact]
    keys = [keys[jnp.asarray(plan.members)] for plan in plans]
    failed = [jnp.zeros(len(plan.members), bool) for plan in plans]

    def run_epoch(epoch, running):
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        losses = []
        for i, plan in enumerate(plans):
            members = np.asarray(plan.members)
            (exact[i], opt_states[i], keys[i], failed[i]), loss = _epoch(
                plan, optimizer, exact[i], opt_states[i], keys[i], failed[i], jnp.asarray(running[members]),
                train_x, train_y, index, shift,
            )
            losses.append(to_host(loss).mean(0))
        accuracy = evaluate_plans(plans, exact, val_x, val_y, eval_batch_size)["accuracy"]
        return accuracy, np.concatenate(losses), np.concatenate([to_host(f) for f in failed])

    outcome = run_epochs(population, epochs, patience, run_epoch)
    params = params_P
    for plan, w in zip(plans, exact, strict=True):
        params = from_plan(plan, w, params)
    return PopulationResult(params=params, opt_state=None, **outcome)
