"""Gate-aware fine-tuning: teach an exported conv twin to run with whole chunks of its channels removed.

An exported network was trained at full width only; removing a quarter to a half of a gate's channels (what
`jaxnas.adaptive.policy` does per batch, in chunks of ``align`` channels) costs it far more accuracy than the
guardrail allows. :func:`finetune_for_gating` fine-tunes the twin's weights on the train split with in-place
distillation as in slimmable networks / Once-for-All: every step trains the full-width network on the labels
(cross-entropy) and, on the same batch, one randomly thinned network to match the full network's softmax (KL
divergence, the teacher's probabilities held fixed). The thinned network is `gated._forward` with every gate's
dropped channels zeroed where they are read - what the cut programs of `GatedNet` compute.

*How many* channels each gate drops: a random allowed count per gate (the policy's removal options: kept counts
on the ``align`` grid, at most ``bl`` of the gate removed, at least ``min_keep`` of it kept), or, given
``widths`` (e.g. the width tuples measured faster than full width), one of those tuples per step. *Which*
channels: uniformly random ones (``selection="random"``), or those the policy itself would drop
(``selection="evidence"``): the lowest mean |activation| x reader-weight norm on a probe of the batch's first
``probe_images`` images - the rule `ChannelGatePolicy` uses without a calibrated reference, so the network learns
to do without exactly the channels it will be denied. The random draws happen inside the jitted step from a jax
key. Only the ``nnx.Param`` leaves train: BatchNorm stays in inference mode with its running statistics
unchanged, so the fine-tuned twin has the original's gates, programs and statistics.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from interop import BudgetController
from jaxnas.adaptive.gated import GatedNet, _forward, reader_norms


SELECTIONS = ("random", "evidence")


def removal_options(width: int, *, bl: float, align: int, min_keep: float) -> list[int]:
    """Channel counts a gate of ``width`` may lose: 0 and the counts whose kept rest is on the ``align`` grid, at
    most ``floor(bl * width)`` and keeping at least ``ceil(min_keep * width)`` (the policy's `BudgetController`)."""
    return BudgetController(bl=float(bl), Bg=0.0, align=int(align), min_keep=float(min_keep)).removal_options(width)


def _check(epochs, bl, align, min_keep, learning_rate, batch_size, distill) -> None:
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))

    def integer(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, np.integer))

    checks = [
        ("epochs", epochs, integer(epochs) and epochs >= 1, "an int >= 1"),
        ("bl", bl, number(bl) and 0 <= bl <= 1, "a fraction in [0, 1] (the most of a gate removed)"),
        ("align", align, integer(align) and align >= 1, "an int >= 1 (kept counts are multiples of it)"),
        ("min_keep", min_keep, number(min_keep) and 0 < min_keep <= 1, "a fraction in (0, 1] (the least kept)"),
        ("learning_rate", learning_rate, number(learning_rate) and learning_rate > 0, "a number > 0"),
        ("batch_size", batch_size, integer(batch_size) and batch_size >= 1, "an int >= 1"),
        ("distill", distill, number(distill) and distill >= 0, "a number >= 0 (the KL term's weight)"),
    ]
    for name, value, ok, what in checks:
        if not ok:
            raise ValueError(f"finetune_for_gating: {name} must be {what}, got {value!r}")


