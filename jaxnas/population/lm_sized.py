"""Language-model candidates trained at their exact sizes: the sized backend of the ``lm`` space.

The masked population (`jaxnas.population.masked.train_population` over `LMSupernet.apply`) computes every candidate
at the space's largest width and depth with every token mixer (``lax.switch`` under ``vmap`` is a select), so on a
CPU most of its work is padding (docs/benchmarks.md). Here each candidate's standalone twin (`LMSupernet.extract`:
its own widths, layers and mixer only) trains on its own, one compiled epoch per twin layout (``lax.scan`` over the
batches; twins of one layout share it), and the trained weights are written back into the candidate's supernet
layout (`LMSupernet.embed`). The masked program's gradient is exactly zero outside a candidate's slices, so Adam
leaves those weights as they were and both backends train the same numbers up to float summation order (tested).

Same batches (``epoch_indices``), optimiser, early stopping (``run_epochs`` on the validation loss), failure rule
(a non-finite loss, gradient or update freezes the candidate at its last finite weights) as the masked trainer.
No dropout (the supernet's dropout must be 0) and no optimiser state to resume from (the result's is None).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnas.data.batching import epoch_indices
from jaxnas.population.common import PopulationResult, all_finite, batched, check_training, per_example, run_epochs


def supports(model) -> bool:
    """Whether ``model`` (an `LMSupernet` or a search model around one) can train here: no dropout."""
    supernet = getattr(model, "supernet", model)
    return type(supernet).__name__ == "LMSupernet" and supernet.dropout == 0.0


def train_lm_sized(
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
    keys=None,
    opt_state=None,
    eval_batch_size: int = 256,
    shift: int = 0,
    monitor: str = "loss",
) -> PopulationResult:
    """`jaxnas.population.masked.train_population` for language models with every candidate at its exact sizes.

    Arguments as there, with the model (an `LMSupernet`, or `jaxnas.search.models.LMModel`) instead of its apply;
    ``params_P`` in its layout. The history is the negated validation loss (``monitor="loss"``, the only one).
    """
    supernet = getattr(model, "supernet", model)
    if not supports(model):
        raise TypeError(f"train_lm_sized trains LMSupernet candidates without dropout, got {type(supernet).__name__}"
                        f"{' with dropout' if hasattr(supernet, 'dropout') else ''}; use train_population")
    if opt_state is not None or shift or monitor != "loss":
        raise ValueError("train_lm_sized starts every optimiser state fresh, takes no shift and monitors the "
                         "validation loss; use jaxnas.population.train_population for the rest")
    encs = np.asarray(encs, np.int32)
    train_x, train_y, _ = check_training(jnp.asarray(encs), params_P, train_x, train_y, epochs, patience, 0, keys,
                                         seed)
    population = len(encs)
    host = [jax.tree.map(lambda a, p=p: a[p], params_P) for p in range(population)]
    twins = []  # per candidate: [graph, params, opt_state, failed]
    for p in range(population):
        _, twin = supernet.extract(host[p], encs[p])
        graph, params = nnx.split(twin, nnx.Param)
        twins.append([graph, params, optimizer.init(params), jnp.zeros((), bool)])
    val = batched(jnp.asarray(val_x), eval_batch_size), batched(jnp.asarray(val_y, jnp.int32), eval_batch_size)

    scores = np.full(population, -np.inf)  # a stopped candidate's weights no longer change: nor does its score

    def run_epoch(epoch, running):
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        losses, failed = np.full(population, np.nan), np.zeros(population, bool)
        for p, state in enumerate(twins):
            graph, params, opt, was_failed = state
            if running[p]:
                params, opt, was_failed, step_losses = _epoch(graph, optimizer, params, opt, was_failed, train_x,
                                                              train_y, index)
                twins[p] = [graph, params, opt, was_failed]
                losses[p] = float(jnp.mean(step_losses))
                scores[p] = -float(_nll_sum(graph, params, val[0][0], val[1][0], val[0][1])) / int(val_x.shape[0])
            failed[p] = bool(was_failed)
        return scores.copy(), losses, failed

    outcome = run_epochs(population, epochs, patience, run_epoch)
    trained = [supernet.embed(host[p], encs[p], twins[p][1].to_pure_dict()) for p in range(population)]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trained)
    return PopulationResult(params=params, opt_state=None, **outcome)


@functools.partial(jax.jit, static_argnames=("graph", "optimizer"))
def _epoch(graph, optimizer, params, opt_state, failed, x, y, index):
    """One epoch of one twin over the batches ``index`` [n_batches, B]: (params, opt_state, failed, losses)."""

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graph, params)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def step(carry, rows):
        params, opt_state, failed = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x[rows], y[rows])
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        take = ~failed & jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params)
        failed = failed | ~take

        def keep(new, old):
            return jnp.where(take, new, old)

        return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), failed), loss

    (params, opt_state, failed), losses = jax.lax.scan(step, (params, opt_state, failed), index)
    return params, opt_state, failed, losses


def twin_nll_sum(twin, xb, yb, weight) -> jax.Array:
    """Summed per-window mean NLL of a `TwinLM` over batches xb, yb [n, B, T] (padding weighted out by weight
    [n, B]); one compiled program per twin layout."""
    graph, params = nnx.split(twin, nnx.Param)
    return _nll_sum(graph, params, xb, yb, weight)


@functools.partial(jax.jit, static_argnames="graph")
def _nll_sum(graph, params, xb, yb, weight):
    def batch(total, data):
        x, y, w = data
        nll = optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graph, params)(x), y)
        return total + jnp.sum(per_example(nll) * w), None

    return jax.lax.scan(batch, jnp.zeros((), jnp.float32), (xb, yb, weight))[0]
