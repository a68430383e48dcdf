"""Weight-only quantisation of a params pytree, its exact stored size, and a pickle-free file format.

Precisions (``quantize(params, precision)``):

- ``fp32``: every float leaf stored as float32.
- ``bf16``: float leaves with ``ndim >= 2`` stored as bfloat16 (round to nearest even).
  Bound: ``|w - dq| <= 2**-8 * |w|`` for every ``w`` in float32's normal range below bfloat16's largest
  finite value (about 3.39e38; larger values round to infinity).
- ``int8`` / ``int4``: float leaves with ``ndim >= 2`` (matrices, embeddings, conv kernels) stored as symmetric
  integers with one float32 scale per output channel (the last axis): ``scale[c] = max|w[..., c]| / Q`` with
  ``Q = 127`` (int8, values in [-127, 127]) or ``Q = 7`` (int4, values in [-7, 7]); ``q = round(w / scale)``;
  ``dq = q * scale``. A channel of zeros has scale 0 and dequantises to zeros.
  Bound: ``|w - dq| <= scale[c] / 2`` for every element of channel ``c``, up to the float32 rounding of the
  dequantised value (half an ulp of ``|dq|``, i.e. at most ``2**-24 * max|w[..., c]|``): ``q`` and ``dq``
  are computed in float64 from the stored float32 scale, so the integer is the exact nearest one. This holds
  when ``max|w[..., c]|`` is 0 or a normal float32 (>= 2**-126); a channel of only subnormal weights may get
  scale 0 and dequantise to zeros.
  int4 values are packed two per byte: element ``2i`` (row-major order) in the low nibble, ``2i + 1`` in the
  high nibble, each as a 4-bit two's complement; an odd count leaves the last high nibble 0.

In every precision the other leaves (biases, norm scales: ``ndim < 2``) are stored as float32, and leaves that
are not floating point (integer counters, masks) as they are. ``dequantize`` gives the same tree structure
with float32 for every float leaf.

``size_bytes`` counts the bytes of the stored arrays only: the quantised values (int4: ``ceil(n / 2)`` bytes
per leaf) plus the float32 scales, nothing for shapes, names or tree structure. ``save`` writes a safetensors
file whose tensors are exactly those arrays, so ``size_bytes(q)`` equals the size of the file's data section
(the file minus its 8-byte length prefix and JSON header). Tensor names are the leaf paths joined by ``/``
(a scale adds ``:scale``); the header's ``__metadata__`` holds the precision and the tree (nested dicts with
string keys, each leaf a list ``[kind, shape, dtype]``) as JSON, so ``load`` rebuilds it without pickle. Only trees
of nested dicts with string keys can be saved (Flax params are such trees); quantize / dequantize take any
pytree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

PRECISIONS = ("fp32", "bf16", "int8", "int4")
QMAX = {"int8": 127, "int4": 7}
FORMAT = "jaxnas.quant/1"
_SCALE_SUFFIX = ":scale"


@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
    """One stored leaf. ``kind`` is ``fp32`` / ``bf16`` / ``int8`` / ``int4`` / ``raw`` (kept as it is);
    ``data`` holds the stored values (int4: packed ``uint8``), ``scale`` the per-channel float32 scales
    (int8 / int4 only), ``shape`` / ``dtype`` the original leaf's."""

    kind: str
    data: np.ndarray
    scale: np.ndarray | None
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class QuantizedParams:
    """A quantised params tree: its structure and one ``QuantizedLeaf`` per leaf, in ``jax.tree_util`` order."""

    precision: str
    treedef: Any
    leaves: tuple[QuantizedLeaf, ...]


