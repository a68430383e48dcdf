"""Weight-only quantisation: the stated error bounds, int4 packing, tree structure, exact sizes, safetensors files."""

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxnas import quant


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": {"embedding": rng.normal(size=(11, 6)).astype(np.float32)},
        "block_0": {
            "dense": {
                "kernel": rng.normal(size=(6, 5)).astype(np.float32),
                "bias": rng.normal(size=5).astype(np.float32),
            },
            "norm": {"scale": np.ones(6, np.float32)},
            "conv": {"kernel": rng.normal(size=(3, 3, 2, 3)).astype(np.float32)},
        },
        "empty": {},
        "step": np.int32(7),
    }


weights = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=7),
    elements=st.floats(-(2.0**60), 2.0**60, width=32, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None)
@given(w=weights, precision=st.sampled_from(["int8", "int4"]))
def test_integer_round_trip_error_is_at_most_half_a_scale_per_channel(w, precision):
    q = quant.quantize({"w": w}, precision)
    leaf = q.leaves[0]
    qmax = quant.QMAX[precision]
    channel_max = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    np.testing.assert_array_equal(leaf.scale, (channel_max / qmax).astype(np.float32))
    dq = quant.dequantize(q)["w"]
    assert dq.dtype == np.float32 and dq.shape == w.shape
    # The stated bound: scale / 2, plus the float32 rounding of the dequantised value (half an ulp).
    bound = leaf.scale.astype(np.float64) / 2 + 2.0**-24 * channel_max
    assert np.all(np.abs(w.astype(np.float64) - dq) <= bound)
    values = quant.unpack_int4(leaf.data, w.size) if precision == "int4" else leaf.data
    assert values.min(initial=0) >= -qmax and values.max(initial=0) <= qmax


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5)),
        elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False),
    )
)
def test_bf16_relative_error_is_at_most_2_to_the_minus_8(w):
    q = quant.quantize({"w": w}, "bf16")
    assert q.leaves[0].data.dtype == ml_dtypes.bfloat16
    dq = quant.dequantize(q)["w"]
    assert np.all(np.abs(w.astype(np.float64) - dq) <= 2.0**-8 * np.abs(w.astype(np.float64)))


@given(values=st.lists(st.integers(-8, 7), max_size=41))
def test_int4_packing_round_trips_any_length_including_odd(values):
    packed = quant.pack_int4(np.array(values, np.int8))
    assert packed.dtype == np.uint8 and packed.size == (len(values) + 1) // 2
    np.testing.assert_array_equal(quant.unpack_int4(packed, len(values)), values)


def test_int4_nibble_layout_low_then_high():
    np.testing.assert_array_equal(quant.pack_int4(np.array([1, -1, 7])), [0xF1, 0x07])


