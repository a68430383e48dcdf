"""Text corpora for calibration, tuning and reporting, each split into disjoint validation and test parts.

A :class:`TextCorpus` holds whole documents; the splits never share a document:

- ``pydoc``: the standard library's ``pydoc_data/topics.py`` (≈465 K characters of English prose about
  Python, no download). Documents are the distinct topic texts in sorted key order; even positions go
  to validation, odd positions to test (≈54% / 46% of the characters). The text depends on the Python
  version.
- ``wikitext-2``: ``Salesforce/wikitext`` / ``wikitext-2-raw-v1`` from the Hugging Face hub, its own
  validation and test splits; documents are articles (split at top-level `` = Title = `` headings).
- a local text file: documents are paragraphs (separated by blank lines); the first paragraphs up to
  half of the characters are validation, the rest test (a contiguous cut, so no passage straddles).

Calibration data is always drawn from validation only: every other validation document (positions
0, 2, 4 …), so it spans the whole validation split.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from torch_gating.models import probe_hub

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
SPLITS = ("validation", "test")
DOCUMENT_SEPARATOR = "\n\n"
# A top-level WikiText heading is " = Title = " on its own line; sub-headings use " = = ... = = ".
_WIKITEXT_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


class TextNotAvailableError(RuntimeError):
    """The requested text cannot be loaded here (hub out of reach, dataset not cached, file missing)."""


@dataclass(frozen=True)
class TextCorpus:
    """A corpus split into disjoint validation and test documents; ``source`` says where it came from."""

    name: str
    source: str
    validation_docs: tuple[str, ...]
    test_docs: tuple[str, ...]

    @property
    def validation(self) -> str:
        """All validation documents joined by a blank line."""
        return DOCUMENT_SEPARATOR.join(self.validation_docs)

    @property
    def test(self) -> str:
        """All test documents joined by a blank line; for reporting only, never for tuning."""
        return DOCUMENT_SEPARATOR.join(self.test_docs)

    @property
    def calibration_docs(self) -> tuple[str, ...]:
        """Every other validation document (positions 0, 2, 4 …): a subset of validation, disjoint from test."""
        return self.validation_docs[0::2]

    @property
    def calibration(self) -> str:
        """The calibration documents joined by a blank line."""
        return DOCUMENT_SEPARATOR.join(self.calibration_docs)


def load_text(name: str | os.PathLike) -> TextCorpus:
    """Load ``"pydoc"``, ``"wikitext-2"`` or a local text file as a :class:`TextCorpus`.

    Raises :class:`TextNotAvailableError` (within seconds, never after minutes of retries) when the
    text cannot be obtained.
    """
    name = str(name)
    if name == "pydoc":
        return pydoc_corpus()
    if name == "wikitext-2":
        return wikitext2_corpus()
    path = Path(name).expanduser()
    if path.is_file():
        return file_corpus(path)
    if path.is_dir():
        raise TextNotAvailableError(
            f"The text {name!r} is a folder, not a text file: expected 'pydoc', 'wikitext-2' or the path of a UTF-8 "
            "text file; pass one file of the folder."
        )
    if os.sep in name or (os.altsep and os.altsep in name) or name.startswith((".", "~")) or path.suffix:
        raise TextNotAvailableError(
            f"The text file {name!r} does not exist ({path.absolute()}): expected 'pydoc', 'wikitext-2' or the "
            "path of an existing UTF-8 text file; check the path."
        )
    raise TextNotAvailableError(
        f"Unknown text {name!r}: expected 'pydoc', 'wikitext-2' or the path of an existing text file."
    )


def pydoc_corpus() -> TextCorpus:
    """The standard library's pydoc topics: even-numbered distinct topics (sorted keys) validation, odd ones test."""
    from pydoc_data import topics as pydoc_topics

    # dict.fromkeys drops repeated texts (some topics are aliases, e.g. "if" and "else") and keeps the
    # first one in key order, so no text lands in both splits.
    docs = list(dict.fromkeys(pydoc_topics.topics[key].strip() for key in sorted(pydoc_topics.topics)))
    return TextCorpus(
        name="pydoc",
        source=f"stdlib:{pydoc_topics.__file__}",
        validation_docs=tuple(docs[0::2]),
        test_docs=tuple(docs[1::2]),
    )


