"""Small helpers over the Python array API, shared by the interop modules.

Every function here works on numpy, jax and torch arrays alike through ``array_api_compat`` and never
imports jax or torch: the framework-specific branches test the array's type via ``array_api_compat``,
which only looks at modules the caller has already imported.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

Array = Any
Namespace = Any


def namespace(*arrays: Array) -> Namespace:
    """The array-API namespace shared by ``arrays`` (a clear error if they mix frameworks)."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays})
        raise TypeError(
            f"expected arrays of one framework (numpy, jax or torch), got {', '.join(kinds)}; "
            "convert them to one kind before calling"
        ) from err


def namespace_of_module(module: Namespace) -> Namespace:
    """The array-API namespace for a module such as ``numpy``, ``torch`` or ``jax.numpy``.

    ``torch`` and ``numpy`` are not fully array-API compliant themselves; this returns the compatible
    wrapper ``array_api_compat`` provides for them (and ``jax.numpy`` as it is).
    """
    return array_api_compat.array_namespace(module.zeros(0))


def device_of(x: Array) -> Any:
    """The device ``x`` lives on (``None`` for a traced jax value, which has no device yet)."""
    try:
        return array_api_compat.device(x)
    except (AttributeError, ValueError, TypeError):
        return None


def float_dtype(xp: Namespace, x: Array) -> Any:
    """``x.dtype`` if it is a real floating dtype, else the namespace's default floating dtype."""
    if xp.isdtype(x.dtype, "real floating"):
        return x.dtype
    return xp.__array_namespace_info__().default_dtypes(device=device_of(x))["real floating"]


def constant(value: np.ndarray, like: Array) -> Array:
    """``value`` (a host numpy array) as an array of ``like``'s kind, device and dtype."""
    return namespace(like).asarray(value, dtype=like.dtype, device=device_of(like))


def l2_normalize(xp: Namespace, y: Array, axis: int = -1) -> Array:
    """``y / ||y||`` along ``axis``; zero vectors stay zero (no NaN)."""
    norm = xp.linalg.vector_norm(y, axis=axis, keepdims=True)
    return y / xp.where(norm > 0, norm, xp.ones_like(norm))


def detached(x: Array) -> Array:
    """``x`` without an autograd history (torch); other arrays are returned as they are.

    Stored evidence must not keep a computation graph alive nor make a bank require gradients.
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    return x


def set_index(bank: Array, index: int, value: Array) -> Array:
    """``bank`` with ``bank[index] = value``: in place when the array is writeable, else a new array (jax)."""
    if array_api_compat.is_writeable_array(bank):
        bank[index] = value
        return bank
    return bank.at[index].set(value)


def to_numpy(x: Array) -> np.ndarray:
    """A host numpy copy of ``x`` — only for files and small bookkeeping, never for the computation."""
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
