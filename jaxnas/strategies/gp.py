"""Gaussian-process regression over architecture encodings, and expected improvement: the surrogate of `bo`.

Inputs are one-hot features per choice, float32 [..., n_choices, M] (`jaxnas.strategies.base.one_hot_choices`:
an inactive choice is all zero). The kernel has one length scale l_i per choice (ARD)::

    k(a, b) = s2 * exp(-sum_i d_i(a, b) / l_i),    d_i = |h_i(a) - h_i(b)|^2 / 2

so d_i is 0 for the same option (or both inactive), 1 for different options and 1/2 for a choice active on one
side only: an exponentiated Hamming distance, which is an RBF kernel on the one-hot features, hence positive
definite. Observations are y = f(x) + e, e ~ N(0, noise), with prior mean 0 (callers standardise y).

Shapes are fixed: the C training rows come with a mask. A masked row becomes a unit-variance row with target 0,
uncorrelated with every other (zero kernel row and column), which changes neither the posterior nor the marginal
likelihood of the real rows; so an archive of capacity C is solved as one [C, C] system whatever it holds.

Hyper-parameters (`GPParams`: log length scales, log signal and noise variances) maximise the marginal
likelihood by `fit`: Adam steps on the log-parameters, each followed by a projection into `BOUNDS`. The gradient
goes through K by the closed form dNLL/dK = (K^-1 - alpha alpha^T) / 2, alpha = K^-1 y: differentiating the
Cholesky factorisation itself is many times slower on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import struct

BOUNDS = {"lengthscale": (0.05, 50.0), "signal": (0.05, 10.0), "noise": (1e-3, 2.0)}
"""Ranges of the fitted hyper-parameters: length scales in units of d (mismatched choices), signal and noise
variances in units of the standardised targets. They keep K well conditioned in float32 (condition number below
about C * 10 / 1e-3) and stop the likelihood from explaining a few points by a zero length scale."""

_LOG_2PI = math.log(2 * math.pi)


@struct.dataclass
class GPParams:
    """Kernel and noise hyper-parameters, in logs so any real values are allowed.

    Attributes:
      log_lengthscale: float32 [n_choices], log l_i.
      log_signal: float32 scalar, log s2 (prior variance of f).
      log_noise: float32 scalar, log of the observation noise variance.
    """

    log_lengthscale: jax.Array
    log_signal: jax.Array
    log_noise: jax.Array


def init_params(n_choices: int, lengthscale: float = 2.0, signal: float = 1.0, noise: float = 0.1) -> GPParams:
    """`GPParams` with every length scale ``lengthscale`` and the given variances."""
    return GPParams(
        log_lengthscale=jnp.full(n_choices, math.log(lengthscale), jnp.float32),
        log_signal=jnp.asarray(math.log(signal), jnp.float32),
        log_noise=jnp.asarray(math.log(noise), jnp.float32),
    )


def project(params: GPParams) -> GPParams:
    """``params`` clipped into `BOUNDS`."""

    def clip(value, name):
        low, high = BOUNDS[name]
        return jnp.clip(value, math.log(low), math.log(high))

    return GPParams(clip(params.log_lengthscale, "lengthscale"), clip(params.log_signal, "signal"),
                    clip(params.log_noise, "noise"))


def covariance(params: GPParams, a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 [A, B]: k(a, b) for features a float [A, n_choices, M] and b [B, n_choices, M] (no noise)."""
    scale = jnp.exp(-0.5 * params.log_lengthscale)[:, None]  # 1 / sqrt(l_i): squared distances come out / l_i
    fa, fb = (a * scale).reshape(a.shape[0], -1), (b * scale).reshape(b.shape[0], -1)
    squared = jnp.sum(fa**2, -1)[:, None] + jnp.sum(fb**2, -1)[None, :] - 2.0 * fa @ fb.T
    return jnp.exp(params.log_signal - 0.5 * jnp.maximum(squared, 0.0))


