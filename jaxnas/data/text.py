"""Text for language models: one token stream per source, cut by position into train / validation / test
and served as windows of ``seq_len + 1`` tokens.

Names (``TextConfig.name``):

- ``text:pydoc``: the standard library's pydoc topics (``pydoc_data.topics``, about 465 K characters of English
  about Python, shipped with Python: no download). The distinct topic texts in sorted key order, joined by
  ``DOCUMENT_SEPARATOR``. The text depends on the Python version.
- ``text:<path>``: a UTF-8 text file as it is (a file named ``pydoc``: ``text:./pydoc``), or a folder of ``.txt``
  files (found recursively, read in sorted path order, joined by ``DOCUMENT_SEPARATOR``).
- ``hf:<target>``: the ``text_column`` of a Hugging Face dataset, found as ``hf:`` image datasets are
  (``jaxnas.data.hf_source``): a folder from ``save_to_disk``, a folder of data files (json, csv, parquet,
  txt), a builder name with ``data_dir``, or a hub name (the network, or a copy in the cache). Non-empty rows
  are joined by ``DOCUMENT_SEPARATOR``; the source's own validation / test splits are used when it has them.

Splits: the tokens of a stream are cut by position, never shuffled: the first part is train, the next
``validation_fraction`` validation, the last ``test_fraction`` test. Each split is contiguous and the three are
disjoint, so no window straddles two splits and no text of one split repeats in another (pydoc's alias topics
would, hence the distinct texts). Splits the source has (hf:) are used as they are; only missing ones are cut,
from the end of train.

Windows: row ``k`` of ``TextSplit.windows`` ``[N, seq_len + 1] int32`` holds tokens
``[k * stride, k * stride + seq_len + 1)`` of the split; inputs are ``[:, :-1]`` and targets ``[:, 1:]``.
Validation and test use ``stride = seq_len``: consecutive windows share one token (the last target of one is the
first input of the next), so every token after the first is a target exactly once. Train uses
``train_stride`` (default ``seq_len``; smaller strides give overlapping windows). Tokens past the last whole
window are not used. Windows are read-only views of the split's tokens, so a stride of 1 costs no memory.

Tokenizers: ``bytes`` (default) is the UTF-8 bytes of the text, vocabulary 256, lossless; anything else is a
Hugging Face fast tokenizer (a ``tokenizer.json``): its path, a folder holding one (``save_pretrained``), or a
hub name already in the Hugging Face cache (downloaded only when the hub is not offline). It is read with
``tokenizers`` rather than ``transformers.AutoTokenizer``, which imports torch (jaxnas never does); remote code
is never run. No special tokens are added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxnas.data.batching import batch_rows
from jaxnas.data.config import DataConfig, _field
from jaxnas.data.core import SPLITS
from jaxnas.data.errors import DataError, DatasetNotAvailableError

DOCUMENT_SEPARATOR = "\n\n"
BYTES = "bytes"
NAME_FORMS = (
    "'text:pydoc' (the standard library's pydoc topics, no download)",
    "'text:<path>' (a UTF-8 text file, or a folder of .txt files)",
    "'hf:<local folder | builder name | hub name>' (a Hugging Face dataset with a text column)",
)
_PATH_STARTS = ("/", "./", "../", "~")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Which text to load, how to tokenize it, how to cut it into splits and windows."""

    name: str = _field("text:pydoc", "Text: 'text:pydoc', 'text:<file or folder of .txt>' or 'hf:<name or folder>'.")
    seq_len: int = _field(128, "Tokens a model reads per window; a window holds seq_len + 1 tokens.", min=1)
    tokenizer: str = _field(
        BYTES,
        "'bytes' (UTF-8 bytes, vocabulary 256) or a Hugging Face fast tokenizer: the path of a tokenizer.json, "
        "a folder holding one, or a hub name already in the Hugging Face cache.",
    )
    train_stride: int | None = _field(
        None, "Tokens between the starts of consecutive train windows (default seq_len: no shared targets).", min=1
    )
    validation_fraction: float = _field(
        0.05, "Fraction (0 < f < 1) of the token stream cut as validation, after train.", min=0.0, max=1.0
    )
    test_fraction: float = _field(
        0.05, "Fraction (0 < f < 1) of the token stream cut as test, at its end.", min=0.0, max=1.0
    )
    text_column: str = _field("text", "hf: the column holding the text.")
    hf_config: str | None = _field(None, "hf: dataset configuration name (datasets.load_dataset's name=).")
    data_dir: str | None = _field(None, "hf: passed to datasets.load_dataset as data_dir (e.g. name='hf:text').")
    cache_dir: str | None = _field(
        None, "Where jaxnas keeps the Hugging Face datasets cache (default $JAXNAS_CACHE or ~/.cache/jaxnas)."
    )

    # The same cache folder as image datasets; hf_source reads it.
    cache_root = DataConfig.cache_root

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TextConfig.name: got {self.name!r}; expected one of:\n  " + "\n  ".join(NAME_FORMS))
        for field, low in (("seq_len", 1), ("train_stride", 1)):
            value = getattr(self, field)
            if value is None and field == "train_stride":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TextConfig.{field}: got {value!r}; expected an integer >= {low}.")
        for field in ("validation_fraction", "test_fraction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"TextConfig.{field}: got {value!r}; expected a number strictly between 0 and 1.")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"TextConfig.validation_fraction + TextConfig.test_fraction: got {self.validation_fraction} + "
                f"{self.test_fraction} >= 1; leave some text for training."
            )
        for field in ("tokenizer", "text_column"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"TextConfig.{field}: got {getattr(self, field)!r}; expected a non-empty string.")


