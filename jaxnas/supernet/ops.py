"""Convolutions for supernets, in two formulations that compute the same function.

Both take NHWC inputs and HWIO kernels with an odd size K, pad (K - 1) // 2 on every side and give an output of
``ceil(H / stride) x ceil(W / stride)``. Symmetric padding (not lax's "SAME", which pads stride-2 convolutions
asymmetrically) makes a K x K kernel whose outer ring is zero compute exactly the centred k x k convolution, so a
masked elastic kernel and the twin's cropped kernel agree at every output position.

- ``"slices"``: K * K shifted (strided) slices of the padded input concatenated on the channel axis, then one
  matmul. Under `jax.vmap` over per-candidate kernels this becomes a batched matmul; XLA:CPU runs a vmapped
  `lax.conv_general_dilated` as a dense grouped convolution instead (about P times the work).
- ``"lax"``: `lax.conv_general_dilated`, the fastest form on GPU / TPU.

A 1 x 1 kernel is a (strided) matmul in both: XLA:CPU runs the weight gradient of a 1 x 1 `lax` convolution as a
convolution over transposed copies of its inputs, slower (docs/benchmarks.md has the measurements behind this
module).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FORMULATIONS = ("slices", "lax")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _check(kernel: jax.Array, formulation: str) -> int:
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2 == 0:
        raise ValueError(f"kernels must be square with an odd size (centred padding), got shape {kernel.shape}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    return k


def _taps(x: jax.Array, k: int, stride: int, padded: bool = False) -> list[jax.Array]:
    """The k * k shifted views [B, ceil(H / stride), ceil(W / stride), C] of x [B, H, W, C], row-major in (i, j)
    (``padded``: x is already padded by (k - 1) // 2 on every side)."""
    p = (k - 1) // 2
    xp = x if padded or not p else jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = (x.shape[1] - 2 * p, x.shape[2] - 2 * p) if padded else x.shape[1:3]
    ho, wo = -(-h // stride), -(-w // stride)
    return [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(k)
        for j in range(k)
    ]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, formulation: str = "slices") -> jax.Array:
    """[B, ceil(H / stride), ceil(W / stride), Co]: x [B, H, W, Ci] convolved with kernel [K, K, Ci, Co] (no bias)."""
    k = _check(kernel, formulation)
    if formulation == "lax" and k > 1:
        p = (k - 1) // 2
        padding = [(p, p), (p, p)]
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS)
    patches = jnp.concatenate(_taps(x, k, stride), axis=-1) if k > 1 else _taps(x, 1, stride)[0]
    # Tap (i, j), channel c sits at column (i * K + j) * Ci + c: the row-major flattening of the HWIO kernel.
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, formulation: str = "slices") -> jax.Array:
    """[B, ceil(H / stride), ceil(W / stride), C]: each channel of x [B, H, W, C] with its own kernel [K, K, 1, C]."""
    k = _check(kernel, formulation)
    if formulation == "lax":
        p = (k - 1) // 2
        padding, groups = [(p, p), (p, p)], x.shape[-1]
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS, feature_group_count=groups
        )
    return _depthwise_slices(x, kernel, stride)


def _depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    k = kernel.shape[0]
    weights = kernel.reshape(k * k, -1)
    return sum(tap * weights[t] for t, tap in enumerate(_taps(x, k, stride)))


# The slices formulation's gradient by hand. Autodiff of the K * K shifted multiply-adds gives, for the kernel,
# K * K separate reductions over the whole batch, each streaming the input and the output gradient from memory
# once it outgrows the cache (many times the forward's cost), and for the input K * K padded copies of the output
# gradient. Here the kernel's gradient runs over chunks of DEPTHWISE_CHUNK examples in a `lax.scan`, all K * K
# reductions of a chunk while it is in the cache, and the input's gradient is one stride-1 depthwise correlation
# of the (spread) output gradient with the flipped kernel: the forward's cost (docs/benchmarks.md). Same values
# up to float summation order.
DEPTHWISE_CHUNK = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_slices(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return _depthwise_forward(x, kernel, stride)


def _depthwise_slices_fwd(x, kernel, stride):
    return _depthwise_forward(x, kernel, stride), (x, kernel)


def _depthwise_slices_bwd(stride, residuals, g):
    x, kernel = residuals
    k, p = kernel.shape[0], (kernel.shape[0] - 1) // 2
    (h, w), (ho, wo) = x.shape[1:3], g.shape[1:3]
    # The input's gradient: the output gradient spread back to stride 1 (stride - 1 zeros between its entries),
    # padded to [B, H + 2p, W + 2p, C] so that every input position sees all K * K taps, correlated with the
    # flipped kernel.
    spread = jax.lax.pad(g, jnp.zeros((), g.dtype), (
        (0, 0, 0), (p, h + p - stride * (ho - 1) - 1, stride - 1), (p, w + p - stride * (wo - 1) - 1, stride - 1),
        (0, 0, 0)))
    flipped = kernel[::-1, ::-1].reshape(k * k, -1)
    dx = sum(tap * flipped[t] for t, tap in enumerate(_taps(spread, k, 1, padded=True)))
    n, chunk = x.shape[0], min(DEPTHWISE_CHUNK, x.shape[0])
    pad = -n % chunk  # zero examples add nothing to the kernel's gradient
    if pad:
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * 3)
        g = jnp.pad(g, ((0, pad),) + ((0, 0),) * 3)
    xs = x.reshape(-1, chunk, *x.shape[1:])
    gs = g.reshape(-1, chunk, *g.shape[1:])

    def chunk_sum(total, xg):
        xc, gc = xg
        return total + jnp.stack([jnp.einsum("nhwc,nhwc->c", tap, gc) for tap in _taps(xc, k, stride)]), None

    total = jax.lax.scan(chunk_sum, jnp.zeros((k * k, x.shape[-1]), g.dtype), (xs, gs))[0]
    return dx, total.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_slices.defvjp(_depthwise_slices_fwd, _depthwise_slices_bwd)


def batch_norm(z: jax.Array, scale: jax.Array, bias: jax.Array, given: dict | None, epsilon: float):
    """(BatchNorm of z [B, H, W, C] over its batch and positions, the statistics used ``{"mean", "var"}``):
    ``given`` statistics, or (None) the batch's own; the order of operations of flax's BatchNorm, so twins agree
    to the last bits they can. The masked supernet and the sized backend both normalise through here."""
    if given is None:
        mean = z.mean((0, 1, 2))
        var = jnp.square(z - mean).mean((0, 1, 2))
    else:
        mean, var = given["mean"], given["var"]
    return (z - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, {"mean": mean, "var": var}