def train_covariance(params: GPParams, x: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [C, C]: K + noise I over the rows of x [C, n_choices, M] where ``mask`` (bool [C]) holds; masked rows
    and columns are those of the identity."""
    k = jnp.where(mask[:, None] & mask[None, :], covariance(params, x, x), 0.0)
    return k + jnp.diag(jnp.where(mask, jnp.exp(params.log_noise), 1.0))


@jax.custom_vjp
def _half_quadratic_and_log_det(cov: jax.Array, y: jax.Array) -> jax.Array:
    """float32 scalar: y^T K^-1 y / 2 + log|K| / 2 for K = ``cov`` [C, C] (positive definite), y [C]."""
    return _half_quadratic_and_log_det_fwd(cov, y)[0]


def _half_quadratic_and_log_det_fwd(cov, y):
    chol = jnp.linalg.cholesky(cov)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    return 0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(chol))), (chol, alpha)


def _half_quadratic_and_log_det_bwd(residuals, g):
    chol, alpha = residuals
    inverse = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(chol.shape[0], dtype=chol.dtype))
    return 0.5 * g * (inverse - jnp.outer(alpha, alpha)), g * alpha


_half_quadratic_and_log_det.defvjp(_half_quadratic_and_log_det_fwd, _half_quadratic_and_log_det_bwd)


def negative_log_likelihood(params: GPParams, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 scalar: -log p(y | x, params) of the rows where ``mask`` holds (x [C, n_choices, M], y float [C])."""
    y = jnp.where(mask, y, 0.0)
    n = jnp.sum(mask)
    return _half_quadratic_and_log_det(train_covariance(params, x, mask), y) + 0.5 * n * _LOG_2PI


def fit(params: GPParams, x: jax.Array, y: jax.Array, mask: jax.Array, steps: int, learning_rate: float) -> GPParams:
    """``params`` after ``steps`` Adam steps on the negative log marginal likelihood per row, each projected into
    `BOUNDS` (x [C, n_choices, M], y float [C], mask bool [C] as in `negative_log_likelihood`)."""
    optimiser = optax.adam(learning_rate)
    count = jnp.maximum(jnp.sum(mask), 1)
    grad = jax.grad(lambda p: negative_log_likelihood(p, x, y, mask) / count)

    def step(carry, _):
        p, opt_state = carry
        updates, opt_state = optimiser.update(grad(p), opt_state, p)
        return (project(optax.apply_updates(p, updates)), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), None, length=steps)
    return params


def posterior(params: GPParams, x: jax.Array, y: jax.Array, mask: jax.Array,
              query: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean float32 [N], covariance float32 [N, N]) of the latent f at ``query`` [N, n_choices, M] given the
    training rows x [C, n_choices, M], y float [C] where ``mask`` (bool [C]) holds."""
    chol = jnp.linalg.cholesky(train_covariance(params, x, mask))
    alpha = jax.scipy.linalg.cho_solve((chol, True), jnp.where(mask, y, 0.0))
    cross = jnp.where(mask[None, :], covariance(params, query, x), 0.0)  # [N, C]
    v = jax.scipy.linalg.solve_triangular(chol, cross.T, lower=True)  # [C, N]
    return cross @ alpha, covariance(params, query, query) - v.T @ v


def log_expected_improvement(mean: jax.Array, std: jax.Array, best: jax.Array) -> jax.Array:
    """float32 [...]: log E[max(f - best, 0)] for f ~ N(mean, std^2), accurate far below ``best`` too.

    EI = std * h(z), z = (mean - best) / std, h(z) = phi(z) + z Phi(z). For z <= 0, h is written as
    phi(z) (1 - t R(t)) with t = -z and Mills' ratio R(t) = sqrt(pi / 2) erfcx(t / sqrt 2); beyond t = 20 that
    difference loses float32 precision and its asymptotic series 1/t^2 - 3/t^4 + 15/t^6 - 105/t^8 is used.
    ``std`` must be positive.
    """
    z = (mean - best) / std
    t = -z
    log_phi = -0.5 * z**2 - 0.5 * _LOG_2PI
    above = jnp.log(jnp.exp(log_phi) + z * jax.scipy.special.ndtr(z))
    tm = jnp.clip(t, 0.0, 20.0)
    mills = jnp.log1p(-tm * math.sqrt(math.pi / 2) * jax.scipy.special.erfcx(tm / math.sqrt(2)))
    ta = jnp.maximum(t, 20.0)
    asymptotic = -2.0 * jnp.log(ta) + jnp.log1p(-3 / ta**2 + 15 / ta**4 - 105 / ta**6)
    below = log_phi + jnp.where(t <= 20.0, mills, asymptotic)
    return jnp.log(std) + jnp.where(z > 0, above, below)
