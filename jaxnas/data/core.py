"""The dataset types every source produces, and the one way raw splits become a ``Dataset``.

A source reads what it has into ``RawSplit``s (8-bit images, integer labels) keyed by ``train`` and,
when the source has them, ``validation`` / ``test``; ``assemble_dataset`` carves the missing splits
out of train (stratified, seeded) and converts the images to ``[N, H, W, C] float32`` in [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxnas.data.config import DataConfig
from jaxnas.data.errors import DataError
from jaxnas.data.images import common_channels, to_float_nhwc

SPLITS = ("train", "validation", "test")
# Split names sources use for the same thing; the first match wins.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: ``images`` ``[N, H, W, C] float32`` in [0, 1], ``labels`` ``[N] int32`` class indices."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.float32 or self.images.ndim != 4:
            raise ValueError(
                f"Split.images: expected [N, H, W, C] float32, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"Split.labels: expected [{self.images.shape[0]}] int32, got {self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know: ``image_shape`` is (H, W, C); ``sizes`` maps split name to example count."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    sizes: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits of one dataset plus its metadata."""

    info: DatasetInfo
    train: Split
    validation: Split
    test: Split


class RawSplit(NamedTuple):
    """A split as a source reads it: ``[H, W, C] uint8`` images (C = 1 or 3, one array or a list of
    arrays when sizes differ) and ``[N]`` integer class indices."""

    images: Sequence[np.ndarray] | np.ndarray
    labels: np.ndarray


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices ``[rest, part_1, ...]`` (each sorted, int64) of a seeded per-class split of ``labels`` [N].

    Each class puts ``round(n_class * fraction)`` of its examples (rounding halves up) into each part and
    the rest into ``rest``, so every part has the class proportions of the whole.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        counts = [int(np.floor(len(members) * f + 0.5)) for f in fractions]
        bounds = np.cumsum([len(members) - sum(counts), *counts])[:-1]
        for part, chunk in zip(parts, np.split(members, bounds)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def encode_labels(values: Sequence, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``[N] int64`` class indices and class names from raw label values.

    With ``class_names`` the values are indices into it. Otherwise integers (or strings that all spell
    non-negative integers) are indices and the names are ``"0" .. str(max)``; other strings become
    indices into their sorted unique values.
    """
    values = list(values)
    if class_names is None and values and all(isinstance(v, str) for v in values):
        if all(v.strip().isdigit() for v in values):
            values = [int(v) for v in values]
        else:
            class_names = sorted(set(values))
            index = {name: i for i, name in enumerate(class_names)}
            values = [index[v] for v in values]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise DataError(f"labels must be integers or strings, got values of type {', '.join(kinds)}")
    labels = np.asarray(values, dtype=np.int64).reshape(-1)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"labels range over [{labels.min()}, {labels.max()}] but there are {len(class_names)} classes; "
            "labels must be class indices 0 .. num_classes - 1"
        )
    return labels, tuple(class_names)


def _take(raw: RawSplit, index: np.ndarray) -> RawSplit:
    images = raw.images[index] if isinstance(raw.images, np.ndarray) else [raw.images[i] for i in index]
    return RawSplit(images, raw.labels[index])


def carve_missing_splits(raw: dict[str, RawSplit], config: DataConfig) -> dict[str, RawSplit]:
    """All three splits: the missing validation / test splits are carved out of train.

    Carved parts are ``config.validation_fraction`` / ``config.test_fraction`` of train, stratified by
    class and seeded by ``config.split_seed``.
    """
    if "train" not in raw:
        raise DataError(f"the source has no train split (found: {', '.join(sorted(raw)) or 'none'})")
    if len(raw["train"].labels) == 0:
        raise DataError("the source's train split is empty")
    missing = [s for s in ("validation", "test") if s not in raw]
    if not missing:
        return dict(raw)
    fractions = [config.validation_fraction if s == "validation" else config.test_fraction for s in missing]
    rest, *carved = stratified_split(raw["train"].labels, fractions, config.split_seed)
    out = dict(raw, train=_take(raw["train"], rest))
    out.update({s: _take(raw["train"], index) for s, index in zip(missing, carved)})
    return out


def assemble_dataset(name: str, raw: dict[str, RawSplit], class_names: Sequence[str], config: DataConfig) -> Dataset:
    """The ``Dataset`` of ``raw`` splits: missing splits carved from train, images converted and resized."""
    raw = carve_missing_splits(raw, config)
    channels = config.channels or common_channels([raw[s].images for s in SPLITS])
    size = config.image_size
    if size is None:
        # One size for all splits: a model is built for one input shape.
        sizes = sorted({tuple(image.shape[:2]) for s in SPLITS for image in raw[s].images})
        if len(sizes) > 1:
            raise DataError(
                f"images of {name} differ in size ({len(sizes)} sizes, e.g. {sizes[0]} and {sizes[-1]} as "
                "(height, width)); set DataConfig.image_size to resize them to one (height, width)."
            )
        size = sizes[0]
    splits = {
        s: Split(to_float_nhwc(raw[s].images, size, channels), raw[s].labels.astype(np.int32)) for s in SPLITS
    }
    info = DatasetInfo(
        name=name,
        image_shape=tuple(int(d) for d in splits["train"].images.shape[1:]),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        sizes={s: len(splits[s]) for s in SPLITS},
    )
    return Dataset(info=info, **splits)
