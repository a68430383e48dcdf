"""Tabular benchmarks: the shipped NB201 analog table, vectorised lookups, query budgets, and checked loading."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnas.spaces import Choice, Space, is_in, nb201_space
from jaxnas.tables import BudgetExhausted, NotInTable, QueryCounter, Table

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CSV = ROOT / "jaxnas" / "tables_data" / "nb201_analog.csv"
SPACE = nb201_space()
COLUMNS = (
    *("baseline_acc", "ptq_acc", "qat_acc", "noisy_acc", "analog_acc"),
    *("noisy_drift_1m", "noisy_drift_1h", "noisy_drift_1d", "noisy_drift_30d"),
    *("analog_drift_1m", "analog_drift_1h", "analog_drift_1d", "analog_drift_30d"),
)
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
A = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|"
B = "|skip_connect~0|+|none~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|"


@pytest.fixture(scope="module")
def table():
    return Table.load("nb201_analog", SPACE)


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the shipped table
def test_shipped_table_holds_every_nb201_cell_exactly_once(table):
    assert len(table) == 15_625 == SPACE.size()
    assert table.columns == COLUMNS
    assert table.encodings.dtype == np.int32 and table.encodings.shape == (15_625, 6)
    every = np.stack(np.meshgrid(*[np.arange(5)] * 6, indexing="ij"), -1).reshape(-1, 6)
    # rows are in encoding order, so they are exactly the enumeration of the space
    np.testing.assert_array_equal(table.encodings, every)


def test_shipped_table_sanity_facts_hold(table):
    enc = SPACE.from_string(ALL_NONE)[None]
    for column in COLUMNS:
        assert table.lookup(enc, column)[0] == pytest.approx(10.0)
    assert table.best("baseline_acc") == (BEST, pytest.approx(94.0664))
    assert table.best("baseline_acc", maximize=False) == (ALL_NONE, 10.0)
    values = table.values
    assert values.dtype == np.float64 and values.shape == (15_625, len(COLUMNS))
    assert np.all((values >= 0) & (values <= 100)), "accuracies are percentages"


def test_shipped_table_sidecar_documents_every_column_and_the_mapping():
    meta = json.loads(SHIPPED_CSV.with_suffix(".json").read_text())
    assert tuple(meta["columns"]) == COLUMNS
    assert all(c["unit"] == "%" and c["description"] for c in meta["columns"].values())
    assert (meta["source"]["package"], meta["source"]["version"]) == ("analog-nasbench", "0.1.3")
    assert meta["rows"] == 15_625
    assert meta["mapping"]["tuple_position_of_nb201_edge"] == [0, 1, 3, 2, 4, 5]
    ops = ["skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3"]
    assert list(meta["mapping"]["op_codes"].values()) == ops


@pytest.mark.skipif(
    importlib.util.find_spec("analognasbench") is None,
    reason="analog-nasbench is not installed (pip install --no-deps analog-nasbench==0.1.3) - it is only "
    "needed to rebuild the shipped table",
)
def test_conversion_rebuilds_the_shipped_table_byte_for_byte(tmp_path):
    out = tmp_path / "nb201_analog.csv"
    # A subprocess, because the script gives its own process a pkg_resources stand-in.
    script = ROOT / "scripts" / "convert_analog_nasbench.py"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert "best baseline_acc 94.0664%" in run.stdout
    assert out.read_bytes() == SHIPPED_CSV.read_bytes()
    assert out.with_suffix(".json").read_bytes() == SHIPPED_CSV.with_suffix(".json").read_bytes()


# ------------------------------------------------------------------ lookups
def test_lookup_of_random_encodings_equals_a_row_scan(table):
    enc = np.random.default_rng(0).integers(0, 5, size=(300, 6))
    for column in ("baseline_acc", "analog_drift_1d"):
        got = table.lookup(enc, column)
        assert got.dtype == np.float64 and got.shape == (300,)
        expected = [table.column(column)[np.flatnonzero((table.encodings == e).all(1))[0]] for e in enc]
        np.testing.assert_array_equal(got, expected)


def test_lookup_accepts_any_integer_dtype_and_an_empty_population(table):
    enc = SPACE.from_string(BEST)[None]
    for dtype in (np.int8, np.int32, np.int64, np.uint8):
        assert table.lookup(enc.astype(dtype), "baseline_acc").tolist() == [94.0664]
    assert table.lookup(np.zeros((0, 6), np.int32), "baseline_acc").shape == (0,)


def test_lookup_of_an_architecture_missing_from_the_table_names_it(tmp_path):
    small = Table.load(write(tmp_path, f"arch,acc\n{A},1\n{B},2\n"), SPACE)
    np.testing.assert_array_equal(small.lookup(np.stack([SPACE.from_string(B), SPACE.from_string(A)]), "acc"), [2, 1])
    with pytest.raises(NotInTable, match=r"1 of 2 architectures are not in table .*t\.csv \(2 rows\).*row 1: \|none~0"):
        small.lookup(np.stack([SPACE.from_string(A), SPACE.from_string(ALL_NONE)]), "acc")


@pytest.mark.parametrize(
    ("enc", "message"),
    [
        (np.zeros(6, np.int32), r"shape \[P, 6\].*shape \(6,\)"),
        (np.zeros((2, 5), np.int32), r"shape \[P, 6\].*shape \(2, 5\)"),
        (np.zeros((2, 6), np.float32), r"integer encodings.*float32"),
        (np.array([[0, 0, 0, 0, 0, 5]]), r"invalid encodings, row 0: choice '3<-2' holds index 5.*options are 0..4"),
        (np.array([[0, 0, 0, 0, 0, -1]]), r"invalid encodings, row 0: choice '3<-2' holds index -1"),
    ],
)
def test_lookup_rejects_malformed_encodings(table, enc, message):
    with pytest.raises(ValueError, match=message):
        table.lookup(enc, "baseline_acc")


def test_unknown_column_suggests_the_closest_one(table):
    with pytest.raises(ValueError, match=r"no column 'analog_drift_1day' \(did you mean 'analog_drift_1d'\?\)"):
        table.lookup(np.zeros((1, 6), np.int32), "analog_drift_1day")
    with pytest.raises(ValueError, match="no column 'val_acc'.*its metric columns are baseline_acc, ptq_acc"):
        table.best("val_acc")


# ------------------------------------------------------------------ query budget
def test_every_looked_up_architecture_is_one_query_repeats_included(table):
    counter = QueryCounter(table, budget=10)
    enc = np.stack([SPACE.from_string(BEST)] * 3)
    np.testing.assert_array_equal(counter.lookup(enc, "baseline_acc"), [94.0664] * 3)
    counter.lookup(enc[:1], "analog_acc")
    assert (counter.queries, counter.remaining) == (4, 6)


def test_a_lookup_past_the_budget_fails_and_charges_nothing(table):
    counter = QueryCounter(table, budget=5, queries=3)
    enc = np.zeros((3, 6), np.int32)
    with pytest.raises(BudgetExhausted, match="3 of 5 queries spent, 3 more requested; look up at most 2"):
        counter.lookup(enc, "baseline_acc")
    assert counter.queries == 3
    counter.lookup(enc[:2], "baseline_acc")
    assert (counter.queries, counter.remaining) == (5, 0)
    with pytest.raises(BudgetExhausted):
        counter.lookup(enc[:1], "baseline_acc")


def test_a_failed_lookup_charges_nothing_and_no_budget_means_unlimited(table):
    counter = QueryCounter(table)
    with pytest.raises(ValueError, match="no column"):
        counter.lookup(np.zeros((4, 6), np.int32), "nope")
    assert counter.queries == 0 and counter.remaining is None
    counter.lookup(np.zeros((1000, 6), np.int32), "baseline_acc")
    assert counter.queries == 1000


@pytest.mark.parametrize(("budget", "queries"), [(-1, 0), (5, -2)])
def test_query_counter_rejects_negative_counts(table, budget, queries):
    with pytest.raises(ValueError, match=">= 0"):
        QueryCounter(table, budget, queries=queries)


# ------------------------------------------------------------------ loading and its errors
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"t\.csv is empty; expected a header line 'arch,<metric>,...'"),
        ("name,acc\nx,1\n", r"t\.csv, line 1 \(header\): no 'arch' column among \['name', 'acc'\]"),
        ("arch\nx\n", r"line 1 \(header\): only the 'arch' column; add at least one metric column"),
        ("arch,acc,acc\n", r"line 1 \(header\): column names must be non-empty and distinct"),
        ("arch,acc\n", r"t\.csv has a header but no rows"),
        (f"arch,acc\n{A},1\n|none~0|+|none~0|,2\n", r"line 3, column 'arch': not an .* space 'nb201': malformed"),
        (f"arch,acc\n{A},1\n{A.replace('avg_pool_3x3', 'max_pool')},2\n", r"line 3, column 'arch'.*'max_pool'"),
        (f"arch,acc\n{A},1\n{B},2\n{A},3\n", r"line 4, column 'arch': '.*' is the same architecture as line 2"),
        (f"arch,acc,loss\n{A},1,0.5\n{B},abc,0.1\n", r"line 3, column 'acc': 'abc' is not a finite number"),
        (f"arch,acc,loss\n{A},1,\n", r"line 2, column 'loss': '' is not a finite number"),
        (f"arch,acc\n{A},nan\n", r"line 2, column 'acc': 'nan' is not a finite number"),
        (f"arch,acc\n{A},1,2\n", r"line 2: 3 fields, but the header has 2 \(arch, acc\)"),
    ],
    ids=[
        *("empty", "no-arch-column", "no-metric", "repeated-column", "no-rows", "unparsable-arch", "unknown-op"),
        *("duplicate-arch", "non-numeric", "empty-cell", "nan", "extra-field"),
    ],
)
def test_bad_tables_are_rejected_naming_file_line_and_column(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Table.load(write(tmp_path, text), SPACE)


def test_missing_file_names_the_shipped_tables(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"table 'nb201_analgo' not found.*shipped table \(nb201_analog\)"):
        Table.load("nb201_analgo", SPACE)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        Table.load(tmp_path / "missing.csv", SPACE)


def test_arch_column_may_be_anywhere_and_blank_lines_are_ignored(tmp_path):
    small = Table.load(write(tmp_path, f"acc,arch,loss\n1.5,{A},2\n\n-3,{B},1e-3\n"), SPACE)
    assert small.columns == ("acc", "loss") and len(small) == 2
    np.testing.assert_array_equal(small.encodings, np.stack([SPACE.from_string(A), SPACE.from_string(B)]))
    np.testing.assert_array_equal(small.values, [[1.5, 2.0], [-3.0, 1e-3]])
    assert small.best("loss", maximize=False) == (B, 1e-3)


def test_table_arrays_are_read_only(table):
    with pytest.raises(ValueError, match="read-only"):
        table.values[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        table.encodings[0, 0] = 1


# ------------------------------------------------------------------ spaces with conditional choices
TINY = Space(
    "tiny",
    [
        Choice("family", ["mlp", "cnn"]),
        Choice("depth", [1, 2, 3]),
        Choice("kernel", [3, 5], active_if=is_in("family", "cnn")),
    ],
)


def test_tables_for_conditional_spaces_read_like_from_string(tmp_path):
    archs = ["family=mlp;depth=2", "depth=1;family=cnn;kernel=5", "family=cnn;depth=3;kernel=3"]
    path = write(tmp_path, "arch,acc\n" + "".join(f"{a},{i}\n" for i, a in enumerate(archs)))
    small = Table.load(path, TINY)
    np.testing.assert_array_equal(small.encodings, np.stack([TINY.from_string(a) for a in archs]))
    assert small.best("acc") == ("family=cnn;depth=3;kernel=3", 2.0)
    # a non-canonical encoding (kernel set although family is mlp) is refused rather than guessed at
    with pytest.raises(ValueError, match="choice 'kernel' does not apply.*space.canonicalize"):
        small.lookup(np.array([[0, 1, 1]]), "acc")


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("family=mlp;depth=2;kernel=3", "choice 'kernel' does not apply to this architecture"),
        ("family=cnn;depth=2", "choice 'kernel' is missing"),
        ("family=cnn;depth=4;kernel=3", "choice 'depth' has no option '4'"),
        ("family=cnn;width=4;kernel=3", "no choice 'width'"),
    ],
)
def test_conditional_space_errors_are_the_spaces_own(tmp_path, arch, message):
    with pytest.raises(ValueError, match=rf"line 3, column 'arch': not an architecture of space 'tiny': .*{message}"):
        Table.load(write(tmp_path, f"arch,acc\nfamily=mlp;depth=1,0\n{arch},1\n"), TINY)
