"""``hf:<target>``: a Hugging Face dataset through ``datasets``.

``<target>`` is, in this order:
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` -> ``datasets.load_from_disk``;
- anything else -> ``datasets.load_dataset(target, name=hf_config, data_dir=data_dir)``: a local folder of
  data files (imagefolder, parquet, csv ...), a packaged builder such as ``imagefolder`` with
  ``data_dir``, or a hub name (needs the network, or the hub dataset already in the cache).

A single ``Dataset`` (no split names) is treated as the train split, from which validation and test are carved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jaxnas.data.config import DataConfig
from jaxnas.data.core import SPLIT_ALIASES, Dataset, RawSplit, assemble_dataset, encode_labels
from jaxnas.data.errors import DataError, DatasetNotAvailableError
from jaxnas.data.images import as_uint8_hwc, pil_to_uint8

_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the folder's top


def load_source(target: str, config: DataConfig):
    """The `datasets.Dataset` / `DatasetDict` of ``hf:<target>`` (a save_to_disk folder, a folder of data files, or
    a hub name read from the cache); `DatasetNotAvailableError` naming the offline alternatives otherwise."""
    import datasets

    folder = Path(target).expanduser()
    if any((folder / marker).is_file() for marker in _SAVED_MARKERS):
        return datasets.load_from_disk(str(folder))
    if target.startswith(("/", "./", "../", "~")) and not folder.exists():
        raise DatasetNotAvailableError(f"hf:{target}: no such file or folder ({folder.resolve()})")
    try:
        return datasets.load_dataset(
            target, name=config.hf_config, data_dir=config.data_dir, cache_dir=str(config.cache_root / "hf")
        )
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        why = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so nothing is downloaded"
            if datasets.config.HF_HUB_OFFLINE
            else "check the name and the network"
        )
        raise DatasetNotAvailableError(
            f"Hugging Face dataset {target!r} could not be loaded: {error}\n"
            f"Hub datasets need the network or a copy already in the cache ({config.cache_root / 'hf'}); {why}.\n"
            "Without the hub, use:\n"
            "  name='hf:<folder>' for a folder from save_to_disk or of data files (imagefolder, parquet, csv),\n"
            "  name='hf:imagefolder' with data_dir='<folder>',\n"
            "  name='folder:<dir with one subfolder per class>' or name='csv:<file of image paths and labels>',\n"
            "  or the embedded name='mnist5k'."
        ) from error


def _image_uint8(value) -> np.ndarray:
    return pil_to_uint8(value) if isinstance(value, Image.Image) else as_uint8_hwc(np.asarray(value))


def choose_splits(loaded, target: str) -> dict:
    """split name -> dataset of what `load_source` gave: each of our splits under the first of its
    ``SPLIT_ALIASES`` the source has (a lone dataset is the train split); DataError without a train split."""
    import datasets

    by_name = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    chosen = {
        split: by_name[name]
        for split, aliases in SPLIT_ALIASES.items()
        if (name := next((a for a in aliases if a in by_name), None)) is not None
    }
    if "train" not in chosen:
        raise DataError(f"hf:{target} has no 'train' split (it has: {', '.join(sorted(by_name))})")
    return chosen


def load_hf(config: DataConfig) -> Dataset:
    """The ``Dataset`` of ``config.name = 'hf:<target>'`` with ``config.image_column`` / ``label_column``."""
    import datasets

    target = config.name.removeprefix("hf:")
    chosen = choose_splits(load_source(target, config), target)
    columns = chosen["train"].column_names
    for role in ("image", "label"):
        column = getattr(config, f"{role}_column")
        if column not in columns:
            raise DataError(
                f"hf:{target} has no {role} column {column!r}; its columns are {', '.join(columns)}. "
                f"Set DataConfig.{role}_column to one of them."
            )
    label_feature = chosen["train"].features[config.label_column]
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    values = {split: list(ds[config.label_column]) for split, ds in chosen.items()}
    labels, class_names = encode_labels([v for split in chosen for v in values[split]], class_names)
    raw, start = {}, 0
    for split, ds in chosen.items():
        images = [_image_uint8(value) for value in ds[config.image_column]]
        raw[split] = RawSplit(images, labels[start : start + len(images)])
        start += len(images)
    return assemble_dataset(config.name, raw, class_names, config)
