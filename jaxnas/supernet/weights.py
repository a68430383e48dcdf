"""The two rules every supernet family and both population backends share about weights, defined once:

- `lecun_init`: supernet parameters from one flat random draw (LeCun-normal kernels over their fan-in, norm
  scales 1, everything else 0); one draw compiles far faster on XLA:CPU than one per layer.
- `concrete_rngs`: a twin built under `nnx.eval_shape` gets real RNG state (its weights are filled in by extract).
- `own_slices`: where a candidate's own weights sit inside a supernet leaf - the first channels / units of every
  axis, and the centred k x k taps of a K x K conv kernel (Once-for-All's elastic kernel). Extraction of a
  standalone twin and the sized backend's per-candidate weights both cut with it; the masked supernets apply the
  same rule as masks (channel < width, |tap - centre| <= (k - 1) / 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TRUNCATED_STD = 0.87962566103423978
"""Standard deviation of a unit normal truncated to [-2, 2]; dividing by it makes a kernel's variance 1 / fan_in."""


def lecun_init(key: jax.Array, shapes: dict) -> dict:
    """Arrays for the ShapeDtypeStruct tree ``shapes``: every ``kernel`` LeCun-normal over its fan-in (the product
    of all axes but the last; truncated at 2 std, as flax's default), every ``scale`` 1, everything else 0; all
    kernels cut, in tree order, from one draw."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    kernels = [leaf for path, leaf in leaves if path[-1].key == "kernel"]
    draw = jax.random.truncated_normal(key, -2.0, 2.0, (sum(k.size for k in kernels),))
    values, start = [], 0
    for path, leaf in leaves:
        name = path[-1].key
        if name == "kernel":
            chunk = draw[start : start + leaf.size].reshape(leaf.shape)
            values.append(chunk / (TRUNCATED_STD * np.sqrt(np.prod(leaf.shape[:-1]))))
            start += leaf.size
        else:
            values.append(jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def own_slices(full: tuple[int, ...], own: tuple[int | None, ...]) -> tuple[slice, ...]:
    """The slices of a supernet leaf of shape ``full`` that hold a candidate's ``own``-shaped weights (None: the
    whole axis): leading slices, and for a conv kernel [K, K, Ci, Co] the centred k x k taps."""
    own = tuple(f if o is None else o for f, o in zip(full, own, strict=True))
    starts = [(f - o) // 2 if len(full) == 4 and axis < 2 else 0 for axis, (f, o) in enumerate(zip(full, own))]
    return tuple(slice(a, a + o) for a, o in zip(starts, own, strict=True))


def concrete_rngs(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """``module`` (changed in place) with the RNG state `nnx.eval_shape` left abstract made concrete: keys from
    ``seed``, counts 0. A twin's extraction fills in its weights and statistics only; an abstract leaf
    (`jax.ShapeDtypeStruct`) left in its state sends every jitted call that takes the state through jax's Python
    dispatch path (its C++ path accepts arrays only; docs/benchmarks.md)."""
    rng = nnx.state(module, nnx.RngState)
    leaves, treedef = jax.tree.flatten(rng)
    if not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        return module
    key = jax.random.key(seed)

    def concrete(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(key, leaf.shape) if leaf.shape else key
        return jnp.zeros(leaf.shape, leaf.dtype)

    nnx.update(module, jax.tree.unflatten(treedef, [concrete(leaf) for leaf in leaves]))
    return module
