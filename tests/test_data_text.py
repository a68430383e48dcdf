"""Text for language models: splits by position, windows, tokenizers, sources, and their errors (offline)."""

import dataclasses
import time

import datasets
import numpy as np
import pytest

from jaxnas.data import DataError, DatasetNotAvailableError, epoch_indices
from jaxnas.data.text import (
    DOCUMENT_SEPARATOR,
    ByteTokenizer,
    TextConfig,
    batches,
    cut_positions,
    load_text,
    pydoc_text,
)

# Non-ASCII on purpose: 2-, 3- and 4-byte UTF-8 characters.
SAMPLE = "Grüße, naïve café! ½ ∑ 日本語のテキスト — emoji 🐍🚀. " * 40


@pytest.fixture(scope="module")
def pydoc():
    return load_text("text:pydoc", seq_len=64)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_pydoc_loads_offline_and_is_the_sorted_distinct_topics(pydoc):
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert text.startswith(topics[sorted(topics)[0]])
    assert len(text.split(DOCUMENT_SEPARATOR)) >= len(set(topics.values()))
    assert pydoc.info.tokenizer == "bytes" and pydoc.info.vocab_size == 256 and pydoc.info.seq_len == 64
    assert sum(pydoc.info.tokens.values()) == len(text.encode("utf-8"))


def test_splits_are_contiguous_disjoint_cuts_of_the_stream_in_order(pydoc):
    stream = ByteTokenizer().encode(pydoc_text())
    n = len(stream)
    spans = pydoc.info.spans
    assert spans["train"] == ("train", 0, spans["validation"][1])
    assert spans["validation"][2] == spans["test"][1] and spans["test"][2] == n
    a, b = cut_positions(n, 0.05, 0.05)
    assert (spans["validation"][1], spans["test"][1]) == (a, b)
    assert b - a == n - b == int(np.floor(n * 0.05 + 0.5))
    for split in ("train", "validation", "test"):
        _, start, stop = spans[split]
        np.testing.assert_array_equal(getattr(pydoc, split).tokens, stream[start:stop])
        assert pydoc.info.tokens[split] == stop - start


def test_splits_are_deterministic_and_fractions_are_configurable(pydoc):
    again = load_text(TextConfig(name="text:pydoc", seq_len=64))
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(again, split).windows, getattr(pydoc, split).windows)
    wider = load_text("text:pydoc", seq_len=64, validation_fraction=0.1, test_fraction=0.2)
    n = sum(wider.info.tokens.values())
    assert wider.info.tokens["test"] == round(n * 0.2) and wider.info.tokens["validation"] == round(n * 0.1)


def test_windows_have_shape_seq_len_plus_one_and_targets_are_inputs_shifted(pydoc):
    for split in ("train", "validation", "test"):
        part = getattr(pydoc, split)
        assert part.windows.dtype == np.int32 and part.windows.shape == (len(part), 65)
        # stride seq_len: every token after the first is a target exactly once (the tail past the last window aside)
        assert len(part) == (len(part.tokens) - 1) // 64
        np.testing.assert_array_equal(part.inputs[:, 1:], part.targets[:, :-1])
        np.testing.assert_array_equal(part.targets.reshape(-1), part.tokens[1 : 1 + 64 * len(part)])
        np.testing.assert_array_equal(part.inputs[1:, 0], part.targets[:-1, -1])
    assert pydoc.info.windows == {s: len(getattr(pydoc, s)) for s in ("train", "validation", "test")}


def test_train_stride_gives_overlapping_train_windows_only():
    dataset = load_text("text:pydoc", seq_len=32, train_stride=8)
    train = dataset.train
    assert dataset.info.train_stride == 8
    assert len(train) == (len(train.tokens) - 33) // 8 + 1
    np.testing.assert_array_equal(train.windows[1, :25], train.windows[0, 8:])
    assert len(dataset.test) == (len(dataset.test.tokens) - 1) // 32  # evaluation windows keep stride seq_len


