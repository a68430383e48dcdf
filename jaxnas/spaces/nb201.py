"""The NAS-Bench-201 cell space: 4 nodes, 6 edges, 5 operations per edge, 5^6 = 15,625 cells.

Choices are the edges in NB201's string order (node 1 <- 0 | node 2 <- 0, 1 | node 3 <- 0, 1, 2), named
``"1<-0"`` ... ``"3<-2"``; every edge is always active, so cells that compute the same function (e.g. with
a disconnected path) stay distinct, exactly as NAS-Bench-201 counts them. The canonical string is NB201's
architecture string, e.g. ``|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.core import Choice, Space

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
"""Operation of each option index, in NAS-Bench-201's own order (its ``SearchSpaceNames['nas-bench-201']``)."""

EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
"""(to node, from node) of each choice, in NB201 string order."""

ANALOG_OPS = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")
"""Operation of each op code in the ``analog-nasbench`` package's 6-tuples (checked by hand;
tests/test_tables.py rebuilds the shipped table with it)."""

ANALOG_POSITIONS = (0, 1, 3, 2, 4, 5)
"""Tuple position of each of our edges: the tuples list edges as (0->1, 0->2, 0->3, 1->2, 1->3, 2->3)."""

_ANALOG_TO_OP = np.array([OPS.index(op) for op in ANALOG_OPS], np.int32)
_OP_TO_ANALOG = np.array([ANALOG_OPS.index(op) for op in OPS], np.int32)
_TUPLE_TO_EDGE = np.argsort(ANALOG_POSITIONS).astype(np.int32)  # tuple position p holds our edge _TUPLE_TO_EDGE[p]
_EXAMPLE = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|"
_TOKEN = re.compile(r"([a-z0-9_]+)~(\d+)")


def nb201_space(*, mutation_rate: float = 1 / 6) -> Space:
    """The NB201 cell space; the default rate mutates one edge per call on average."""
    return Space(
        "nb201",
        [Choice(f"{to}<-{src}", OPS) for to, src in EDGES],
        mutation_rate=mutation_rate,
        formatter=_format,
        parser=_parse,
    )


def _format(arch: dict) -> str:
    nodes = ["|".join(f"{arch[f'{to}<-{src}']}~{src}" for src in range(to)) for to in (1, 2, 3)]
    return "|" + "|+|".join(nodes) + "|"


def _parse(text: str) -> dict[str, str]:
    def malformed(why: str) -> ValueError:
        return ValueError(f"malformed NAS-Bench-201 architecture string {text!r}: {why}; expected e.g. {_EXAMPLE!r}")

    if not (text.startswith("|") and text.endswith("|")):
        raise malformed("it must start and end with '|'")
    nodes = text[1:-1].split("|+|")
    if len(nodes) != 3:
        raise malformed(f"expected 3 nodes separated by '|+|', found {len(nodes)}")
    arch = {}
    for to, node in enumerate(nodes, start=1):
        tokens = node.split("|")
        if len(tokens) != to:
            raise malformed(f"node {to} needs {to} edges 'op~source', found {len(tokens)} in {node!r}")
        for src, token in enumerate(tokens):
            match = _TOKEN.fullmatch(token)
            if not match or int(match.group(2)) != src:
                raise malformed(f"edge {token!r} of node {to} must read 'op~{src}'")
            arch[f"{to}<-{src}"] = match.group(1)
    return arch


def from_analog_tuple(cell: jax.Array) -> jax.Array:
    """int32 [..., 6] encodings from ``analog-nasbench`` cells int [..., 6] (op codes in its edge order); jit-able."""
    cell = jnp.asarray(cell, jnp.int32)
    return jnp.asarray(_ANALOG_TO_OP)[cell[..., np.array(ANALOG_POSITIONS)]]


def to_analog_tuple(enc: jax.Array) -> jax.Array:
    """int32 [..., 6] ``analog-nasbench`` cells from encodings int [..., 6]; the inverse of `from_analog_tuple`."""
    enc = jnp.asarray(enc, jnp.int32)
    return jnp.asarray(_OP_TO_ANALOG)[enc[..., _TUPLE_TO_EDGE]]
