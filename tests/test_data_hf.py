"""``hf:`` datasets from local files (offline), and a fast, helpful failure for hub names offline."""

import dataclasses
import hashlib
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from jaxnas.data import DataConfig, DataError, DatasetNotAvailableError, load_dataset

CLASSES = ["ant", "bee"]


def _pictures(n, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (6, 5, 3) if mode == "RGB" else (6, 5)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def hashes(split):
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in split.images}


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory):
    """A DatasetDict with train (12) and test (4) splits, PIL images and ClassLabel labels, saved to disk."""
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES)})
    splits = {
        name: datasets.Dataset.from_dict(
            {"picture": _pictures(n, seed), "kind": [i % 2 for i in range(n)]}, features=features
        )
        for name, n, seed in (("train", 12, 0), ("test", 4, 1))
    }
    folder = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_hf_saved_dataset_dict_loads_with_its_columns_and_class_names(saved_dict, tmp_path):
    config = DataConfig(
        name=f"hf:{saved_dict}", image_column="picture", label_column="kind", cache_dir=str(tmp_path), test_fraction=0.3
    )
    dataset = load_dataset(config)
    assert dataset.info.class_names == ("ant", "bee") and dataset.info.image_shape == (6, 5, 3)
    # train 12 -> validation round(6 * 0.1) = 1 per class; test is the source's own 4 (test_fraction unused).
    assert dataset.info.sizes == {"train": 10, "validation": 2, "test": 4}
    for name in ("train", "validation", "test"):
        split = getattr(dataset, name)
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert not (hashes(dataset.train) & hashes(dataset.validation))
    np.testing.assert_array_equal(np.bincount(dataset.test.labels), [2, 2])


def test_hf_imagefolder_with_data_dir_reads_grayscale_class_folders(tmp_path):
    for index, name in enumerate(CLASSES):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i, picture in enumerate(_pictures(10, seed=index, mode="L")):
            picture.save(tmp_path / "images" / name / f"{i}.png")
    config = DataConfig(name="hf:imagefolder", data_dir=str(tmp_path / "images"), cache_dir=str(tmp_path / "cache"))
    dataset = load_dataset(config)
    assert dataset.info.class_names == ("ant", "bee") and dataset.info.image_shape == (6, 5, 1)
    assert dataset.info.sizes == {"train": 14, "validation": 2, "test": 4}
    parts = [hashes(getattr(dataset, s)) for s in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 20 and len(set.union(*parts)) == 20


def test_hf_single_saved_dataset_with_string_labels_and_array_images_is_split_by_seed(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(30)]
    labels = ["zebra" if i % 3 == 0 else "yak" for i in range(30)]
    datasets.Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(tmp_path / "single"))

    def load(seed):
        return load_dataset(DataConfig(name=f"hf:{tmp_path / 'single'}", split_seed=seed, cache_dir=str(tmp_path)))

    dataset = load(0)
    assert dataset.info.class_names == ("yak", "zebra") and dataset.info.image_shape == (4, 4, 1)
    assert dataset.info.sizes == {"train": 21, "validation": 3, "test": 6}
    np.testing.assert_array_equal(load(0).test.images, dataset.test.images)
    assert hashes(load(1).test) != hashes(dataset.test)


def test_hf_missing_column_lists_the_columns(saved_dict, tmp_path):
    with pytest.raises(DataError, match=r"no image column 'image'; its columns are picture, kind"):
        load_dataset(DataConfig(name=f"hf:{saved_dict}", label_column="kind", cache_dir=str(tmp_path)))


def test_hf_hub_name_offline_fails_fast_naming_the_offline_alternatives(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatasetNotAvailableError) as error:
        load_dataset(DataConfig(name="hf:ylecun/mnist", cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert "'ylecun/mnist'" in message
    for alternative in ("hf:<folder>", "hf:imagefolder", "folder:", "csv:", "mnist5k"):
        assert alternative in message


def test_hf_missing_local_folder_is_named(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="no such file or folder"):
        load_dataset(DataConfig(name=f"hf:{tmp_path / 'nowhere'}", cache_dir=str(tmp_path)))


def test_hf_local_folder_of_parquet_files_reads_splits_from_file_names(saved_dict, tmp_path):
    loaded = datasets.load_from_disk(str(saved_dict))
    (tmp_path / "parquet").mkdir()
    for split in ("train", "test"):
        loaded[split].to_parquet(str(tmp_path / "parquet" / f"{split}.parquet"))
    config = DataConfig(
        name=f"hf:{tmp_path / 'parquet'}", image_column="picture", label_column="kind", cache_dir=str(tmp_path)
    )
    dataset = load_dataset(config)
    assert dataset.info.class_names == ("ant", "bee")
    assert dataset.info.sizes == {"train": 10, "validation": 2, "test": 4}
    from_disk = load_dataset(dataclasses.replace(config, name=f"hf:{saved_dict}"))
    np.testing.assert_array_equal(dataset.test.images, from_disk.test.images)