def test_zero_channels_and_odd_int4_counts_dequantise_exactly():
    w = np.zeros((3, 3), np.float32)
    w[:, 1] = [1.0, -7.0, 3.5]  # channel 1: scale 1 for int4, so every value is exact
    for precision in ("int8", "int4"):
        dq = quant.dequantize(quant.quantize({"w": w}, precision))["w"]
        np.testing.assert_array_equal(dq[:, [0, 2]], 0.0)
    np.testing.assert_array_equal(quant.dequantize(quant.quantize({"w": w}, "int4"))["w"], np.round(w))


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_tree_structure_is_kept_and_small_leaves_stay_float32(precision):
    params = _params()
    q = quant.quantize(params, precision)
    dq = quant.dequantize(q)
    assert jax.tree_util.tree_structure(dq) == jax.tree_util.tree_structure(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    kinds = {path: leaf.kind for path, leaf in zip(paths, q.leaves)}
    matrix_kind = "fp32" if precision == "fp32" else precision
    assert kinds["['block_0']['dense']['kernel']"] == kinds["['embed']['embedding']"] == matrix_kind
    assert kinds["['block_0']['conv']['kernel']"] == matrix_kind
    assert kinds["['block_0']['dense']['bias']"] == kinds["['block_0']['norm']['scale']"] == "fp32"
    assert kinds["['step']"] == "raw" and dq["step"] == 7 and dq["step"].dtype == np.int32
    np.testing.assert_array_equal(dq["block_0"]["dense"]["bias"], params["block_0"]["dense"]["bias"])
    if precision == "fp32":
        leaves = zip(jax.tree_util.tree_leaves(dq), jax.tree_util.tree_leaves(params))
        assert all(np.array_equal(a, b) for a, b in leaves)


def test_size_bytes_counts_values_and_scales():
    params = _params()
    matrices = 11 * 6 + 6 * 5 + 3 * 3 * 2 * 3  # 150 weights in 3 leaves with 6 + 5 + 3 = 14 channels
    small = (5 + 6) * 4 + 4  # float32 bias and norm scale, int32 step
    assert quant.size_bytes(params) == matrices * 4 + small
    assert quant.size_bytes(quant.quantize(params, "fp32")) == matrices * 4 + small
    assert quant.size_bytes(quant.quantize(params, "bf16")) == matrices * 2 + small
    assert quant.size_bytes(quant.quantize(params, "int8")) == matrices + 14 * 4 + small
    int4 = (66 + 1) // 2 + (30 + 1) // 2 + (54 + 1) // 2  # each leaf packed on its own
    assert quant.size_bytes(quant.quantize(params, "int4")) == int4 + 14 * 4 + small


def _data_section(path):
    """(bytes after the header, bytes the header's tensors span, header) of a safetensors file."""
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    return len(blob) - 8 - header_len, sum(end - begin for begin, end in spans), header


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_saved_file_data_section_is_size_bytes_and_loads_back_exactly(precision, tmp_path):
    params = _params(1)
    q = quant.quantize(params, precision)
    path = tmp_path / "params.safetensors"
    quant.save(q, path)
    data_bytes, tensor_bytes, header = _data_section(path)
    assert data_bytes == tensor_bytes == quant.size_bytes(q)
    assert header["__metadata__"]["precision"] == precision
    loaded = quant.load(path)
    assert loaded.precision == precision and loaded.treedef == q.treedef
    for a, b in zip(loaded.leaves, q.leaves):
        assert (a.kind, a.shape, a.dtype) == (b.kind, b.shape, b.dtype)
        np.testing.assert_array_equal(a.data, b.data)
        assert a.data.dtype == b.data.dtype
        assert (a.scale is None) == (b.scale is None)
        if a.scale is not None:
            np.testing.assert_array_equal(a.scale, b.scale)
    leaves = zip(jax.tree_util.tree_leaves(quant.dequantize(loaded)), jax.tree_util.tree_leaves(quant.dequantize(q)))
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)
        assert a.shape == b.shape and a.dtype == b.dtype


def test_save_refuses_trees_it_cannot_name_and_load_refuses_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="nested dicts"):
        quant.save(quant.quantize([np.ones((2, 2), np.float32)], "int8"), tmp_path / "x.safetensors")
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a jaxnas quantised params file"):
        quant.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="fp32, bf16, int8, int4"):
        quant.quantize({}, "int2")
    with pytest.raises(ValueError, match=r"params\['a'\]\['w'\] \(2, 2\) holds 1 non-finite"):
        quant.quantize({"a": {"w": np.array([[1.0, np.inf], [0.0, 2.0]], np.float32)}}, "int8")


def test_jax_arrays_quantise_like_numpy_arrays():
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    from_jax = quant.quantize({"w": jax.numpy.asarray(w)}, "int4").leaves[0]
    from_numpy = quant.quantize({"w": w}, "int4").leaves[0]
    np.testing.assert_array_equal(from_jax.data, from_numpy.data)
    np.testing.assert_array_equal(from_jax.scale, from_numpy.scale)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_stored_bytes_from_shapes_equals_size_bytes_of_the_quantised_tree(precision):
    tree = {"a": np.ones((3, 5), np.float32), "b": np.ones((7,), np.float32), "c": np.ones((2, 3, 3), np.float32),
            "n": np.arange(4, dtype=np.int32), "z": np.ones((0, 4), np.float32)}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    assert quant.stored_bytes(shapes, precision) == quant.size_bytes(quant.quantize(tree, precision))
