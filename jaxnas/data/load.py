"""``load_dataset``: one call from a name or ``DataConfig`` to train / validation / test splits."""

from __future__ import annotations

from jaxnas.data.config import EMBEDDED_NAMES, DataConfig
from jaxnas.data.core import Dataset


def load_dataset(config: DataConfig | str) -> Dataset:
    """Load ``config`` (or ``DataConfig(name=config)`` for a string) as a ``Dataset``.

    Splits hold ``[N, H, W, C] float32`` images in [0, 1] and ``[N] int32`` labels. Sources are imported
    only when used: TFDS and HF ``datasets`` each take a second or more to import.
    """
    if isinstance(config, str):
        config = DataConfig(name=config)
    if config.is_text:
        from jaxnas.data.errors import DataError

        raise DataError(
            f"data.name={config.name!r} is text, not an image dataset: load it with jaxnas.data.load_text("
            "config.text_config()), or search it with space.name=lm"
        )
    if config.name in EMBEDDED_NAMES:
        from jaxnas.data.embedded import load_embedded

        return load_embedded(config)
    if config.name.startswith("tfds:"):
        from jaxnas.data.tfds_source import load_tfds

        return load_tfds(config)
    if config.name.startswith("hf:"):
        from jaxnas.data.hf_source import load_hf

        return load_hf(config)
    from jaxnas.data.files import load_files

    return load_files(config)
