"""Local image files: ``folder:<root>`` and ``csv:<file>``.

- ``folder:<root>``: one subfolder per class (class names = sorted subfolder names); every image file
  below a class folder (any depth) belongs to that class. Hidden files / folders and files without an
  image suffix are not images and are not read.
- ``csv:<file>``: a header row, an image path column and a label column; relative paths are read
  from the CSV's folder. Labels are either all integers in [0, n) (label k is class k) or all class names
  (sorted into class indices); a mixture, a negative or a fractional label is an error naming its line.

Images are resized to ``image_size`` (PIL bilinear); every missing or undecodable image is reported by
path in one ``UnreadableImagesError``. The whole set is the train pool from which validation and test
are carved (stratified, seeded).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from jaxnas.data.config import DataConfig
from jaxnas.data.core import Dataset, RawSplit, assemble_dataset, encode_labels
from jaxnas.data.errors import DataError, DatasetNotAvailableError, UnreadableImagesError
from jaxnas.data.images import pil_to_uint8

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def read_images(paths: list[Path], size: tuple[int, int], channels: int | None) -> list[np.ndarray]:
    """``[H, W, C] uint8`` images of ``paths`` at ``size`` (height, width); C = ``channels`` or each image's own.

    Raises ``UnreadableImagesError`` naming every file that is missing or cannot be decoded.
    """
    images, problems = [], {}
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(pil_to_uint8(image, size, channels))
        except (OSError, ValueError, DataError, Image.DecompressionBombError) as error:
            problems[str(path)] = f"{type(error).__name__}: {error}"
    if problems:
        raise UnreadableImagesError(problems)
    return images


def _is_image(path: Path, below: Path) -> bool:
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(below).parts)
    )


def list_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths under ``root``'s class subfolders, their class indices, and the sorted class names."""
    if not root.is_dir():
        raise DatasetNotAvailableError(f"folder:{root}: no such folder")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"folder:{root} has no class subfolders; expected one subfolder of images per class "
            f"(e.g. {root / 'cat' / '0001.png'}); it holds: {', '.join(found) or 'nothing'}"
        )
    paths, labels = [], []
    for index, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if _is_image(p, root / name))
        if not files:
            raise DataError(
                f"class folder {root / name} holds no image files (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "remove the folder or add its images"
            )
        paths += files
        labels += [index] * len(files)
    return paths, labels, class_names


def list_csv(csv_path: Path, path_column: str, label_column: str) -> tuple[list[Path], list[str], list[int]]:
    """Image paths (relative ones resolved against the CSV's folder), raw label strings, and the line number
    of each row (line 1 is the header), so that errors can point into the file."""
    if not csv_path.is_file():
        raise DatasetNotAvailableError(f"csv:{csv_path}: no such file")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column, field in ((path_column, "path_column"), (label_column, "label_column")):
            if column not in header:
                raise DataError(
                    f"csv:{csv_path} has no column {column!r} (DataConfig.{field}); its columns are: "
                    f"{', '.join(header) or 'none (empty file)'}"
                )
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)  # blank lines and quoted line breaks make this differ from index + 2
    empty = [
        line
        for line, row in zip(lines, rows)
        if not (row[path_column] or "").strip() or not (row[label_column] or "").strip()
    ]
    if empty:
        raise DataError(
            f"csv:{csv_path}: lines {empty[:10]} (line 1 is the header) have an empty {path_column!r} "
            f"or {label_column!r}"
        )
    if not rows:
        raise DataError(f"csv:{csv_path} has a header but no rows")
    paths = [csv_path.parent / Path(row[path_column].strip()).expanduser() for row in rows]
    return paths, [row[label_column].strip() for row in rows], lines


def load_files(config: DataConfig) -> Dataset:
    """The ``Dataset`` of ``config.name = 'folder:<root>'`` or ``'csv:<file>'``."""
    kind, _, target = config.name.partition(":")
    location = Path(target).expanduser()
    if kind == "folder":
        paths, values, class_names = list_folder(location)
        labels, class_names = encode_labels(values, class_names)
    else:
        paths, values, lines = list_csv(location, config.path_column, config.label_column)
        labels, class_names = encode_labels(
            values,
            source=f"csv:{location} column {config.label_column!r}",
            row_names=[f"line {line}" for line in lines],
        )
    images = read_images(paths, config.image_size, config.channels)
    return assemble_dataset(config.name, {"train": RawSplit(images, labels)}, class_names, config)
