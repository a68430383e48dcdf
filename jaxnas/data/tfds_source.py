"""``tfds:<name>[/<config>][:<version>]``: a TFDS dataset prepared as array_record, read with no network.

We find the prepared folder ``<data_dir>/<name>[/<config>]/<version>/`` ourselves and read it with
``tfds.builder_from_directory(...).as_data_source()``, which needs neither TensorFlow nor the dataset's
catalog code. We never call ``tfds.builder`` / ``download_and_prepare`` here: offline, those retry the
network for minutes before failing, while a missing folder is known at once. Only when nothing is
prepared do we read the installed TFDS registry (offline), to tell a misspelt name from an unprepared one.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path

import numpy as np

from jaxnas.data.config import DataConfig
from jaxnas.data.core import SPLIT_ALIASES, Dataset, RawSplit, assemble_dataset, encode_labels
from jaxnas.data.errors import DataError, DatasetNotAvailableError
from jaxnas.data.images import as_uint8_hwc

_INFO_FILE = "dataset_info.json"
_READABLE_FORMAT = "array_record"  # the only format tfds.data_source reads
_CATALOG_URL = "https://www.tensorflow.org/datasets/catalog/overview"
# The modules that register TFDS's older builders (tfds.core.registered._import_legacy_builders). TFDS
# imports them in one try block and stops at the first that fails (nearest_neighbors without h5py), which
# would leave e.g. every text and video builder unknown; imported one by one, each failure costs only its own.
_LEGACY_BUILDER_MODULES = (
    "audio",
    "graphs",
    "image",
    "image_classification",
    "object_detection",
    "nearest_neighbors",
    "question_answering",
    "d4rl",
    "ranking",
    "recommendation",
    "rl_unplugged",
    "rlds.datasets",
    "robotics",
    "robomimic",
    "structured",
    "summarization",
    "text",
    "text_simplification",
    "time_series",
    "translate",
    "video",
    "vision_language",
)


def default_data_dir() -> Path:
    """TFDS's own default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``'name[/config][:version]'`` -> (name, config or None, version or None)."""
    spec, _, version = spec.partition(":")
    name, _, config = spec.partition("/")
    if not name or "/" in config:
        raise DataError(f"tfds:{spec}: expected 'tfds:<name>[/<config>][:<version>]'")
    return name, config or None, version or None


def _version_key(folder: Path) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else -1 for p in folder.name.split("."))


def _prepare_hint(name: str, config: str | None, data_dir: Path) -> str:
    builder = f"{name}/{config}" if config else name
    return (
        f"To prepare it, on a machine with internet access run\n"
        f"    pip install tensorflow tensorflow-datasets\n"
        f"    python -c \"import tensorflow_datasets as tfds; tfds.builder('{builder}', data_dir='DIR')"
        f".download_and_prepare(file_format='array_record')\"\n"
        f"  (or: tfds build {builder} --data_dir DIR --file_format array_record)\n"
        f"and copy DIR/{name} to {data_dir / name}.\n"
        "Without TFDS, use local files instead: name='folder:<dir with one subfolder per class>' or "
        "name='csv:<file with image paths and labels>', or the embedded name='mnist5k'."
    )


def catalog_names() -> list[str]:
    """Names of every TFDS builder this installation knows, read offline (no download)."""
    import tensorflow_datasets as tfds

    for module in _LEGACY_BUILDER_MODULES:
        try:
            importlib.import_module(f"tensorflow_datasets.{module}")
        except ImportError:
            pass  # its builders need a package that is not installed; they could not prepare here anyway
    # No community datasets: listing them downloads their index.
    return tfds.list_builders(with_community_datasets=False)


def _check_known(name: str, root: Path) -> None:
    """Refuse a ``name`` that is neither a TFDS builder nor has anything under ``root``: preparation
    steps for a misspelt name would send the user to prepare a dataset that does not exist."""
    from jaxnas.data.embedded import BUILDER_NAME  # registered only once embedded_builder is imported

    if (root / name).exists() or name == BUILDER_NAME:
        return
    names = catalog_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    raise DataError(
        f"unknown TFDS dataset {name!r}: it is not a builder of the installed tensorflow-datasets and "
        f"nothing of it is prepared under {root}{suggestion}\n"
        f"Expected name='tfds:<name>[/<config>][:<version>]' with <name> from the TFDS catalog ({_CATALOG_URL}), "
        f"or a dataset of your own builder prepared as array_record in {root / name}/[<config>/]<version>/ "
        "(set data_dir to the folder holding it)."
    )


