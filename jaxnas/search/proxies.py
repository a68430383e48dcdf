"""Zero-cost proxies: scores of an untrained network from one minibatch, for ranking architectures without training.

    grad_norm(apply, params, encs, x, y)   L2 norm of the gradient of the batch cross-entropy w.r.t. every weight
    snip(apply, params, encs, x, y)        sum over weights of |w * dL/dw| (SNIP's connection sensitivity)
    synflow(apply, params, encs, x)        sum over weights of |w * dR/dw|, R = sum of the logits of the network
                                           with |w| on one all-ones input (SynFlow; no data, no labels)
    naswot(kernel, params, encs, x)        log det of the kernel of the batch's binary activation codes (NASWOT)

They follow "Zero-Cost Proxies for Lightweight NAS" (Abdelfattah et al., 2021) and NASWOT (Mellor et al., 2021):
the network at initialisation, one batch. grad_norm, snip and naswot use BatchNorm on the batch's statistics
(training mode; dropout of grad_norm / snip drawn from one fixed key). synflow runs BatchNorm in inference mode
at its initial statistics (mean 0, variance 1: the identity up to epsilon), as the reference implementation
removes BatchNorm for it (batch statistics of an all-ones input would zero every normalised layer). ``apply`` is a
population model's ``apply(params, enc, x, *, train, key)`` and ``params`` one set of (shared) initial weights;
every candidate of ``encs`` [P, n_choices] is scored in one vmapped program. A masked supernet gives each
candidate exactly its own subnet's gradient (masked weights take no part in the loss and get zero gradient), and
records activation codes only for the candidate's own units (`jaxnas.supernet.codes`), so every score is the
candidate's own. How well each ranks is measured, not assumed: ``benchmarks/ranking.py`` prints their Kendall tau
next to the one-shot scores'. `score_model` computes any of them for a search model (`jaxnas.search.models`).

synflow is computed in float32: an overflow (a very deep network) gives inf, which ranks with the largest.
naswot is not available for the transformer space (its supernet does not record activation codes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

PROXIES = ("grad_norm", "snip", "synflow", "naswot")
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


@functools.partial(jax.jit, static_argnames=("apply",))
def synflow(apply, params, encs, x, bn_stats=None) -> jax.Array:
    """[P] float: sum over all weights of |w x dR/dw| with every weight replaced by its absolute value and R the
    sum of the logits on one all-ones input shaped like a row of ``x``; ``bn_stats``: the BatchNorm statistics to
    evaluate with (`identity_bn_stats`), None for models without BatchNorm."""
    ones = jnp.ones((1, *x.shape[1:]), jnp.float32)
    linear = jax.tree.map(jnp.abs, params)
    extra = {} if bn_stats is None else {"bn_stats": bn_stats}

    def one(enc):
        grads = jax.grad(lambda p: jnp.sum(apply(p, enc, ones, train=False, key=None, **extra)))(linear)
        return sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(jax.tree.leaves(linear), jax.tree.leaves(grads)))

    return jax.vmap(one)(jnp.asarray(encs, jnp.int32))


@functools.partial(jax.jit, static_argnames=("kernel",))
def _naswot_kernels(kernel, params, encs, x) -> jax.Array:
    return jax.vmap(lambda enc: kernel(params, enc, x))(jnp.asarray(encs, jnp.int32))


def naswot(kernel, params, encs, x) -> np.ndarray:
    """[P] float64: log |det K| of NASWOT's kernel ``kernel(params, enc, x)`` [B, B] per candidate, -inf when K is
    singular (e.g. two inputs share every code). The determinant is taken on the host in float64: K holds
    integer counts, and float32 turns an exactly singular K into a finite value."""
    kernels = np.asarray(_naswot_kernels(kernel, params, encs, x), np.float64)
    sign, logdet = np.linalg.slogdet(kernels)
    return np.where(sign > 0, logdet, -np.inf)


def identity_bn_stats(model, params, x):
    """BatchNorm statistics of ``model`` with every mean 0 and variance 1 (synflow's "no BatchNorm"), or None
    when the model has none."""
    if not model.uses_batchnorm:
        return None
    enc = jnp.zeros((1, len(model.space.names)), jnp.int32)
    shapes = jax.eval_shape(lambda: model.statistics(params, enc, jnp.asarray(x)[None, :1], shared=True))

    def fill(path, leaf):
        value = 0.0 if path[-1].key == "mean" else 1.0
        return jnp.full(leaf.shape[1:], value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def score(name: str, apply, params, encs, x, y, chunk: int = 8, *, bn_stats=None, kernel=None) -> np.ndarray:
    """[P] float64: the proxy ``name`` (one of `PROXIES`) of every row of ``encs``, ``chunk`` candidates per
    vmapped call.

    ``bn_stats`` is synflow's (`identity_bn_stats`); ``kernel`` the model's ``activation_kernel``, needed by naswot.
    """
    if name not in PROXIES:
        raise ValueError(f"unknown zero-cost proxy {name!r}; expected one of {', '.join(PROXIES)}")
    if name == "naswot" and kernel is None:
        raise ValueError("naswot needs the model's activation codes: pass kernel=model.activation_kernel")
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    fn = {
        "grad_norm": functools.partial(grad_norm, apply, params, x=x, y=y),
        "snip": functools.partial(snip, apply, params, x=x, y=y),
        "synflow": functools.partial(synflow, apply, params, x=x, bn_stats=bn_stats),
        "naswot": functools.partial(naswot, kernel, params, x=x),
    }[name]
    encs = np.asarray(encs, np.int32)
    n = len(encs)
    padded = np.concatenate([encs, np.repeat(encs[:1], -n % chunk, axis=0)])  # one compiled shape for every call
    parts = [np.asarray(fn(encs=padded[i : i + chunk]), np.float64) for i in range(0, len(padded), chunk)]
    return np.concatenate(parts)[:n]


def score_model(name: str, model, params, encs, x, y, chunk: int = 8) -> np.ndarray:
    """`score` for a search model (`jaxnas.search.models`): its apply, its identity BatchNorm statistics for
    synflow, its activation codes for naswot (a clear error for a model without them)."""
    if name == "naswot" and not getattr(model, "has_activation_kernel", False):
        raise ValueError(
            f"naswot is not available for the {model.space.name} space: its supernet does not record activation "
            "codes. Use the zero-cost proxy grad_norm, snip or synflow"
        )
    extra = {}
    if name == "synflow":
        extra["bn_stats"] = identity_bn_stats(model, params, x)
    if name == "naswot":
        extra["kernel"] = model.activation_kernel
    return score(name, model.apply, params, encs, x, y, chunk, **extra)