def finetune_for_gating(net: GatedNet, images: np.ndarray, labels: np.ndarray, *, epochs: int = 5,
                        bl: float = 0.5, align: int = 8, min_keep: float = 0.5, learning_rate: float = 1e-3,
                        batch_size: int = 128, distill: float = 1.0, seed: int = 0,
                        selection: str = "random", widths: list[tuple[int, ...]] | None = None,
                        probe_images: int = 8) -> tuple[GatedNet, dict]:
    """A new `GatedNet` of ``net``'s twin fine-tuned to be gated, and a JSON-safe summary of the run.

    ``images`` ``[N, H, W, C]`` float32 and ``labels`` ``[N]`` int32 are the TRAIN split. Each step on a batch:
    ``cross_entropy(full, y) + distill * KL(stop_gradient(softmax(full)) || softmax(sub))``, ``full`` the
    full-width logits and ``sub`` those of the network with, per gate, a number of channels zeroed (a random allowed
    one, see :func:`removal_options` - a gate with no allowed removal keeps all - or that of a tuple drawn from
    ``widths``), chosen by ``selection`` (see the module docstring). Adam, batches in a
    seeded random order per epoch, the last incomplete batch dropped; only ``nnx.Param`` leaves change (BatchNorm
    statistics stay). ``net``, its twin and its state are left unchanged.

    Summary: ``epochs``, ``steps``, ``loss_first_epoch`` / ``loss_last_epoch`` (mean total loss of the steps of the
    first / last epoch), the same for the cross-entropy (``ce_*``) and KL (``kl_*``) terms, ``gates_thinned``
    (gates with an allowed removal), ``params`` (trained parameters) and ``seconds`` (wall clock, compile included).
    """
    if not isinstance(net, GatedNet):
        raise TypeError(f"finetune_for_gating: net must be a GatedNet, got {type(net).__name__}")
    _check(epochs, bl, align, min_keep, learning_rate, batch_size, distill)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"finetune_for_gating: images must be [N, H, W, C] and labels [N], got images "
                         f"{images.shape} and labels {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"finetune_for_gating: labels must be integer class indices, got dtype {labels.dtype}")
    n_batches = len(labels) // batch_size
    if n_batches == 0:
        raise ValueError(f"finetune_for_gating: {len(labels)} images do not fill one batch of batch_size="
                         f"{batch_size}; pass more images or a smaller batch_size")
    start = time.perf_counter()

    twin = nnx.merge(net._graph, net._state, copy=True)  # a copy: net's own state is never touched
    graph, params, rest = nnx.split(twin, nnx.Param, ...)
    gates = net.gates
    options = {g.name: removal_options(g.width, bl=bl, align=align, min_keep=min_keep) for g in gates}
    thinned = [g for g in gates if len(options[g.name]) > 1]
    if widths is not None:  # the width tuples to train for (e.g. those measured fast): one drawn per step
        widths = [tuple(int(v) for v in w) for w in widths]
        if not widths or any(len(w) != len(gates) or not all(1 <= k <= g.width for k, g in zip(w, gates))
                             for w in widths):
            raise ValueError(f"finetune_for_gating: widths must list width tuples of the gates "
                             f"{[g.name for g in gates]} (1..{[g.width for g in gates]} each), got {widths}")
        thinned = [g for i, g in enumerate(gates) if any(w[i] < g.width for w in widths)]
        index = {g.name: i for i, g in enumerate(gates)}
        removals = jnp.asarray([[g.width - w[index[g.name]] for g in thinned] for w in widths], jnp.int32)
    distill = float(distill)
    opt = optax.adam(learning_rate)

    if selection not in SELECTIONS:
        raise ValueError(f"finetune_for_gating: selection must be one of {list(SELECTIONS)}, got {selection!r}")

    def masks(key, evidence) -> dict[str, jax.Array]:
        """gate -> ``[C]`` 0/1: per gate a removal count ``r`` (a random allowed one, or the drawn tuple's), the
        ``r`` channels of lowest rank dropped - a random rank, or the rank of the batch's ``evidence``."""
        out = {}
        key, k_tuple = jax.random.split(key)
        row = None if widths is None else removals[jax.random.randint(k_tuple, (), 0, len(widths))]
        for j, (gate, k) in enumerate(zip(thinned, jax.random.split(key, max(1, len(thinned))))):
            k_count, k_rank = jax.random.split(k)
            if row is None:
                choices = jnp.asarray(options[gate.name], jnp.int32)
                r = choices[jax.random.randint(k_count, (), 0, len(choices))]
            else:
                r = row[j]
            if evidence is None:
                rank = jax.random.permutation(k_rank, gate.width)  # channel c gets rank rank[c]: a uniform subset
            else:  # the least evident first, ties to the lower index (argsort is stable), as the policy removes
                rank = jnp.argsort(jnp.argsort(evidence[gate.name]))
            out[gate.name] = (rank >= r).astype(jnp.float32)
        return out

    def loss_fn(params, x, y, key):
        model = nnx.merge(graph, params, rest)
        full = _forward(model, gates, x, {}, {})
        ce = optax.softmax_cross_entropy_with_integer_labels(full, y).mean()
        if not thinned or distill == 0.0:
            kl = jnp.zeros((), jnp.float32)
        else:
            evidence = None
            if selection == "evidence":  # the policy's uncalibrated evidence, from a probe of the batch's first
                record: dict = {}       # images: mean |activation| x the norm of the weights reading the channel
                _forward(model, gates, x[:probe_images], {}, {}, record)
                norms = reader_norms(model, gates)
                evidence = {g.name: jax.lax.stop_gradient(record[g.name] * norms[g.name]) for g in thinned}
            sub = _forward(model, gates, x, {}, masks(key, evidence))
            teacher = jax.lax.stop_gradient(jax.nn.log_softmax(full))
            kl = (jnp.exp(teacher) * (teacher - jax.nn.log_softmax(sub))).sum(-1).mean()
        return ce + distill * kl, (ce, kl)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x_all, y_all, idx, key):
        (loss, (ce, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x_all[idx], y_all[idx], key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.stack([loss, ce, kl])

    # One jitted step per batch, dispatched asynchronously (the host waits once per epoch, for the losses), not a
    # lax.scan over the epoch: XLA:CPU ran the scanned steps (a while loop) far slower than this loop of one program.
    params = jax.tree.map(jnp.copy, params)  # donated below: never the arrays the caller's twin still holds
    opt_state = opt.init(params)
    x_all, y_all = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history = []
    for e in range(epochs):
        order = rng.permutation(len(labels))[: n_batches * batch_size].reshape(n_batches, batch_size)
        keys = jax.random.split(jax.random.fold_in(key, e), n_batches)
        losses = []
        for b in range(n_batches):
            params, opt_state, values = step(params, opt_state, x_all, y_all, jnp.asarray(order[b]), keys[b])
            losses.append(values)
        history.append(np.asarray(jnp.stack(losses), np.float64).mean(0))
    if not all(np.isfinite(h).all() for h in history):
        raise FloatingPointError(f"finetune_for_gating: the loss became non-finite (per-epoch means of loss, ce, kl: "
                                 f"{[h.tolist() for h in history]}); lower learning_rate")
    tuned = GatedNet(nnx.merge(graph, params, rest, copy=True))
    first, last = history[0], history[-1]
    summary = {
        "epochs": int(epochs),
        "steps": int(epochs * n_batches),
        "loss_first_epoch": float(first[0]),
        "loss_last_epoch": float(last[0]),
        "ce_first_epoch": float(first[1]),
        "ce_last_epoch": float(last[1]),
        "kl_first_epoch": float(first[2]),
        "kl_last_epoch": float(last[2]),
        "gates_thinned": len(thinned),
        "params": int(sum(math.prod(a.shape) for a in jax.tree.leaves(params))),
        "seconds": float(time.perf_counter() - start),
    }
    return tuned, summary


__all__ = ["SELECTIONS", "finetune_for_gating", "removal_options"]
