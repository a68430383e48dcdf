"""The dataset types every source produces, and the one way raw splits become a ``Dataset``.

A source reads what it has into ``RawSplit``s (8-bit images, integer labels) keyed by ``train`` and,
when the source has them, ``validation`` / ``test``; ``assemble_dataset`` refuses what a search cannot
use (fewer than 2 classes, an empty split, a class too small for every carved split), carves the missing
splits out of train (stratified, seeded) and converts the images to ``[N, H, W, C] float32`` in [0, 1].
"""

from __future__ import annotations

import dataclasses
import re
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


def part_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """How ``stratified_split`` divides a class of ``n`` examples: ``[rest, part_1, ...]`` sizes."""
    counts = [int(np.floor(n * f + 0.5)) for f in fractions]
    return [n - sum(counts), *counts]


def min_class_size(fractions: Sequence[float]) -> int:
    """The fewest examples a class needs so that ``stratified_split`` puts at least one in every part."""
    # A part gets one once n * f + 0.5 >= 1; start just below that and step up (rest can shrink as parts grow).
    n = max(1, int(0.5 / min(fractions)) - 1) if fractions else 1
    while min(part_sizes(n, fractions)) < 1:
        n += 1
    return n


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
        bounds = np.cumsum(part_sizes(len(members), fractions))[:-1]
        for part, chunk in zip(parts, np.split(members, bounds)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_LABEL_RULE = (
    "labels must be all integers in [0, n) or all class names (an integer label k is class k; "
    "class names are sorted into class indices)"
)


def _shown(values: Sequence[str], where: Sequence[int], row_names: Sequence[str] | None) -> str:
    """The first few offending ``values`` at positions ``where``, as "line 5: '-1', ..."."""
    shown = [f"{row_names[i] if row_names else f'value {i}'}: {values[i]!r}" for i in where[:5]]
    return ", ".join(shown) + (f" and {len(where) - 5} more" if len(where) > 5 else "")


def _label_strings_problems(values: Sequence[str], row_names: Sequence[str] | None) -> list[str]:
    """What breaks the labels rule in label strings; an empty list when they are all integers >= 0 or all names.

    Guessing past a mixture would be silent renumbering: one stray name among indices adds a class, one
    stray ``-1`` shifts every class, so anything but the two clean forms is refused.
    """
    integers = [i for i, v in enumerate(values) if _INTEGER.fullmatch(v)]
    numbers = [i for i, v in enumerate(values) if _NUMBER.fullmatch(v) and not _INTEGER.fullmatch(v)]
    names = [i for i, v in enumerate(values) if not _NUMBER.fullmatch(v)]
    if not integers and not numbers:
        return []
    problems = []
    if names:
        numeric = sorted(integers + numbers)
        problems.append(
            f"{len(numeric)} {'looks' if len(numeric) == 1 else 'look'} like integers or numbers "
            f"({_shown(values, numeric, row_names)}) and {len(names)} {'does' if len(names) == 1 else 'do'} "
            f"not ({_shown(values, names, row_names)})"
        )
    elif numbers:
        problems.append(
            f"{len(numbers)} {'is a number' if len(numbers) == 1 else 'are numbers'} but not "
            f"{'an integer' if len(numbers) == 1 else 'integers'} ({_shown(values, numbers, row_names)})"
        )
    negative = [i for i in integers if int(values[i]) < 0]
    if negative:
        problems.append(
            f"{len(negative)} {'is' if len(negative) == 1 else 'are'} negative ({_shown(values, negative, row_names)})"
        )
    return problems


def encode_labels(
    values: Sequence,
    class_names: Sequence[str] | None = None,
    *,
    source: str | None = None,
    row_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """``[N] int64`` class indices and class names from raw label values.

    With ``class_names`` the values are indices into it. Otherwise the values are integers (or strings that
    all spell integers) in [0, n), which are the indices, with names ``"0" .. str(max)``; or strings none
    of which is a number, which become indices into their sorted unique values. Anything else raises
    ``DataError`` naming ``source`` (e.g. the file) and the first offending values by ``row_names``
    (e.g. "line 5"; default: their position).
    """
    values = list(values)
    prefix = f"{source}: " if source else ""
    if class_names is None and values and all(isinstance(v, str) for v in values):
        problems = _label_strings_problems(values, row_names)
        if problems:
            raise DataError(
                f"{prefix}{_LABEL_RULE}, but of {len(values)} labels " + "; ".join(problems) + ".\n"
                "Fix the labels: write class indices as plain integers 0, 1, 2, ... (no minus sign, no decimal "
                "point), or give every row a class name that is not a number (e.g. 'cat', 'class_1')."
            )
        if _INTEGER.fullmatch(values[0]):
            values = [int(v) for v in values]
        else:
            class_names = sorted(set(values))
            index = {name: i for i, name in enumerate(class_names)}
            values = [index[v] for v in values]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise DataError(f"{prefix}labels must be integers or strings, got values of type {', '.join(kinds)}")
    labels = np.asarray(values, dtype=np.int64).reshape(-1)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"{prefix}labels range over [{labels.min()}, {labels.max()}] but there are {len(class_names)} "
            "classes; labels must be class indices 0 .. num_classes - 1"
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


def _names(class_names: Sequence[str], index: Sequence[int] | None = None, limit: int = 10) -> str:
    index = range(len(class_names)) if index is None else index
    shown = ", ".join(repr(class_names[i]) for i in index[:limit])
    return shown + (f", ... ({len(index)} in all)" if len(index) > limit else "")


def check_splittable(name: str, raw: dict[str, RawSplit], class_names: Sequence[str], config: DataConfig) -> None:
    """Refuse datasets a search cannot use: fewer than 2 classes, an empty split, or a class too small to
    appear in every split carved from train.

    Accepted, they fail late or lie: one class scores test accuracy 1.0, an empty split crashes deep in
    training, and a class missing from a carved split is never validated or tested.
    """
    if len(class_names) < 2:
        listed = f" ({_names(class_names)})" if class_names else ""
        raise DataError(
            f"{name} has {len(class_names)} class{'' if len(class_names) == 1 else 'es'}{listed}; a classifier "
            "needs at least 2 classes. Add images of another class (folder: another class subfolder; csv: rows "
            "with another label) or choose another dataset."
        )
    for split in SPLITS:
        if split in raw and len(raw[split].labels) == 0:
            raise DataError(
                f"{name}: the source's {split} split is empty; every split needs images (train to fit, "
                f"validation to choose architectures, test to report). Give the source's {split} split images, "
                "or leave it out of the source so that it is carved from train."
            )
    if "train" not in raw:
        return  # carve_missing_splits says so
    counts = np.bincount(raw["train"].labels, minlength=len(class_names))[: len(class_names)]
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(
            f"{name}: only class {_names(class_names, present)} has images in the train split, of "
            f"{len(class_names)} classes ({_names(class_names)}); a classifier needs images of at least 2 "
            "classes. Add images of the other classes or choose another dataset."
        )
    missing = [s for s in ("validation", "test") if s not in raw]
    if not missing:
        return
    fractions = [getattr(config, f"{s}_fraction") for s in missing]
    short = [c for c, n in enumerate(counts) if min(part_sizes(int(n), fractions)) < 1]
    if short:
        settings = ", ".join(f"DataConfig.{s}_fraction = {f}" for s, f in zip(missing, fractions))
        listed = ", ".join(f"{class_names[c]!r}: {counts[c]}" for c in short[:20])
        listed += f", ... ({len(short)} classes in all)" if len(short) > 20 else ""
        raise DataError(
            f"{name}: {len(short)} of {len(class_names)} classes have too few images to appear in every split. "
            f"{' and '.join(missing).capitalize()} are carved from the train split class by class ({settings}), "
            f"so each class needs at least {min_class_size(fractions)} images, one or more for train and for each "
            f"carved split. Classes with fewer (class: images): {listed}.\n"
            "Add images to these classes or remove them (a class with 0 images often means integer labels "
            "skip a number: label k is class k), or raise the fractions above, which lowers the minimum."
        )


def assemble_dataset(name: str, raw: dict[str, RawSplit], class_names: Sequence[str], config: DataConfig) -> Dataset:
    """The ``Dataset`` of ``raw`` splits: checked, missing splits carved from train, images converted and resized."""
    check_splittable(name, raw, class_names, config)
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