def pack_int4(values: np.ndarray) -> np.ndarray:
    """``[ceil(n / 2)] uint8``: integers in [-8, 7] (any shape, row-major order) packed two per byte."""
    # ml_dtypes.int4 and jax's int4 still use one byte per value in host memory, so the packing is by hand.
    nibbles = (np.asarray(values).reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """``[count] int8``: the first ``count`` values of ``pack_int4``'s bytes."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count]
    return ((nibbles.astype(np.int8) ^ 8) - 8).astype(np.int8)  # 4-bit two's complement -> int8


def _channel_scales(w: np.ndarray, qmax: int) -> np.ndarray:
    return (np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) / qmax).astype(np.float32)


def _quantize_leaf(leaf, precision: str, where: str) -> QuantizedLeaf:
    w = np.asarray(leaf)
    shape, dtype = tuple(int(d) for d in w.shape), str(w.dtype)
    if not np.issubdtype(w.dtype, np.floating) and w.dtype != ml_dtypes.bfloat16:
        return QuantizedLeaf("raw", w, None, shape, dtype)
    w = w.astype(np.float32)
    if precision == "fp32" or w.ndim < 2 or w.size == 0:
        return QuantizedLeaf("fp32", w, None, shape, dtype)
    if precision == "bf16":
        return QuantizedLeaf("bf16", w.astype(ml_dtypes.bfloat16), None, shape, dtype)
    if not np.isfinite(w).all():
        # One inf or NaN makes its channel's scale inf / NaN and every other weight of the channel 0 or NaN.
        raise ValueError(f"quantize: params{where} {shape} holds {np.size(w) - np.isfinite(w).sum()} non-finite values")
    qmax = QMAX[precision]
    scale = _channel_scales(w, qmax)
    scale64 = scale.astype(np.float64)
    # float64 division: the rounding picks the truly nearest integer of the stored scale.
    q = np.rint(w.astype(np.float64) / np.where(scale64 > 0, scale64, 1.0))
    q = np.clip(q, -qmax, qmax).astype(np.int8)
    data = pack_int4(q) if precision == "int4" else q
    return QuantizedLeaf(precision, data, scale, shape, dtype)


def quantize(params, precision: str) -> QuantizedParams:
    """``params`` (any pytree of arrays) stored at ``precision`` (see the module docstring for the rules)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; expected one of {', '.join(PRECISIONS)}")
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = (_quantize_leaf(leaf, precision, jax.tree_util.keystr(path)) for path, leaf in with_paths)
    return QuantizedParams(precision, treedef, tuple(leaves))


def _dequantize_leaf(leaf: QuantizedLeaf) -> np.ndarray:
    if leaf.kind == "raw":
        return leaf.data
    if leaf.kind in ("fp32", "bf16"):
        return np.asarray(leaf.data, np.float32).reshape(leaf.shape)
    values = unpack_int4(leaf.data, math.prod(leaf.shape)) if leaf.kind == "int4" else leaf.data
    values = values.reshape(leaf.shape).astype(np.float64)
    return (values * leaf.scale.astype(np.float64)).astype(np.float32)


def dequantize(q: QuantizedParams):
    """The params tree of ``q``: same structure, float leaves as ``float32`` numpy arrays."""
    return jax.tree_util.tree_unflatten(q.treedef, [_dequantize_leaf(leaf) for leaf in q.leaves])


def size_bytes(params_or_q) -> int:
    """Bytes of the stored arrays: quantised values plus scales for a ``QuantizedParams``; every leaf's
    ``nbytes`` as it is for a params tree. Shapes, names and tree structure are not counted."""
    if isinstance(params_or_q, QuantizedParams):
        leaves = params_or_q.leaves
        return sum(leaf.data.nbytes + (leaf.scale.nbytes if leaf.scale is not None else 0) for leaf in leaves)
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(params_or_q))


