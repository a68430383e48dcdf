"""torch_gating.text: deterministic disjoint splits, offline failures, token windows."""

import time
from pydoc_data.topics import topics

import pytest
import torch

from torch_gating.models import byte_level_tokenizer
from torch_gating.text import (
    TextNotAvailableError,
    file_corpus,
    load_text,
    token_windows,
    tokenize_text,
    tokenize_windows,
    wikitext_articles,
)


def test_pydoc_splits_are_disjoint_cover_every_topic_and_are_deterministic():
    corpus = load_text("pydoc")
    assert corpus == load_text("pydoc")
    validation, test = set(corpus.validation_docs), set(corpus.test_docs)
    assert not validation & test
    distinct = {text.strip() for text in topics.values()}
    assert validation | test == distinct
    assert len(corpus.validation_docs) + len(corpus.test_docs) == len(distinct)
    # Alternating topics keep the two splits of similar size (54% / 46% on Python 3.11).
    share = len(corpus.validation) / (len(corpus.validation) + len(corpus.test))
    assert 0.4 < share < 0.6


def test_calibration_is_every_other_validation_document():
    corpus = load_text("pydoc")
    assert corpus.calibration_docs == corpus.validation_docs[0::2]
    assert corpus.calibration == "\n\n".join(corpus.calibration_docs)
    assert not set(corpus.calibration_docs) & set(corpus.test_docs)


def test_wikitext_offline_fails_within_seconds_naming_pydoc():
    start = time.perf_counter()
    with pytest.raises(TextNotAvailableError, match="--text pydoc"):
        load_text("wikitext-2")
    assert time.perf_counter() - start < 10


def test_unknown_text_names_the_accepted_choices():
    with pytest.raises(TextNotAvailableError, match="'pydoc', 'wikitext-2' or the path"):
        load_text("no-such-corpus")


def test_wikitext_lines_group_into_articles_at_top_level_headings():
    lines = [" = Alpha = \n", "\n", " Alpha text .\n", " = = Section = = \n", " more alpha .\n"]
    lines += [" = Beta = \n", " Beta text .\n"]
    articles = wikitext_articles(lines)
    assert len(articles) == 2
    assert articles[0].startswith("= Alpha =") and "= = Section = =" in articles[0]
    assert articles[1] == "= Beta = \n Beta text ."


def test_file_corpus_is_a_contiguous_half_split_of_paragraphs(tmp_path):
    paragraphs = [f"Paragraph {i} " + "word " * (10 + i) for i in range(10)]
    path = tmp_path / "prose.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    corpus = load_text(path)
    assert corpus == file_corpus(path)
    expected = [p.strip() for p in paragraphs]
    assert list(corpus.validation_docs) + list(corpus.test_docs) == expected
    # Validation takes whole paragraphs while they fit in half of the characters.
    half = sum(map(len, expected)) / 2
    validation_chars = sum(map(len, corpus.validation_docs))
    assert validation_chars <= half < validation_chars + len(corpus.test_docs[0])


def test_file_with_one_paragraph_cannot_be_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one paragraph\nover two lines\n", encoding="utf-8")
    with pytest.raises(TextNotAvailableError, match="at least 2 paragraphs"):
        load_text(path)


def test_tokenize_text_adds_no_special_tokens():
    tokenizer = byte_level_tokenizer()
    ids = tokenize_text(tokenizer, "abc")
    assert ids.dtype == torch.long and ids.tolist() == tokenizer("abc", add_special_tokens=False).input_ids


def test_token_windows_are_full_strided_slices_and_drop_the_tail():
    ids = torch.arange(23)
    windows = token_windows(ids, window=8, stride=5)
    assert windows.shape == (4, 8)  # starts 0, 5, 10, 15; a window at 20 would be short
    for k in range(4):
        assert torch.equal(windows[k], ids[5 * k : 5 * k + 8])
    assert token_windows(ids, window=8).shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ids, window=30)
    assert tokenize_windows(byte_level_tokenizer(), "x" * 20, window=8).shape == (2, 8)