def test_byte_round_trip_is_lossless_for_non_ascii_text(pydoc):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(SAMPLE)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() <= 255
    assert tokenizer.decode(ids) == SAMPLE
    assert pydoc.decode(pydoc.encode(SAMPLE)) == SAMPLE
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tokenizer.decode([300])


def test_a_text_file_and_a_folder_of_txt_files(tmp_path):
    file = _write(tmp_path / "one.txt", SAMPLE)
    dataset = load_text(f"text:{file}", seq_len=16)
    n = sum(dataset.info.tokens.values())
    assert n == len(SAMPLE.encode("utf-8"))
    whole = np.concatenate([getattr(dataset, s).tokens for s in ("train", "validation", "test")])
    assert dataset.decode(whole) == SAMPLE
    folder = tmp_path / "books"
    (folder / "b").mkdir(parents=True)
    _write(folder / "b" / "2.txt", "second " * 200)
    _write(folder / "a.txt", "first " * 200)
    _write(folder / "skip.md", "not a txt file")
    dataset = load_text(f"text:{folder}", seq_len=16)
    whole = np.concatenate([getattr(dataset, s).tokens for s in ("train", "validation", "test")])
    assert dataset.decode(whole) == "first " * 200 + DOCUMENT_SEPARATOR + "second " * 200


def test_batches_follow_the_seeded_epoch_orders(pydoc):
    got = list(batches(pydoc.validation, 8, seed=3, epochs=2))
    assert len(got) == 2 * (len(pydoc.validation) // 8)
    inputs, targets = got[0]
    assert inputs.shape == targets.shape == (8, 64) and inputs.dtype == np.int32
    index = epoch_indices(len(pydoc.validation), 8, seed=3, epoch=1)
    for row, (inputs, targets) in zip(index, got[len(index) :]):
        np.testing.assert_array_equal(inputs, pydoc.validation.inputs[row])
        np.testing.assert_array_equal(targets, pydoc.validation.targets[row])
    ordered = np.concatenate([x for x, _ in batches(pydoc.test, 5, 0, shuffle=False, drop_remainder=False)])
    np.testing.assert_array_equal(ordered, pydoc.test.inputs)


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("pydoc", {}, r"unknown text 'pydoc'.*'text:pydoc'"),
        ("text:", {}, r"unknown text 'text:'"),
        ("text:/no/such/file.txt", {}, r"no such file or folder"),
        ("text:pydoc", {"seq_len": 30000}, r"validation split has 23\d\d\d tokens.*seq_len <= 23\d\d\d would fit"),
        ("text:pydoc", {"tokenizer": "no-such-org/no-such-tokenizer"}, r"unknown tokenizer.*offline.*'bytes'"),
        ("text:pydoc", {"tokenizer": "./no/tokenizer.json"}, r"tokenizer '\./no/tokenizer\.json': no such file"),
    ],
)
def test_errors_say_what_was_wrong_and_what_would_do(name, fields, message):
    with pytest.raises(DataError, match="(?s)" + message):
        load_text(name, **{"seq_len": 8, **fields})


