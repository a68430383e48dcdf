"""``DataConfig``: which dataset to load and how to split and shape it.

Field metadata (``help``, ``choices``, ``min``, ``max``) is read by the config loader to build CLI help
and to check values; ``__post_init__`` checks the same rules so a config built in Python is checked too.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

EMBEDDED_NAMES = ("mnist5k", "digits")
SOURCE_PREFIXES = ("tfds:", "hf:", "folder:", "csv:", "text:")
TEXT_PREFIX = "text:"
"""Text for language models (``jaxnas.data.text``); ``hf:`` names are text when the search space is ``lm``."""
NAME_FORMS = (
    "'mnist5k' (embedded, 5,000 real MNIST digits)",
    "'digits' (embedded, scikit-learn 8x8 digits)",
    "'tfds:<name>[/<config>][:<version>]' (a TFDS dataset prepared as array_record under data_dir)",
    "'hf:<hub name | builder name | local folder>' (Hugging Face datasets)",
    "'folder:<path>' (one subfolder of images per class)",
    "'csv:<path>' (a CSV with an image path column and a label column)",
    "'text:pydoc' or 'text:<file | folder of .txt>' (text for space.name=lm; hf:<name> too, with text_column)",
)


def _field(default, help: str, **limits):
    return dataclasses.field(default=default, metadata={"help": help, **limits})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from, how it is resized, and how missing splits are carved."""

    name: str = _field(
        "mnist5k",
        "Dataset: 'mnist5k', 'digits', 'tfds:<name>[/<config>][:<version>]', 'hf:<name or local folder>', "
        "'folder:<path>' or 'csv:<path>'.",
    )
    data_dir: str | None = _field(
        None,
        "tfds: the TFDS data dir holding prepared datasets (default $TFDS_DATA_DIR or ~/tensorflow_datasets); "
        "hf: passed to datasets.load_dataset as data_dir (e.g. name='hf:imagefolder').",
    )
    cache_dir: str | None = _field(
        None,
        "Where jaxnas keeps prepared embedded datasets and the Hugging Face cache "
        "(default $JAXNAS_CACHE or ~/.cache/jaxnas).",
    )
    image_size: tuple[int, int] | None = _field(
        None,
        "Resize every image to (height, width) pixels, bilinear. Required for folder: and csv:; "
        "default for other sources: keep the source's size.",
        min=1,
    )
    channels: int | None = _field(
        None,
        "Image channels: 1 (grayscale) or 3 (RGB). Default: 3 if any image is colour, else 1.",
        choices=(1, 3),
    )
    validation_fraction: float = _field(
        0.1,
        "Fraction (0 < f < 1) of the train split carved out as validation when the source has no validation "
        "split (folder:, csv:, some tfds:/hf: datasets; the embedded datasets have fixed splits).",
        min=0.0,
        max=1.0,
    )
    test_fraction: float = _field(
        0.2,
        "Fraction (0 < f < 1) of the train split carved out as test when the source has no test split.",
        min=0.0,
        max=1.0,
    )
    split_seed: int = _field(0, "Seed of the stratified carving of missing splits.", min=0)
    image_column: str = _field("image", "Name of the image feature / column (tfds:, hf:).")
    label_column: str = _field("label", "Name of the label feature / column (tfds:, hf:, csv:).")
    path_column: str = _field("path", "csv: column holding image paths (relative ones are read from the CSV's folder).")
    hf_config: str | None = _field(None, "hf: dataset configuration name (datasets.load_dataset's name=).")
    seq_len: int = _field(128, "Text (space.name=lm): tokens a model reads per window (a window holds seq_len + 1).",
                          min=1)
    tokenizer: str = _field(
        "bytes", "Text: 'bytes' (UTF-8 bytes, vocabulary 256) or a Hugging Face fast tokenizer (a tokenizer.json, a "
        "folder holding one, or a hub name already in the Hugging Face cache).",
    )
    train_stride: int | None = _field(
        None, "Text: tokens between the starts of consecutive train windows (default seq_len; larger strides "
        "train on fewer windows).", min=1,
    )
    text_column: str = _field("text", "Text from hf:<name>: the column holding the text.")

    def __post_init__(self):
        if not isinstance(self.name, str) or not (
            self.name in EMBEDDED_NAMES
            or any(self.name.startswith(p) and len(self.name) > len(p) for p in SOURCE_PREFIXES)
        ):
            raise ValueError(
                f"DataConfig.name: unknown dataset {self.name!r}. Accepted forms:\n  " + "\n  ".join(NAME_FORMS)
            )
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
                raise ValueError(
                    f"DataConfig.image_size: got {self.image_size!r}; expected (height, width), two integers >= 1."
                )
            # YAML gives lists; keep the frozen config hashable and comparable.
            object.__setattr__(self, "image_size", size)
        elif self.name.startswith(("folder:", "csv:")):
            raise ValueError(
                f"DataConfig.image_size: required for {self.name.split(':')[0]}: datasets (their images may "
                "differ in size); set it to (height, width), e.g. (32, 32)."
            )
        if self.channels not in (None, 1, 3):
            raise ValueError(f"DataConfig.channels: got {self.channels!r}; expected 1, 3 or None (follow the images).")
        for field in ("validation_fraction", "test_fraction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"DataConfig.{field}: got {value!r}; expected a number strictly between 0 and 1.")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"DataConfig.validation_fraction + DataConfig.test_fraction: got "
                f"{self.validation_fraction} + {self.test_fraction} >= 1; leave some examples for training."
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise ValueError(f"DataConfig.split_seed: got {self.split_seed!r}; expected an integer >= 0.")
        for field in ("image_column", "label_column", "path_column", "tokenizer", "text_column"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"DataConfig.{field}: got {getattr(self, field)!r}; expected a non-empty string.")

    @property
    def is_text(self) -> bool:
        """Whether ``name`` is a text source of its own form (``text:``); ``hf:`` may be either."""
        return self.name.startswith(TEXT_PREFIX)

    def text_config(self):
        """The `jaxnas.data.text.TextConfig` of these settings (name, seq_len, tokenizer, split fractions, ...)."""
        from jaxnas.data.text import TextConfig  # lazy: jaxnas.data.text imports this module

        return TextConfig(
            name=self.name, seq_len=self.seq_len, tokenizer=self.tokenizer, train_stride=self.train_stride,
            validation_fraction=self.validation_fraction, test_fraction=self.test_fraction,
            text_column=self.text_column, hf_config=self.hf_config, data_dir=self.data_dir, cache_dir=self.cache_dir,
        )

    @property
    def cache_root(self) -> Path:
        """The jaxnas cache folder: ``cache_dir``, else ``$JAXNAS_CACHE``, else ``~/.cache/jaxnas``."""
        return Path(self.cache_dir or os.environ.get("JAXNAS_CACHE") or "~/.cache/jaxnas").expanduser()
