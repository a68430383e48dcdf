"""``tfds:`` datasets: read offline from a prepared array_record folder; fail at once when there is none."""

import hashlib
import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxnas.data import DataConfig, DataError, DatasetNotAvailableError, load_dataset

CLASSES = ("cat", "dog", "emu")


class TinyShapesForJaxnasTests(tfds.core.GeneratorBasedBuilder):
    """8x8 RGB images, 10 train and 3 test per class, no validation split; features 'img' and 'y'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"img": tfds.features.Image(shape=(8, 8, 3)), "y": tfds.features.ClassLabel(names=CLASSES)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10, seed=0), "test": self._generate_examples(3, seed=1)}

    def _generate_examples(self, per_class, seed):
        rng = np.random.default_rng(seed)
        for i in range(per_class * len(CLASSES)):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # distinct images, so hashes identify them
            yield i, {"img": Image.fromarray(pixels), "y": i % len(CLASSES)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builder = TinyShapesForJaxnasTests(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(root)


def tiny(data_dir, **overrides):
    config = dict(name="tfds:tiny_shapes_for_jaxnas_tests", data_dir=data_dir, image_column="img", label_column="y")
    return DataConfig(**{**config, **overrides})


def hashes(split):
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in split.images}


def test_tfds_dataset_loads_with_validation_carved_from_train(data_dir):
    dataset = load_dataset(tiny(data_dir))
    assert dataset.info.class_names == CLASSES and dataset.info.num_classes == 3
    assert dataset.info.image_shape == (8, 8, 3)
    assert dataset.info.sizes == {"train": 27, "validation": 3, "test": 9}
    for name, per_class in (("train", 9), ("validation", 1), ("test", 3)):
        split = getattr(dataset, name)
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=3), [per_class] * 3)
    train, validation, test = (hashes(getattr(dataset, s)) for s in ("train", "validation", "test"))
    assert len(train) == 27 and len(validation) == 3 and len(test) == 9
    assert not (train & validation) and not (train & test) and not (validation & test)


def test_tfds_carved_validation_follows_split_seed(data_dir):
    first = load_dataset(tiny(data_dir, split_seed=1))
    again = load_dataset(tiny(data_dir, split_seed=1))
    other = load_dataset(tiny(data_dir, split_seed=2))
    np.testing.assert_array_equal(first.validation.images, again.validation.images)
    assert hashes(first.validation) != hashes(other.validation)
    np.testing.assert_array_equal(first.test.images, other.test.images)  # the source's own test split


def test_tfds_version_can_be_pinned(data_dir):
    assert load_dataset(tiny(data_dir, name="tfds:tiny_shapes_for_jaxnas_tests:1.0.0")).info.sizes["test"] == 9
    with pytest.raises(DatasetNotAvailableError, match="version 9.9.9"):
        load_dataset(tiny(data_dir, name="tfds:tiny_shapes_for_jaxnas_tests:9.9.9"))


def test_tfds_missing_feature_lists_the_features(data_dir):
    with pytest.raises(DataError, match=r"no image feature 'image'.*img, y.*image_column"):
        load_dataset(tiny(data_dir, image_column="image"))


def test_unprepared_tfds_dataset_fails_at_once_with_preparation_steps(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatasetNotAvailableError) as error:
        load_dataset(DataConfig(name="tfds:mnist", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert f"not prepared under {tmp_path}" in message
    assert "pip install tensorflow tensorflow-datasets" in message
    assert "tfds.builder('mnist', data_dir='DIR').download_and_prepare(file_format='array_record')" in message
    assert f"copy DIR/mnist to {tmp_path / 'mnist'}" in message
    assert "folder:" in message and "csv:" in message and "mnist5k" in message


def _fake_prepared(root, *parts, file_format="array_record"):
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"fileFormat": file_format}))


def test_tfrecord_dataset_is_reported_with_the_conversion_command(tmp_path):
    _fake_prepared(tmp_path, "mnist", "3.0.1", file_format="tfrecord")
    with pytest.raises(DatasetNotAvailableError, match="tfds convert_format --dataset_version_dir"):
        load_dataset(DataConfig(name="tfds:mnist", data_dir=str(tmp_path)))


def test_several_prepared_configs_ask_for_one(tmp_path):
    _fake_prepared(tmp_path, "shapes", "small", "1.0.0")
    _fake_prepared(tmp_path, "shapes", "large", "1.0.0")
    with pytest.raises(DataError, match=r"several configs.*large, small.*tfds:shapes/<config>"):
        load_dataset(DataConfig(name="tfds:shapes", data_dir=str(tmp_path)))


def test_half_written_tfds_folders_are_not_taken_for_prepared(tmp_path):
    _fake_prepared(tmp_path, "mnist", "incomplete.ABC123_3.0.1")
    with pytest.raises(DatasetNotAvailableError, match="not prepared"):
        load_dataset(DataConfig(name="tfds:mnist", data_dir=str(tmp_path)))


def test_unknown_tfds_name_is_refused_with_close_matches_not_preparation_steps(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        load_dataset(DataConfig(name="tfds:mnsit", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert not isinstance(error.value, DatasetNotAvailableError)
    assert "unknown TFDS dataset 'mnsit'" in message and "did you mean" in message and "'mnist'" in message
    assert "pip install" not in message
    with pytest.raises(DataError, match="unknown TFDS dataset 'xyzzy_no_such_dataset'") as error:
        load_dataset(DataConfig(name="tfds:xyzzy_no_such_dataset/small:1.0.0", data_dir=str(tmp_path)))
    assert "did you mean" not in str(error.value)


def test_tfds_names_known_but_not_prepared_still_get_preparation_steps(tmp_path):
    # glue is registered by a TFDS module that TFDS skips when an earlier one fails to import (no h5py).
    with pytest.raises(DatasetNotAvailableError, match="not prepared"):
        load_dataset(DataConfig(name="tfds:glue/cola", data_dir=str(tmp_path)))
    # A builder of one's own is not registered here, but its folder shows the name is meant.
    _fake_prepared(tmp_path, "my_own_shapes", "incomplete.ABC123_1.0.0")
    with pytest.raises(DatasetNotAvailableError, match="not prepared"):
        load_dataset(DataConfig(name="tfds:my_own_shapes", data_dir=str(tmp_path)))
