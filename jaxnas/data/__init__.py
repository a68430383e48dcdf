"""Data layer: image classification datasets as NHWC float32 splits, text as token windows for language models
(`load_text`, `jaxnas.data.text`), plus seeded batch orders.

    from jaxnas.data import load_dataset, batches
    ds = load_dataset("mnist5k")              # or DataConfig(name="tfds:cifar10", data_dir=...)
    for images, labels in batches(ds.train, batch_size=64, seed=0):
        ...                                    # images [64, 28, 28, 1] float32, labels [64] int32
"""

from jaxnas.data.batching import batches, epoch_indices, epoch_order
from jaxnas.data.config import DataConfig
from jaxnas.data.core import Dataset, DatasetInfo, Split, stratified_split
from jaxnas.data.errors import DataError, DatasetNotAvailableError, UnreadableImagesError
from jaxnas.data.load import load_dataset
from jaxnas.data.text import TextConfig, TextDataset, load_text

__all__ = [
    "DataConfig",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "Split",
    "TextConfig",
    "TextDataset",
    "UnreadableImagesError",
    "batches",
    "epoch_indices",
    "epoch_order",
    "load_dataset",
    "load_text",
    "stratified_split",
]