# --- tokenizers -------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: no vocabulary file, every text encodes, decoding is lossless."""

    name = BYTES
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must be in [0, 255], got values in [{ids.min()}, {ids.max()}]")
        # A window may start or end inside a multi-byte character; those bytes decode as U+FFFD.
        return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizers.Tokenizer``); ids without special tokens."""

    def __init__(self, name: str, tokenizer):
        self.name = name
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def _tokenizer_help() -> str:
    return (
        "Expected 'bytes' (UTF-8 bytes, vocabulary 256, nothing to load), the path of a tokenizer.json, a folder "
        "holding one (written by transformers' tokenizer.save_pretrained), or a hub name already in the Hugging "
        "Face cache (download it once with the network: huggingface-cli download <name> tokenizer.json)."
    )


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``name`` names (see the module docstring); ``DataError`` when it cannot be had here."""
    if name == BYTES:
        return ByteTokenizer()
    from tokenizers import Tokenizer

    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"tokenizer {name!r}: the folder has no tokenizer.json (only fast tokenizers are read; a folder "
                f"written by a fast tokenizer's save_pretrained has one). {_tokenizer_help()}"
            )
    if path.is_file():
        try:
            return HFTokenizer(name, Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(
                f"tokenizer {name!r}: {path} is not a tokenizer.json ({error}). {_tokenizer_help()}"
            ) from error
    if name.startswith(_PATH_STARTS) or name.endswith(".json"):
        raise DataError(f"tokenizer {name!r}: no such file or folder ({path.resolve()}). {_tokenizer_help()}")
    return HFTokenizer(name, Tokenizer.from_file(_hub_tokenizer_file(name)))


def _hub_tokenizer_file(name: str) -> str:
    """The cached ``tokenizer.json`` of hub repository ``name``; downloaded only when the hub is not offline."""
    import huggingface_hub
    from huggingface_hub import constants

    # The cache first: it answers at once, online or not.
    try:
        return huggingface_hub.hf_hub_download(name, "tokenizer.json", local_files_only=True)
    except Exception as error:  # not cached, or not a valid repository name
        cached_error = error
    if constants.HF_HUB_OFFLINE:
        raise DataError(
            f"unknown tokenizer {name!r}: it is not a file or folder here and not in the Hugging Face cache, and "
            f"offline mode is on (HF_HUB_OFFLINE), so nothing is downloaded ({type(cached_error).__name__}). "
            f"{_tokenizer_help()}"
        ) from cached_error
    try:
        return huggingface_hub.hf_hub_download(name, "tokenizer.json", etag_timeout=5)
    except Exception as error:  # no such repository, no tokenizer.json in it, or no network
        raise DataError(
            f"unknown tokenizer {name!r}: not a file or folder here, not in the Hugging Face cache, and the hub "
            f"did not give its tokenizer.json ({type(error).__name__}: {error}). {_tokenizer_help()}"
        ) from error


# --- datasets ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """One split: ``tokens`` ``[T] int32``, its contiguous stream; ``windows`` ``[N, seq_len + 1] int32``."""

    tokens: np.ndarray
    windows: np.ndarray

    @property
    def inputs(self) -> np.ndarray:
        """``[N, seq_len] int32``: what the model reads."""
        return self.windows[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        """``[N, seq_len] int32``: the next token at each input position."""
        return self.windows[:, 1:]

    def __len__(self) -> int:
        return int(self.windows.shape[0])


@dataclasses.dataclass(frozen=True)
class TextInfo:
    """What a model needs to know. ``tokens`` / ``windows`` map split name to counts; ``spans`` maps split name
    to ``(stream, start, stop)``: the split is tokens ``[start, stop)`` of the source's ``stream`` (``train``
    unless the source has that split itself)."""

    name: str
    tokenizer: str
    vocab_size: int
    seq_len: int
    train_stride: int
    tokens: dict[str, int]
    windows: dict[str, int]
    spans: dict[str, tuple[str, int, int]]


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Train / validation / test windows of one text, its metadata, and the tokenizer to read ids back."""

    info: TextInfo
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    tokenizer: ByteTokenizer | HFTokenizer = dataclasses.field(repr=False, compare=False)

    def encode(self, text: str) -> np.ndarray:
        """``[T] int32`` token ids of ``text`` (no special tokens)."""
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """The text of token ids (any shape, read in row-major order)."""
        return self.tokenizer.decode(ids)


def read_text_file(path: Path, name: str) -> str:
    """The text of a UTF-8 file; ``DataError`` naming the file when it is not readable UTF-8 text."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{name}: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start} cannot be "
            f"decoded). Expected a UTF-8 text file; convert one in another encoding first, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt"
        ) from None


def pydoc_text() -> str:
    """The standard library's pydoc topics: distinct texts in sorted key order, joined by ``DOCUMENT_SEPARATOR``."""
    from pydoc_data.topics import topics

    # Some topics are aliases with the same text ("if" / "else" style); one copy keeps it out of two splits.
    return DOCUMENT_SEPARATOR.join(dict.fromkeys(topics[key] for key in sorted(topics)))


def _local_text(target: str, name: str) -> str:
    path = Path(target).expanduser()
    if path.is_file():
        return read_text_file(path, name)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{name}: the folder {path} holds no .txt files; expected UTF-8 text files named *.txt.")
        return DOCUMENT_SEPARATOR.join(read_text_file(p, name) for p in files)
    raise DatasetNotAvailableError(
        f"{name}: no such file or folder ({path.resolve()}). Expected 'text:pydoc' or the path of a UTF-8 text file "
        "or of a folder of .txt files."
    )


def _hf_texts(target: str, config: TextConfig) -> dict[str, str]:
    """The text of each split the Hugging Face source has (``train`` at least), rows joined."""
    from jaxnas.data.hf_source import choose_splits, load_source

    try:
        loaded = load_source(target, config)
    except DatasetNotAvailableError as error:
        cause = error.__cause__
        if cause is None:  # a local path that does not exist: the message says so
            raise
        # hf_source's message offers image datasets as alternatives; text needs text ones.
        raise DatasetNotAvailableError(
            f"Hugging Face dataset {target!r} could not be loaded: {str(cause).splitlines()[0]}\n"
            f"Hub datasets need the network or a copy already in the cache ({config.cache_root / 'hf'}).\n"
            "Without the hub, use:\n"
            + "".join(f"  name={form},\n" for form in NAME_FORMS if form.startswith("'text:"))
            + "  or name='hf:<folder>' for a folder from save_to_disk or of data files (json, csv, parquet, txt)."
        ) from cause
    chosen = choose_splits(loaded, target)
    texts = {}
    for split, ds in chosen.items():
        if config.text_column not in ds.column_names:
            raise DataError(
                f"hf:{target} has no text column {config.text_column!r} in its {split} split; its columns are "
                f"{', '.join(ds.column_names)}. Set TextConfig.text_column to one of them."
            )
        rows = ds[config.text_column]
        wrong = next((i for i, row in enumerate(rows) if row is not None and not isinstance(row, str)), None)
        if wrong is not None:
            raise DataError(
                f"hf:{target}: column {config.text_column!r} holds {type(rows[wrong]).__name__} values (row {wrong} of "
                f"the {split} split), not text. Set TextConfig.text_column to a column of strings."
            )
        texts[split] = DOCUMENT_SEPARATOR.join(row for row in rows if row)
    return texts


def _source_texts(config: TextConfig) -> dict[str, str]:
    name = config.name
    if name == "text:pydoc":
        return {"train": pydoc_text()}
    if name.startswith("text:") and len(name) > len("text:"):
        return {"train": _local_text(name.removeprefix("text:"), name)}
    if name.startswith("hf:") and len(name) > len("hf:"):
        return _hf_texts(name.removeprefix("hf:"), config)
    raise DataError(f"unknown text {name!r}. Accepted forms:\n  " + "\n  ".join(NAME_FORMS))


def cut_positions(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(a, b)``: tokens ``[0, a)`` are train, ``[a, b)`` validation, ``[b, n)`` test (rounding halves up)."""
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_validation = int(np.floor(n * validation_fraction + 0.5))
    return n - n_test - n_validation, n - n_test


def windows(tokens: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """``[N, seq_len + 1]`` read-only view of ``tokens``: row ``k`` starts at token ``k * stride``."""
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::stride]


def _check_fits(name: str, split: str, n: int, config: TextConfig, origin: str, carved: bool) -> None:
    """``DataError`` unless the ``n`` tokens of ``split`` hold one window; ``carved``: cut by the fractions."""
    if n >= config.seq_len + 1:
        return
    fix = f"seq_len <= {n - 1} would fit" if n >= 2 else "no seq_len fits"
    more = f" (raise TextConfig.{split}_fraction)" if carved and split != "train" else ""
    raise DataError(
        f"{name}: the {split} split has {n} tokens ({origin}), but a window needs seq_len + 1 = {config.seq_len + 1}; "
        f"{fix}. Lower TextConfig.seq_len, give the split more text{more}, or use a longer text."
    )


def load_text(
    source: TextConfig | str, *, seq_len: int | None = None, tokenizer: str | None = None, **fields
) -> TextDataset:
    """Load ``source`` (a ``TextConfig``, or a name for ``TextConfig(name=source, seq_len=seq_len)``) as a
    ``TextDataset``.

    ``seq_len`` is required with a name (a model's context length is never guessed); ``seq_len``, ``tokenizer``
    and ``fields`` (any other ``TextConfig`` field) override the config's, e.g.
    ``load_text("text:pydoc", seq_len=64, validation_fraction=0.1)``.
    Raises ``DataError`` for an unknown name form, a missing file, an empty text, an unknown tokenizer, or a
    split too short for one window; ``DatasetNotAvailableError`` (a ``DataError``) when the text is not on this
    machine.
    """
    fields = {**fields, **({"seq_len": seq_len} if seq_len is not None else {})}
    fields.update({"tokenizer": tokenizer} if tokenizer is not None else {})
    if isinstance(source, str):
        if seq_len is None:
            raise TypeError(f"load_text({source!r}): seq_len is required with a name, e.g. seq_len=128")
        config = TextConfig(name=source, **fields)
    elif isinstance(source, TextConfig):
        config = dataclasses.replace(source, **fields)
    else:
        raise TypeError(
            f"load_text: expected a name or a TextConfig, got {type(source).__name__} (image datasets' DataConfig "
            "has no text fields; use TextConfig(name=..., seq_len=..., hf_config=..., data_dir=...))."
        )
    texts = _source_texts(config)
    for split, text in texts.items():
        if not text.strip():
            where = f"its {split} split" if len(texts) > 1 else "it"
            raise DataError(f"{config.name} holds no text ({where} is empty or only whitespace); give it some text.")
    tokenizer = load_tokenizer(config.tokenizer)
    streams = {split: tokenizer.encode(text) for split, text in texts.items()}
    missing = [s for s in ("validation", "test") if s not in streams]
    fractions = {s: (getattr(config, f"{s}_fraction") if s in missing else 0.0) for s in ("validation", "test")}
    n = len(streams["train"])
    a, b = cut_positions(n, fractions["validation"], fractions["test"])
    spans = {"train": ("train", 0, a), "validation": ("train", a, b), "test": ("train", b, n)}
    for split in SPLITS:
        if split in streams and split != "train":
            spans[split] = (split, 0, len(streams[split]))
    train_stride = config.train_stride or config.seq_len
    splits = {}
    for split in SPLITS:
        stream, start, stop = spans[split]
        carved = stream == "train" and bool(missing)
        if carved:
            origin = f"tokens [{start}, {stop}) of the {n} in the text, cut by the split fractions"
        else:
            origin = "the source's own split" if split != "train" else f"all {n} tokens of the text"
        _check_fits(config.name, split, stop - start, config, origin, carved)
        tokens = streams[stream][start:stop]
        tokens.flags.writeable = False  # the windows are views of it
        stride = train_stride if split == "train" else config.seq_len
        splits[split] = TextSplit(tokens, windows(tokens, config.seq_len, stride))
    info = TextInfo(
        name=config.name,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        seq_len=config.seq_len,
        train_stride=train_stride,
        tokens={s: len(splits[s].tokens) for s in SPLITS},
        windows={s: len(splits[s]) for s in SPLITS},
        spans=spans,
    )
    return TextDataset(info=info, tokenizer=tokenizer, **splits)


def batches(
    split: TextSplit,
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    drop_remainder: bool = True,
    epochs: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(inputs [B, seq_len] int32, targets [B, seq_len] int32)`` over ``epochs`` passes of ``split``.

    Window orders are ``jaxnas.data.batching``'s (``epoch_order(len(split), seed, epoch)``), so
    ``epoch_indices(len(split), batch_size, seed, epoch)`` indexes ``split.windows`` in the same batches on a device.
    """
    for index in batch_rows(len(split), batch_size, seed, shuffle=shuffle, drop_remainder=drop_remainder,
                            epochs=epochs):
        rows = split.windows[index]
        yield rows[:, :-1], rows[:, 1:]


__all__ = [
    "DOCUMENT_SEPARATOR",
    "ByteTokenizer",
    "HFTokenizer",
    "TextConfig",
    "TextDataset",
    "TextInfo",
    "TextSplit",
    "batches",
    "cut_positions",
    "load_text",
    "load_tokenizer",
    "pydoc_text",
    "windows",
]
