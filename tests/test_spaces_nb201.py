"""The NAS-Bench-201 cell space: NB201's own string format, size, and the analog-nasbench tuple mapping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.spaces import from_analog_tuple, nb201_space, to_analog_tuple
from jaxnas.spaces.nb201 import EDGES, OPS

SPACE = nb201_space()
EXAMPLE = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|"

# Hand-checked: analog tuples list edges (0->1, 0->2, 0->3, 1->2, 1->3, 2->3) with codes
# 0 skip_connect, 1 none, 2 nor_conv_3x3, 3 nor_conv_1x1, 4 avg_pool_3x3.
ANALOG = [
    ((1, 1, 1, 1, 1, 1), "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"),
    ((2, 0, 3, 4, 1, 0), "|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_1x1~0|none~1|skip_connect~2|"),
    ((0, 1, 2, 3, 4, 0), "|skip_connect~0|+|none~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|"),
]


def test_space_is_six_edges_over_nb201_ops_in_nb201_order():
    assert OPS == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    assert SPACE.names == ("1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2")
    assert EDGES == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
    assert SPACE.size() == 15_625


def test_canonical_string_is_nb201_architecture_string():
    enc = SPACE.encode({"1<-0": "nor_conv_3x3", "2<-0": "skip_connect", "2<-1": "none",
                        "3<-0": "none", "3<-1": "nor_conv_1x1", "3<-2": "avg_pool_3x3"})
    chex.assert_trees_all_equal(enc, np.array([3, 1, 0, 0, 2, 4], np.int32))
    assert SPACE.to_string(enc) == EXAMPLE
    chex.assert_trees_all_equal(SPACE.from_string(EXAMPLE), enc)


def test_strings_round_trip_for_random_cells():
    cells = np.random.default_rng(0).integers(0, 5, size=(300, 6)).astype(np.int32)
    for cell in cells:
        text = SPACE.to_string(cell)
        assert text.count("|+|") == 2 and text.startswith("|") and text.endswith("|")
        chex.assert_trees_all_equal(SPACE.from_string(text), cell)


def test_fingerprint_is_pinned():
    # sha1(b"nb201:" + EXAMPLE), written out so that the format cannot drift silently.
    assert SPACE.fingerprint(SPACE.from_string(EXAMPLE)) == "e1ad4743baed75c7605788682f80d8d6f747a3d9"


@pytest.mark.parametrize(("cell", "text"), ANALOG)
def test_analog_tuples_map_to_hand_checked_cells(cell, text):
    enc = from_analog_tuple(jnp.array(cell))
    assert SPACE.to_string(enc) == text
    chex.assert_trees_all_equal(np.asarray(to_analog_tuple(SPACE.from_string(text))), np.array(cell, np.int32))


def test_analog_mapping_is_a_jittable_bijection_over_all_cells():
    every = np.stack(np.meshgrid(*[np.arange(5)] * 6, indexing="ij"), -1).reshape(-1, 6).astype(np.int32)
    ours = jax.jit(from_analog_tuple)(every)
    chex.assert_shape(ours, (15_625, 6))
    assert len({tuple(r) for r in np.asarray(ours)}) == 15_625
    chex.assert_trees_all_equal(np.asarray(jax.jit(to_analog_tuple)(ours)), every)


def test_neighbours_change_exactly_one_edge():
    enc = SPACE.from_string(EXAMPLE)
    near = SPACE.neighbours(enc)
    chex.assert_shape(near, (24, 6))
    assert ((near != enc).sum(-1) == 1).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2", "start and end with '|'"),
        ("|nor_conv_3x3~0|+|skip_connect~0|none~1|", "expected 3 nodes separated by '\\|\\+\\|', found 2"),
        ("|nor_conv_3x3~0|+|skip_connect~0|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|", "node 2 needs 2 edges"),
        ("|nor_conv_3x3~1|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|", "must read 'op~0'"),
        ("|conv_5x5~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|",
         "'1<-0' has no option 'conv_5x5'; allowed: none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3"),
    ],
)
def test_from_string_rejects_malformed_strings_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        SPACE.from_string(text)
