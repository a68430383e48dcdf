"""Splitting, label encoding, image conversion and batch orders of the data layer (no dataset files)."""

import numpy as np
import pytest

from jaxnas.data import DataConfig, Split, batches, epoch_indices, stratified_split
from jaxnas.data.core import SPLITS, RawSplit, assemble_dataset, encode_labels
from jaxnas.data.errors import DataError
from jaxnas.data.images import as_uint8_hwc, to_float_nhwc


def _split(n: int, num_classes: int = 3) -> Split:
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return Split(images, (np.arange(n) % num_classes).astype(np.int32))


def test_stratified_split_keeps_class_proportions_and_covers_every_index_once():
    labels = np.repeat(np.arange(4), [50, 30, 20, 10])
    rest, validation, test = stratified_split(labels, (0.1, 0.2), seed=3)
    np.testing.assert_array_equal(np.sort(np.concatenate([rest, validation, test])), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[validation]), [5, 3, 2, 1])
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 6, 4, 2])
    assert all(np.all(np.diff(part) > 0) for part in (rest, validation, test))


def test_stratified_split_depends_on_seed_only():
    labels = np.repeat(np.arange(3), 40)
    first = stratified_split(labels, (0.25,), seed=7)
    again = stratified_split(labels, (0.25,), seed=7)
    other = stratified_split(labels, (0.25,), seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_encode_labels_sorts_strings_and_reads_integer_strings_as_indices():
    labels, names = encode_labels(["dog", "cat", "emu", "cat"])
    assert names == ("cat", "dog", "emu")
    np.testing.assert_array_equal(labels, [1, 0, 2, 0])
    labels, names = encode_labels(["2", "10", "0"])
    np.testing.assert_array_equal(labels, [2, 10, 0])
    assert names == tuple(str(i) for i in range(11))


def test_encode_labels_rejects_indices_outside_the_class_names():
    with pytest.raises(DataError, match=r"\[0, 3\].*3 classes"):
        encode_labels([0, 3], class_names=["a", "b", "c"])


def test_encode_labels_refuses_negative_fractional_and_mixed_label_strings_naming_them():
    for values, problem, shown in (
        (["0", "1", "0", "-1"], "negative", "'-1'"),
        (["0", "1", "cat"], "2 look like integers", "'cat'"),
        (["0", "1.5", "1"], "not an integer", "'1.5'"),
        (["0.5", "1.5"], "are numbers but not integers", "'0.5'"),
    ):
        with pytest.raises(DataError) as error:
            encode_labels(values)
        message = str(error.value)
        assert problem in message and shown in message, message
        assert "all integers in [0, n) or all class names" in message
    with pytest.raises(DataError, match=r"line 7: '-1'"):
        encode_labels(["0", "1", "-1"], row_names=["line 5", "line 6", "line 7"])
    labels, names = encode_labels(["1", "0", "+1"])  # still integers: label k is class k
    np.testing.assert_array_equal(labels, [1, 0, 1])
    assert names == ("0", "1")


def test_as_uint8_hwc_scales_floats_and_rejects_values_that_are_not_8_bit():
    np.testing.assert_array_equal(as_uint8_hwc(np.array([[0.0, 1.0]])), np.array([[[0], [255]]], np.uint8))
    assert as_uint8_hwc(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(DataError, match="not 8-bit"):
        as_uint8_hwc(np.array([[0, 300]]))


def test_to_float_nhwc_resizes_and_broadcasts_gray_to_rgb():
    gray = np.full((4, 6, 1), 51, np.uint8)
    rgb = np.zeros((8, 8, 3), np.uint8)
    out = to_float_nhwc([gray, rgb], size=(4, 4), channels=3)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 0.2, atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)


def test_assemble_dataset_carves_missing_validation_and_test_from_train():
    labels = np.repeat(np.arange(2), 10)
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1) * 10
    config = DataConfig(validation_fraction=0.1, test_fraction=0.2)
    dataset = assemble_dataset("toy", {"train": RawSplit(images, labels)}, ("a", "b"), config)
    assert dataset.info.sizes == {"train": 14, "validation": 2, "test": 4}
    assert dataset.info.image_shape == (1, 1, 1) and dataset.info.class_names == ("a", "b")
    seen = [set(np.round(getattr(dataset, s).images.ravel() * 255).astype(int)) for s in SPLITS]
    assert set.union(*seen) == set(range(0, 200, 10)) and sum(map(len, seen)) == 20