def wikitext2_corpus() -> TextCorpus:
    """WikiText-2 (raw) validation and test splits from the Hugging Face hub or the local datasets cache."""
    hint = "Use --text pydoc (no download needed) or a local text file instead."
    if probe_hub(WIKITEXT_REPO, repo_type="dataset") == "unreachable":
        # datasets would retry the hub for ~25 s before failing; in offline mode it reads its cache at once.
        raise TextNotAvailableError(
            f"Cannot load wikitext-2: the Hugging Face hub is unreachable. If WikiText-2 is in your local "
            f"datasets cache, set HF_HUB_OFFLINE=1 to use it. {hint}"
        )
    import datasets  # only this corpus needs it, and importing it takes seconds

    try:
        splits = {split: datasets.load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split=split) for split in SPLITS}
    except OSError as err:  # datasets' ConnectionError and DatasetNotFoundError are both OSErrors
        raise TextNotAvailableError(
            f"Cannot load wikitext-2 ({WIKITEXT_REPO}, {WIKITEXT_CONFIG}): it is not in the local datasets "
            f"cache and the hub cannot be used ({err}). {hint}"
        ) from err
    return TextCorpus(
        name="wikitext-2",
        source=f"hf:{WIKITEXT_REPO}/{WIKITEXT_CONFIG}",
        validation_docs=wikitext_articles(splits["validation"]["text"]),
        test_docs=wikitext_articles(splits["test"]["text"]),
    )


def wikitext_articles(lines: list[str]) -> tuple[str, ...]:
    """Group WikiText lines (each ending in ``\\n``) into articles, cut before each top-level heading."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_ARTICLE_HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return tuple(text for text in ("".join(a).strip() for a in articles) if text)


def file_corpus(path: str | os.PathLike) -> TextCorpus:
    """A UTF-8 text file: paragraphs up to half of the characters are validation, the rest test."""
    path = Path(path)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", read_utf8_text(path)) if p.strip()]
    if len(paragraphs) < 2:
        raise TextNotAvailableError(
            f"{path} has {len(paragraphs)} paragraph(s); a validation/test split needs at least 2 paragraphs "
            "separated by a blank line."
        )
    half = sum(len(p) for p in paragraphs) / 2
    cut, seen = 0, 0
    while cut < len(paragraphs) - 1 and seen + len(paragraphs[cut]) <= half:
        seen += len(paragraphs[cut])
        cut += 1
    cut = max(cut, 1)  # both splits must be non-empty
    return TextCorpus(
        name=path.name,
        source=f"file:{path.resolve()}",
        validation_docs=tuple(paragraphs[:cut]),
        test_docs=tuple(paragraphs[cut:]),
    )


def read_utf8_text(path: Path) -> str:
    """The text of ``path``; :class:`TextNotAvailableError` if it cannot be read or is not UTF-8 text."""
    fix = "--text expects a plain UTF-8 text file (paragraphs separated by blank lines), or use --text pydoc"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextNotAvailableError(f"Cannot read the text file {str(path)!r} ({err.strerror or err}); {fix}.") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextNotAvailableError(
            f"The text file {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start} "
            f"cannot be decoded; a binary file?). {fix}; convert a text in another encoding first, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt"
        ) from None
    if "\0" in text:
        raise TextNotAvailableError(
            f"The text file {str(path)!r} contains NUL bytes (the first at character {text.index(chr(0))}), so it "
            "is binary, not text. "
            f"{fix}."
        )
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``int64`` tensor ``[N]``, without special tokens (no BOS / EOS).

    Called on whole corpora: the tokenizer's ``model_max_length`` is irrelevant here (windows come later).
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_windows(tokenizer, text: str, window: int = 512, stride: int | None = None) -> torch.Tensor:
    """Windows of ``window`` consecutive tokens starting every ``stride`` tokens: ``[n_windows, window]`` int64.

    ``stride`` defaults to ``window`` (non-overlapping). Only full windows are returned: a ragged tail
    shorter than ``window`` is dropped, so every row is a real ``window``-token sequence.
    """
    return token_windows(tokenize_text(tokenizer, text), window=window, stride=stride)


def token_windows(ids: torch.Tensor, window: int = 512, stride: int | None = None) -> torch.Tensor:
    """Full windows of a 1-D id tensor ``[N]``: ``[n_windows, window]``; see :func:`tokenize_windows`."""
    stride = window if stride is None else stride
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}.")
    if ids.numel() < window:
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one window of {window}; use a longer text or a "
            "smaller window."
        )
    return ids.unfold(0, window, stride).contiguous()