def test_empty_text_binary_file_and_empty_folder_are_refused(tmp_path):
    blank = _write(tmp_path / "blank.txt", " \n\n ")
    with pytest.raises(DataError, match="holds no text"):
        load_text(f"text:{blank}", seq_len=4)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 at offset 3.*iconv"):
        load_text(f"text:{tmp_path / 'latin1.txt'}", seq_len=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_text(f"text:{tmp_path / 'empty'}", seq_len=4)


def test_a_split_too_short_for_one_window_names_its_token_count(tmp_path):
    file = _write(tmp_path / "short.txt", "x" * 100)  # validation and test get 5 tokens each
    with pytest.raises(DataError, match=r"validation split has 5 tokens.*seq_len <= 4 would fit"):
        load_text(f"text:{file}", seq_len=8)
    assert load_text(f"text:{file}", seq_len=4).info.windows == {"train": 22, "validation": 1, "test": 1}


def test_hf_missing_local_folder_is_named(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="no such file or folder"):
        load_text(f"hf:{tmp_path / 'nowhere'}", seq_len=8, cache_dir=str(tmp_path))


def test_seq_len_is_required_with_a_name_and_a_config_is_overridden_by_keywords():
    with pytest.raises(TypeError, match="seq_len is required"):
        load_text("text:pydoc")
    assert load_text(TextConfig(seq_len=50), seq_len=40).info.seq_len == 40
    assert load_text(TextConfig(seq_len=50)).info.seq_len == 50


def test_config_values_are_checked():
    too_much = {"validation_fraction": 0.6, "test_fraction": 0.5}
    wrong = ({"seq_len": 0}, {"train_stride": 0}, {"test_fraction": 1.0}, too_much)
    for fields in wrong:
        with pytest.raises(ValueError, match="TextConfig"):
            TextConfig(**fields)


def test_hf_saved_dataset_uses_its_own_splits_and_carves_the_missing_one(tmp_path):
    rows = {"train": [f"train row {i} ünïcode" for i in range(60)], "test": [f"test row {i}" for i in range(20)]}
    splits = {s: datasets.Dataset.from_dict({"body": r, "n": list(range(len(r)))}) for s, r in rows.items()}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    dataset = load_text(f"hf:{tmp_path / 'saved'}", seq_len=16, text_column="body", cache_dir=str(tmp_path))
    assert dataset.decode(dataset.test.tokens) == DOCUMENT_SEPARATOR.join(rows["test"])
    train_text = DOCUMENT_SEPARATOR.join(rows["train"]).encode("utf-8")
    n = len(train_text)
    assert dataset.info.spans["test"] == ("test", 0, len(dataset.test.tokens))
    assert dataset.info.spans["validation"] == ("train", n - round(n * 0.05), n)
    assert bytes(np.concatenate([dataset.train.tokens, dataset.validation.tokens]).astype(np.uint8)) == train_text
    with pytest.raises(DataError, match=r"no text column 'text'.*columns are body, n"):
        load_text(f"hf:{tmp_path / 'saved'}", seq_len=16, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"holds int values"):
        load_text(f"hf:{tmp_path / 'saved'}", seq_len=16, text_column="n", cache_dir=str(tmp_path))


def test_hf_local_json_file_folder_loads_offline(tmp_path):
    folder = tmp_path / "json"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": [SAMPLE, "", "more text " * 50]}).to_json(str(folder / "train.jsonl"))
    dataset = load_text(f"hf:{folder}", seq_len=16, cache_dir=str(tmp_path / "cache"))
    whole = np.concatenate([getattr(dataset, s).tokens for s in ("train", "validation", "test")])
    assert dataset.decode(whole) == SAMPLE + DOCUMENT_SEPARATOR + "more text " * 50  # empty rows are skipped


def test_hf_hub_name_offline_fails_fast_naming_the_offline_text_sources(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatasetNotAvailableError) as error:
        load_text("hf:Salesforce/wikitext", seq_len=16, hf_config="wikitext-2-raw-v1", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    message = str(error.value)
    assert "'Salesforce/wikitext'" in message and "text:pydoc" in message and "text:<path>" in message
    assert "mnist5k" not in message  # image datasets are no alternative for text


def test_hf_fast_tokenizer_from_a_local_folder(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("Ġt", "h")]  # "Ġ" is the byte-level space
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    text = _write(tmp_path / "t.txt", SAMPLE + " the thin thread" * 30)
    dataset = load_text(f"text:{text}", seq_len=8, tokenizer=str(tmp_path / "tok"))
    assert dataset.info.vocab_size == 258 and dataset.info.tokenizer == str(tmp_path / "tok")
    whole = np.concatenate([getattr(dataset, s).tokens for s in ("train", "validation", "test")])
    assert sum(dataset.info.tokens.values()) < len(text.read_bytes())  # the merges shorten the stream
    assert dataset.decode(whole) == text.read_text(encoding="utf-8")
    (tmp_path / "no_tok").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_text(f"text:{text}", seq_len=8, tokenizer=str(tmp_path / "no_tok"))


def test_dataset_is_frozen(pydoc):
    with pytest.raises(dataclasses.FrozenInstanceError):
        pydoc.train = pydoc.test
    assert not pydoc.train.windows.flags.writeable