def test_assemble_dataset_asks_for_image_size_when_sizes_differ():
    images = [np.zeros((4, 4, 1), np.uint8), np.zeros((5, 4, 1), np.uint8)]
    raw = {s: RawSplit(images, np.array([0, 1])) for s in SPLITS}  # the source's own splits: nothing to carve
    with pytest.raises(DataError, match="image_size"):
        assemble_dataset("toy", raw, ("a", "b"), DataConfig())


def _gray(n: int) -> np.ndarray:
    return np.zeros((n, 2, 2, 1), np.uint8)


def test_assemble_dataset_refuses_a_single_class():
    raw = {"train": RawSplit(_gray(20), np.zeros(20, np.int64))}
    with pytest.raises(DataError, match=r"1 class \('a'\).*at least 2 classes"):
        assemble_dataset("toy", raw, ("a",), DataConfig())
    # Two class names, but the source's own splits only hold images of one of them.
    raw = {s: RawSplit(_gray(4), np.zeros(4, np.int64)) for s in SPLITS}
    with pytest.raises(DataError, match=r"only class 'a' has images"):
        assemble_dataset("toy", raw, ("a", "b"), DataConfig())


def test_assemble_dataset_refuses_empty_splits_of_the_source():
    raw = {"train": RawSplit(_gray(20), np.arange(20) % 2), "test": RawSplit(_gray(0), np.zeros(0, np.int64))}
    with pytest.raises(DataError, match=r"toy: the source's test split is empty"):
        assemble_dataset("toy", raw, ("a", "b"), DataConfig())


def test_assemble_dataset_names_classes_too_small_to_appear_in_every_carved_split():
    # validation 0.1 and test 0.2 of a class: 5 images give 1 / 1 and leave 3 for training; 4 give 0 validation.
    labels = np.repeat(np.arange(4), [5, 4, 20, 1])
    raw = {"train": RawSplit(_gray(len(labels)), labels)}
    with pytest.raises(DataError) as error:
        assemble_dataset("toy", raw, ("a", "b", "c", "d"), DataConfig())
    message = str(error.value)
    assert "at least 5 images" in message and "'b': 4, 'd': 1" in message, message
    assert "'a'" not in message and "'c'" not in message
    assert "validation_fraction" in message  # the fix: more images, or larger fractions (a lower minimum)
    assemble_dataset("toy", {"train": RawSplit(_gray(10), np.repeat([0, 1], 5))}, ("a", "b"), DataConfig())
    # A class without any image (e.g. integer labels that skip a number) cannot appear in any split.
    with pytest.raises(DataError, match=r"'1': 0"):
        assemble_dataset("toy", {"train": RawSplit(_gray(10), np.repeat([0, 2], 5))}, ("0", "1", "2"), DataConfig())


def test_batches_same_seed_same_order_and_epochs_reshuffle():
    split = _split(10)
    run = [labels.tolist() for _, labels in batches(split, 4, seed=1, epochs=2)]
    assert run == [labels.tolist() for _, labels in batches(split, 4, seed=1, epochs=2)]
    assert len(run) == 4  # 2 full batches per epoch, remainder dropped
    first_epoch = np.concatenate([images.ravel() for images, _ in batches(split, 5, seed=1)])
    second_epoch = np.concatenate([images.ravel() for images, _ in list(batches(split, 5, seed=1, epochs=2))[2:]])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(10))
    assert not np.array_equal(first_epoch, second_epoch)
    other = np.concatenate([images.ravel() for images, _ in batches(split, 5, seed=2)])
    assert not np.array_equal(first_epoch, other)


def test_batches_without_shuffle_or_drop_remainder_yields_every_example_in_order():
    split = _split(10)
    got = [(images.shape, labels.dtype) for images, labels in batches(split, 4, 0, shuffle=False, drop_remainder=False)]
    assert got == [((4, 1, 1, 1), np.int32), ((4, 1, 1, 1), np.int32), ((2, 1, 1, 1), np.int32)]
    order = np.concatenate([images.ravel() for images, _ in batches(split, 4, 0, shuffle=False, drop_remainder=False)])
    np.testing.assert_array_equal(order, np.arange(10))


def test_epoch_indices_match_the_batches_iterator():
    split = _split(11)
    index = epoch_indices(11, 3, seed=5, epoch=1)
    assert index.shape == (3, 3) and index.dtype == np.int32
    second_epoch = list(batches(split, 3, seed=5, epochs=2))[3:]
    for row, (images, _) in zip(index, second_epoch):
        np.testing.assert_array_equal(images.ravel(), row)


def test_batch_size_larger_than_split_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(_split(3), 4, seed=0))
    with pytest.raises(ValueError, match="batch_size"):
        epoch_indices(3, 4, seed=0, epoch=0)