def resolve_prepared_dir(spec: str, data_dir: str | os.PathLike | None) -> Path:
    """The prepared ``<data_dir>/<name>[/<config>]/<version>/`` folder of ``spec`` (highest version unless pinned).

    Raises ``DatasetNotAvailableError`` (with preparation steps) when no complete prepared copy exists, and
    when the copy is not array_record; ``DataError`` when the name is not a TFDS builder either. Reads the
    file system, and the TFDS registry only when nothing is prepared.
    """
    name, config, version = parse_spec(spec)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    base = root / name
    # A version folder is complete once dataset_info.json is in it: TFDS writes it last and renames the
    # folder from 'incomplete.*' into place, so half-written copies never match.
    patterns = [f"{config}/*/{_INFO_FILE}"] if config else [f"*/{_INFO_FILE}", f"*/*/{_INFO_FILE}"]
    found = [
        p.parent
        for pattern in patterns
        for p in base.glob(pattern)
        if not p.parent.name.startswith(("incomplete.", "."))
    ]
    if version:
        found = [p for p in found if p.name == version]
    if not found:
        _check_known(name, root)
        what = f"{name}" + (f"/{config}" if config else "") + (f" version {version}" if version else "")
        expected = base / (config or "[<config>]") / (version or "<version>") / _INFO_FILE
        raise DatasetNotAvailableError(
            f"TFDS dataset {what} is not prepared under {root} (no {expected}).\n" + _prepare_hint(name, config, root)
        )
    configs = sorted({p.parent.name for p in found if p.parent != base})
    if not config and len(configs) > 1:
        raise DataError(
            f"TFDS dataset {name} is prepared in several configs under {base}: {', '.join(configs)}; "
            f"choose one with name='tfds:{name}/<config>' (e.g. 'tfds:{name}/{configs[0]}')."
        )
    folder = max(found, key=_version_key)
    info = json.loads((folder / _INFO_FILE).read_text())
    formats = {info.get("fileFormat", "tfrecord"), *info.get("alternativeFileFormats", [])}
    if _READABLE_FORMAT not in formats:
        raise DatasetNotAvailableError(
            f"TFDS dataset at {folder} is stored as {', '.join(sorted(formats))}, but tfds.data_source reads only "
            f"array_record. Convert it (needs TensorFlow): tfds convert_format --dataset_version_dir {folder} "
            f"--out_file_format array_record\nor prepare it again with file_format='array_record'.\n"
            + _prepare_hint(name, config, root)
        )
    return folder


def read_prepared(folder: Path, image_column: str, label_column: str) -> tuple[dict[str, RawSplit], tuple[str, ...]]:
    """The splits of a prepared TFDS folder as ``RawSplit``s keyed train / validation / test, and class names.

    Other split names (e.g. 'unsupervised') are not read.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(folder, file_format=_READABLE_FORMAT)
    features = builder.info.features
    for role, column in (("image", image_column), ("label", label_column)):
        if column not in features:
            raise DataError(
                f"TFDS dataset at {folder} has no {role} feature {column!r}; its features are "
                f"{', '.join(sorted(features))}. Set DataConfig.{role}_column to one of them."
            )
    label_feature = features[label_column]
    class_names = list(label_feature.names) if isinstance(label_feature, tfds.features.ClassLabel) else None
    available = set(builder.info.splits)
    raw: dict[str, RawSplit] = {}
    values: dict[str, list] = {}
    for split, aliases in SPLIT_ALIASES.items():
        source_name = next((a for a in aliases if a in available), None)
        if source_name is None:
            continue
        source = builder.as_data_source(split=source_name)
        records = source.__getitems__(list(range(len(source))))
        raw[split] = RawSplit([as_uint8_hwc(r[image_column]) for r in records], np.zeros(0, np.int64))
        values[split] = [r[label_column] for r in records]
    if "train" not in raw:
        raise DataError(f"TFDS dataset at {folder} has no 'train' split (it has: {', '.join(sorted(available))})")
    labels, class_names = encode_labels([_label_value(v) for split in raw for v in values[split]], class_names)
    bounds = np.cumsum([len(values[split]) for split in raw])[:-1]
    for split, split_labels in zip(list(raw), np.split(labels, bounds)):
        raw[split] = raw[split]._replace(labels=split_labels)
    return raw, class_names


def _label_value(value) -> int | str:
    """A decoded TFDS label (numpy integer, or bytes for text features) as a Python int or str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def load_tfds(config: DataConfig) -> Dataset:
    """The ``Dataset`` of ``config.name = 'tfds:...'`` from its prepared folder under ``config.data_dir``."""
    folder = resolve_prepared_dir(config.name.removeprefix("tfds:"), config.data_dir)
    raw, class_names = read_prepared(folder, config.image_column, config.label_column)
    return assemble_dataset(config.name, raw, class_names, config)