def stored_bytes(params_or_shapes, precision: str) -> int:
    """``size_bytes(quantize(params, precision))`` from the leaves' shapes and dtypes alone (arrays or
    ``jax.ShapeDtypeStruct``): what a candidate's weights would take at ``precision`` before it has any."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; expected one of {', '.join(PRECISIONS)}")
    total = 0
    for leaf in jax.tree_util.tree_leaves(params_or_shapes):
        shape, dtype = tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)
        n = math.prod(shape)
        if not np.issubdtype(dtype, np.floating) and dtype != ml_dtypes.bfloat16:
            total += n * dtype.itemsize
        elif precision == "fp32" or len(shape) < 2 or n == 0:
            total += 4 * n
        elif precision == "bf16":
            total += 2 * n
        else:
            total += (n if precision == "int8" else (n + 1) // 2) + 4 * shape[-1]
    return total


# --- files ------------------------------------------------------------------------------------------------


def _dict_paths(q: QuantizedParams) -> list[tuple[str, ...]]:
    """The string-key path of every leaf; ``ValueError`` when the tree is not nested dicts with string keys."""
    paths = []
    placeholder = jax.tree_util.tree_unflatten(q.treedef, list(range(len(q.leaves))))
    for path, _ in jax.tree_util.tree_flatten_with_path(placeholder)[0]:
        keys = []
        for entry in path:
            key = getattr(entry, "key", None)
            if not isinstance(entry, jax.tree_util.DictKey) or not isinstance(key, str) or not key:
                raise ValueError(
                    f"save: only trees of nested dicts with non-empty string keys can be saved (Flax params are); "
                    f"the leaf at {jax.tree_util.keystr(path)} has the path entry {entry!r}."
                )
            if "/" in key or key.endswith(_SCALE_SUFFIX):
                raise ValueError(
                    f"save: key {key!r} at {jax.tree_util.keystr(path)} may not contain '/' or end in ':scale'."
                )
            keys.append(key)
        paths.append(tuple(keys))
    return paths


def _tree_json(q: QuantizedParams, paths: list[tuple[str, ...]]) -> dict:
    tree: dict = {}
    for keys, leaf in zip(paths, q.leaves):
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = [leaf.kind, list(leaf.shape), leaf.dtype]  # a list: never mistaken for a subtree
    # Empty dicts have no leaves; the placeholder tree keeps them.
    return _with_empty_dicts(jax.tree_util.tree_unflatten(q.treedef, [None] * len(q.leaves)), tree)


def _with_empty_dicts(structure, tree: dict):
    if isinstance(structure, Mapping):
        return {key: _with_empty_dicts(value, tree.get(key, {})) for key, value in structure.items()}
    return tree


def save(q: QuantizedParams, path: str | Path) -> None:
    """Write ``q`` to ``path`` as a safetensors file (see the module docstring for its layout)."""
    from safetensors.numpy import save_file

    paths = _dict_paths(q)
    tensors = {}
    for keys, leaf in zip(paths, q.leaves):
        name = "/".join(keys)
        # safetensors' numpy API has no bfloat16; the bits are stored as uint16 and the kind says how to read them.
        tensors[name] = leaf.data.view(np.uint16) if leaf.kind == "bf16" else np.ascontiguousarray(leaf.data)
        if leaf.scale is not None:
            tensors[name + _SCALE_SUFFIX] = leaf.scale
    metadata = {"format": FORMAT, "precision": q.precision, "tree": json.dumps(_tree_json(q, paths))}
    save_file(tensors, str(path), metadata=metadata)


def load(path: str | Path) -> QuantizedParams:
    """The ``QuantizedParams`` that ``save`` wrote to ``path`` (its tree as nested dicts)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a jaxnas quantised params file (its header's format is {metadata.get('format')!r}, "
                f"expected {FORMAT!r}); write one with jaxnas.quant.save."
            )
        tree = json.loads(metadata["tree"])

        def build(node, keys):
            if isinstance(node, list):
                kind, shape, dtype = node
                name = "/".join(keys)
                data = f.get_tensor(name)
                if kind != "int4":  # safetensors reads a 0-d tensor back as [1]
                    data = data.reshape(shape)
                if kind == "bf16":
                    data = data.view(ml_dtypes.bfloat16)
                scale = f.get_tensor(name + _SCALE_SUFFIX) if kind in QMAX else None
                return QuantizedLeaf(kind, data, scale, tuple(shape), dtype)
            return {key: build(value, (*keys, key)) for key, value in node.items()}

        nested = build(tree, ())
    is_leaf = lambda x: isinstance(x, QuantizedLeaf)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(nested, is_leaf=is_leaf)
    return QuantizedParams(metadata["precision"], treedef, tuple(leaves))
