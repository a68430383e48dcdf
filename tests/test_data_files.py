"""``folder:`` and ``csv:`` datasets on PNGs the tests write: shapes, channels, splits, and errors."""

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from jaxnas.data import DataConfig, DataError, DatasetNotAvailableError, UnreadableImagesError, load_dataset

SPLITS = ("train", "validation", "test")


def write_pngs(folder, n, seed, mode):
    """``n`` distinct PNGs of varying sizes in ``folder``; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        height, width = 10 + i % 3, 12 + i % 2
        shape = (height, width, 3) if mode == "RGB" else (height, width)
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def hashes(split):
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in split.images]


@pytest.fixture
def gray_folder(tmp_path):
    for index, name in enumerate(["seven", "one", "four"]):
        write_pngs(tmp_path / "digits" / name, 10, seed=index, mode="L")
    (tmp_path / "digits" / "one" / "notes.txt").write_text("not an image")
    return tmp_path / "digits"


def test_folder_dataset_resizes_grayscale_images_and_splits_by_class(gray_folder):
    dataset = load_dataset(DataConfig(name=f"folder:{gray_folder}", image_size=(8, 8)))
    assert dataset.info.class_names == ("four", "one", "seven")
    assert dataset.info.image_shape == (8, 8, 1)
    assert dataset.info.sizes == {"train": 21, "validation": 3, "test": 6}
    for name, per_class in zip(SPLITS, (7, 1, 2)):
        split = getattr(dataset, name)
        assert split.images.shape[1:] == (8, 8, 1) and split.images.dtype == np.float32
        assert split.labels.dtype == np.int32 and 0.0 <= split.images.min() and split.images.max() <= 1.0
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=3), [per_class] * 3)
    parts = [set(hashes(getattr(dataset, s))) for s in SPLITS]
    assert sum(map(len, parts)) == 30 and len(set.union(*parts)) == 30  # disjoint


def test_folder_with_any_colour_image_is_rgb_and_gray_images_repeat_their_level(tmp_path):
    write_pngs(tmp_path / "data" / "a", 5, seed=0, mode="L")
    write_pngs(tmp_path / "data" / "b", 5, seed=1, mode="RGB")
    dataset = load_dataset(DataConfig(name=f"folder:{tmp_path / 'data'}", image_size=(6, 6), test_fraction=0.4))
    assert dataset.info.image_shape == (6, 6, 3)
    images = np.concatenate([getattr(dataset, s).images for s in SPLITS])
    labels = np.concatenate([getattr(dataset, s).labels for s in SPLITS])
    gray = images[labels == 0]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    assert not np.array_equal(images[labels == 1][..., 0], images[labels == 1][..., 1])
    forced_gray = load_dataset(DataConfig(name=f"folder:{tmp_path / 'data'}", image_size=(6, 6), channels=1))
    assert forced_gray.info.image_shape == (6, 6, 1)


def test_folder_split_depends_on_split_seed(gray_folder):
    def test_hashes(seed):
        config = DataConfig(name=f"folder:{gray_folder}", image_size=(8, 8), split_seed=seed)
        return hashes(load_dataset(config).test)

    assert test_hashes(3) == test_hashes(3)
    assert set(test_hashes(3)) != set(test_hashes(4))


def test_csv_dataset_resolves_relative_paths_and_sorts_string_labels(tmp_path):
    cats = write_pngs(tmp_path / "img" / "c", 10, seed=0, mode="RGB")
    dogs = write_pngs(tmp_path / "img" / "d", 10, seed=1, mode="RGB")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "species"])
        writer.writerows([[p.relative_to(tmp_path).as_posix(), "dog"] for p in dogs])
        writer.writerows([[str(p), "cat"] for p in cats])  # absolute paths work too
    config = DataConfig(
        name=f"csv:{tmp_path / 'labels.csv'}", image_size=(9, 7), path_column="file", label_column="species"
    )
    dataset = load_dataset(config)
    assert dataset.info.class_names == ("cat", "dog") and dataset.info.image_shape == (9, 7, 3)
    assert dataset.info.sizes == {"train": 14, "validation": 2, "test": 4}
    expected = np.asarray(Image.open(dogs[0]).resize((7, 9), Image.Resampling.BILINEAR), np.float32) / 255
    all_images = np.concatenate([getattr(dataset, s).images for s in SPLITS])
    assert any(np.array_equal(image, expected) for image in all_images)


def test_csv_missing_column_names_it_and_the_columns_that_exist(tmp_path):
    (tmp_path / "t.csv").write_text("filename,label\na.png,0\n")
    with pytest.raises(DataError, match=r"no column 'path' \(DataConfig.path_column\); its columns are: filename, lab"):
        load_dataset(DataConfig(name=f"csv:{tmp_path / 't.csv'}", image_size=(4, 4)))


def test_unreadable_and_missing_images_are_all_reported_by_path(tmp_path):
    write_pngs(tmp_path / "data" / "a", 4, seed=0, mode="L")
    write_pngs(tmp_path / "data" / "b", 4, seed=1, mode="L")
    garbage = tmp_path / "data" / "b" / "broken.png"
    garbage.write_bytes(b"this is not a png at all")
    with pytest.raises(UnreadableImagesError) as error:
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'data'}", image_size=(4, 4)))
    assert error.value.paths == (str(garbage),) and str(garbage) in str(error.value)

    (tmp_path / "list.csv").write_text("path,label\ndata/a/000.png,x\ndata/b/broken.png,y\nmissing.png,y\n")
    with pytest.raises(UnreadableImagesError) as error:
        load_dataset(DataConfig(name=f"csv:{tmp_path / 'list.csv'}", image_size=(4, 4)))
    assert error.value.paths == (str(garbage), str(tmp_path / "missing.png"))


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    for name, level in (("dark", 257 * 40), ("light", 65535)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((4, 4), level - i, np.uint16)).save(tmp_path / "data" / name / f"{i}.png")
    dataset = load_dataset(DataConfig(name=f"folder:{tmp_path / 'data'}", image_size=(4, 4), test_fraction=0.4))
    images = np.concatenate([getattr(dataset, s).images for s in SPLITS])
    labels = np.concatenate([getattr(dataset, s).labels for s in SPLITS])
    np.testing.assert_allclose(images[labels == 0], 40 / 255, atol=1e-6)
    np.testing.assert_allclose(images[labels == 1], 1.0, atol=1e-6)


def test_missing_folder_and_folder_without_class_subfolders_are_explained(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="no such folder"):
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'absent'}", image_size=(4, 4)))
    write_pngs(tmp_path / "flat", 2, seed=0, mode="L")
    with pytest.raises(DataError, match=r"no class subfolders.*000.png, 001.png"):
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'flat'}", image_size=(4, 4)))


def write_csv(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_integer_labels_are_class_indices_and_bad_labels_are_refused_with_their_lines(tmp_path):
    cats = write_pngs(tmp_path / "c", 10, seed=0, mode="RGB")
    dogs = write_pngs(tmp_path / "d", 10, seed=1, mode="RGB")
    rows = [[str(p), "1"] for p in dogs] + [[str(p), "0"] for p in cats]
    dataset = load_dataset(DataConfig(name=f"csv:{write_csv(tmp_path / 'ok.csv', rows)}", image_size=(8, 8)))
    assert dataset.info.class_names == ("0", "1")
    dog = np.asarray(Image.open(dogs[0]).resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255
    images = np.concatenate([getattr(dataset, s).images for s in SPLITS])
    labels = np.concatenate([getattr(dataset, s).labels for s in SPLITS])
    assert labels[[np.array_equal(image, dog) for image in images]].tolist() == [1]

    # One bad label must not renumber every class: rows are lines 2 .. 21 (line 1 is the header).
    for bad, problem in (("-1", "negative"), ("cat", "look like integers"), ("1.5", "not an integer")):
        path = write_csv(tmp_path / "bad.csv", rows[:-1] + [[str(cats[-1]), bad]])
        with pytest.raises(DataError) as error:
            load_dataset(DataConfig(name=f"csv:{path}", image_size=(8, 8)))
        message = str(error.value)
        assert f"csv:{path}" in message and f"line 21: '{bad}'" in message and problem in message, message
        assert "all integers in [0, n) or all class names" in message


def test_single_class_folder_is_refused(tmp_path):
    write_pngs(tmp_path / "data" / "only", 10, seed=0, mode="L")
    with pytest.raises(DataError, match=r"has 1 class \('only'\).*at least 2 classes"):
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'data'}", image_size=(4, 4)))


def test_classes_with_too_few_images_for_every_split_are_named_with_their_counts(tmp_path):
    # Two images per class: validation came out empty, and a search then crashed deep inside numpy.
    for name in ("a", "b"):
        write_pngs(tmp_path / "tiny" / name, 2, seed=0, mode="L")
    with pytest.raises(DataError, match=r"each class needs at least 5 images.*'a': 2, 'b': 2"):
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'tiny'}", image_size=(4, 4)))
    # Some classes large enough: the small ones would be missing from validation / test without a word.
    for name, n in (("big", 10), ("few", 3), ("more", 6)):
        write_pngs(tmp_path / "mixed" / name, n, seed=0, mode="L")
    with pytest.raises(DataError) as error:
        load_dataset(DataConfig(name=f"folder:{tmp_path / 'mixed'}", image_size=(4, 4)))
    assert "'few': 3" in str(error.value) and "'big'" not in str(error.value) and "'more'" not in str(error.value)
    # Integer labels that skip a number leave a class without images.
    rows = [[str(p), label] for label in ("0", "2") for p in write_pngs(tmp_path / label, 10, seed=0, mode="L")]
    with pytest.raises(DataError, match=r"'1': 0"):
        load_dataset(DataConfig(name=f"csv:{write_csv(tmp_path / 'gap.csv', rows)}", image_size=(4, 4)))
