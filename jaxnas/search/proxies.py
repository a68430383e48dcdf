"""Zero-cost proxies: scores of an untrained network from one minibatch, for ranking architectures without training.

    grad_norm(apply, params, encs, x, y)   L2 norm of the gradient of the batch cross-entropy w.r.t. every weight
    snip(apply, params, encs, x, y)        sum over weights of |w * dL/dw| (SNIP's connection sensitivity)

Both follow "Zero-Cost Proxies for Lightweight NAS" (Abdelfattah et al., 2021): the network at initialisation,
BatchNorm on the batch's statistics (training mode, dropout drawn from one fixed key), one batch. ``apply`` is a population model's
``apply(params, enc, x, *, train, key)`` and ``params`` one set of (shared) initial weights; every candidate of
``encs`` [P, n_choices] is scored in one vmapped program. A masked supernet gives each candidate exactly its own
subnet's gradient (masked weights take no part in the loss and get zero gradient), so the score is the candidate's
own. How well each ranks is measured, not assumed: ``benchmarks/ranking.py`` prints their Kendall tau next to the
one-shot scores'.

Not here: synflow (its all-ones input makes every batch-statistics BatchNorm output zero) and NASWOT (it needs the
binary activation codes of every ReLU layer, which the supernets' apply does not expose).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

PROXIES = ("grad_norm", "snip")
BATCH = 64  # images in the one batch a proxy sees (benchmarks/ranking.py and search.prefilter)


def _grads(apply, params, enc, x, y):
    def loss(p):
        logits = apply(p, enc, x, train=True, key=jax.random.key(0))  # one fixed dropout draw for every candidate
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(params)


@functools.partial(jax.jit, static_argnames=("apply",))
def grad_norm(apply, params, encs, x, y) -> jax.Array:
    """[P] float: the gradient's L2 norm over all weights, per candidate of ``encs`` [P, n_choices]."""

    def one(enc):
        leaves = jax.tree.leaves(_grads(apply, params, enc, x, y))
        return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))

    return jax.vmap(one)(jnp.asarray(encs, jnp.int32))


@functools.partial(jax.jit, static_argnames=("apply",))
def snip(apply, params, encs, x, y) -> jax.Array:
    """[P] float: sum over all weights of |weight x gradient|, per candidate of ``encs`` [P, n_choices]."""

    def one(enc):
        grads = _grads(apply, params, enc, x, y)
        return sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)))

    return jax.vmap(one)(jnp.asarray(encs, jnp.int32))


def score(name: str, apply, params, encs, x, y, chunk: int = 8) -> jax.Array:
    """The proxy ``name`` (one of `PROXIES`) of every row of ``encs``, ``chunk`` candidates per vmapped call."""
    if name not in PROXIES:
        raise ValueError(f"unknown zero-cost proxy {name!r}; expected one of {', '.join(PROXIES)}")
    fn = {"grad_norm": grad_norm, "snip": snip}[name]
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    encs = np.asarray(encs, np.int32)
    n = len(encs)
    padded = np.concatenate([encs, np.repeat(encs[:1], -n % chunk, axis=0)])  # one compiled shape for every call
    parts = [fn(apply, params, padded[i : i + chunk], x, y) for i in range(0, len(padded), chunk)]
    return jnp.concatenate(parts)[:n]
