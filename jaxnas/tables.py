"""Tabular benchmarks: architectures' precomputed metrics, looked up instead of trained (search mode ``table``).

A table is a CSV file with a header line: an ``arch`` column holding each architecture's string in the
search space's format (`Space.from_string` must accept it) and one or more numeric metric columns, e.g.::

    arch,baseline_acc,analog_acc
    |nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|,94.0664,87.62

Every row is one architecture (no two rows may encode the same one), every metric is a finite number.
`Table.load` checks all of that and names the file, line and column of the first problem.

Shipped tables (``Table.load("<name>", space)``, files in ``jaxnas/tables_data``):

``nb201_analog`` -- all 15,625 NAS-Bench-201 cells (space ``nb201_space()``), converted once from the
``analog-nasbench`` package 0.1.3 (Benmeziane et al., AnalogNAS-Bench, arXiv:2506.18495) by
``scripts/convert_analog_nasbench.py``. Every column is top-1 accuracy in % on the 10,000 CIFAR-10 test
images (the benchmark has no separate validation split); ``nb201_analog.json`` beside it records the source,
the column meanings and the op / edge mapping used:

- ``baseline_acc``: full-precision digital model (200 epochs), evaluated digitally; best 94.0664%, the
  all-``none`` cell 10.0%.
- ``ptq_acc``: that model after 8-bit post-training quantization.
- ``qat_acc``: that model after 20 epochs of 8-bit quantization-aware training.
- ``noisy_acc``: that model's weights on simulated analog in-memory hardware (AIHWKit, PCM noise).
- ``analog_acc``: that model after hardware-aware training on the simulated analog hardware.
- ``noisy_drift_{1m,1h,1d,30d}`` / ``analog_drift_{1m,1h,1d,30d}``: ``noisy_acc`` / ``analog_acc`` after
  1 minute, 1 hour, 1 day, 30 days of conductance drift (means of 25 drift draws, 2 decimals).

Lookups are vectorised: an encoding's mixed-radix number (one digit per choice) is searched among the
table's sorted numbers, so looking up a population int32 ``[P, n_choices]`` costs O(P log N) in numpy.
`QueryCounter` charges lookups against a search's query budget.
"""

from __future__ import annotations

import csv
import difflib
import importlib.resources
import io
import math
import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from jaxnas.spaces.core import Space

SHIPPED = ("nb201_analog",)
"""Names `Table.load` accepts in place of a path: the tables in ``jaxnas/tables_data``."""

ARCH = "arch"
"""The column holding architecture strings."""


class Table:
    """An immutable tabular benchmark over one search space; build it with `Table.load`.

    Attributes:
      source: the path (or shipped name's file) it was read from, as shown in messages.
      space: the search space its architectures belong to.
      columns: names of its metric columns, in file order.
      encodings: int32 ``[N, n_choices]`` canonical encoding of each row's architecture (read-only).
      values: float64 ``[N, len(columns)]`` metric values (read-only).
    """

    def __init__(self, source: str, space: Space, columns: tuple[str, ...], encodings: np.ndarray, values: np.ndarray):
        self.source, self.space, self.columns = source, space, columns
        self.encodings, self.values = encodings, values
        self.encodings.setflags(write=False)
        self.values.setflags(write=False)
        self._strides = _strides(space, source)
        keys = encodings.astype(np.int64) @ self._strides
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]

    @classmethod
    def load(cls, path_or_name: str | os.PathLike, space: Space) -> Table:
        """Read and check a table: a CSV path, or a shipped name from `SHIPPED` (e.g. ``"nb201_analog"``).

        Raises ValueError naming the file, line and column of the first problem (missing ``arch`` column,
        an architecture the space cannot parse, a repeated architecture, a non-numeric metric), and
        FileNotFoundError for a path that does not exist. The 15,625-row NB201 table loads in about 1.5 s.
        """
        if str(path_or_name) in SHIPPED:
            path = Path(str(importlib.resources.files("jaxnas.tables_data") / f"{path_or_name}.csv"))
        else:
            path = Path(path_or_name).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(
                    f"table {str(path_or_name)!r} not found: expected a CSV file (resolved to {path}) or the name "
                    f"of a shipped table ({', '.join(SHIPPED)})"
                )
        with open(path, encoding="utf-8", newline="") as f:
            return _parse(str(path), f.read(), space)

    def __len__(self) -> int:
        return len(self.encodings)

    def __repr__(self) -> str:
        return f"Table({self.source!r}, space {self.space.name!r}, {len(self)} rows, columns {list(self.columns)})"

    def column(self, name: str) -> np.ndarray:
        """float64 ``[N]``: metric ``name`` of every row, in file order (read-only)."""
        return self.values[:, self._column_index(name)]

    def lookup(self, encodings: ArrayLike, column: str) -> np.ndarray:
        """float64 ``[P]``: metric ``column`` of each architecture in ``encodings`` int ``[P, n_choices]``.

        The encodings must be valid and canonical in the table's space (`Space.validate`); an architecture
        the table does not hold raises NotInTable naming it.
        """
        c = self._column_index(column)
        return self.values[self._rows(encodings), c]

    def best(self, column: str, *, maximize: bool = True) -> tuple[str, float]:
        """(canonical string, value) of the row with the highest (``maximize=False``: lowest) ``column``.

        Ties go to the first such row in the file.
        """
        values = self.column(column)
        row = int(np.argmax(values) if maximize else np.argmin(values))
        return self.space.to_string(self.encodings[row]), float(values[row])

    def _column_index(self, name: str) -> int:
        if name not in self.columns:
            close = difflib.get_close_matches(name, self.columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"table {self.source} has no column {name!r}{hint}; its metric columns are {', '.join(self.columns)}"
            )
        return self.columns.index(name)

    def _rows(self, encodings: ArrayLike) -> np.ndarray:
        """int ``[P]``: row of each encoding in ``encodings`` int ``[P, n_choices]``."""
        enc = np.asarray(encodings)
        if enc.ndim != 2 or enc.shape[1] != self.space.n_choices or not np.issubdtype(enc.dtype, np.integer):
            raise ValueError(
                f"table lookups take integer encodings of shape [P, {self.space.n_choices}] (space "
                f"{self.space.name!r}), got {enc.dtype} of shape {enc.shape}"
            )
        try:
            self.space.validate(enc)
        except ValueError as e:
            raise ValueError(f"lookup in table {self.source}: invalid encodings, {e}") from None
        keys = enc.astype(np.int64) @ self._strides
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self) - 1)
        found = self._sorted_keys[pos] == keys
        if not found.all():
            missing = np.flatnonzero(~found)
            shown = "; ".join(f"row {i}: {self.space.to_string(enc[i])}" for i in missing[:3])
            raise NotInTable(
                f"{len(missing)} of {len(enc)} architectures are not in table {self.source} ({len(self)} rows), "
                f"e.g. {shown}. A table mode search needs a table covering every architecture the space can "
                "propose: use a table for this space or narrow the space to the table's architectures"
            )
        return self._order[pos]


class NotInTable(LookupError):
    """Architectures looked up are missing from the table."""


class BudgetExhausted(RuntimeError):
    """A lookup would take a search past its query budget."""


class QueryCounter:
    """A table whose lookups are charged to a query budget: every architecture looked up is one query.

    Repeats are charged again; remove duplicates (and cache results) before calling `lookup` if a repeat
    should be free.

    Args:
      table: the table to look up.
      budget: the most queries allowed (None: unlimited).
      queries: queries already spent (e.g. by the run being resumed).
    """

    def __init__(self, table: Table, budget: int | None = None, *, queries: int = 0) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"a query budget must be >= 0 (or None for unlimited), got {budget}")
        if queries < 0:
            raise ValueError(f"queries already spent must be >= 0, got {queries}")
        self.table, self.budget, self.queries = table, budget, queries

    @property
    def remaining(self) -> int | None:
        """Queries left (None: unlimited)."""
        return None if self.budget is None else max(self.budget - self.queries, 0)

    def lookup(self, encodings: ArrayLike, column: str) -> np.ndarray:
        """float64 ``[P]``: `Table.lookup`, charging P queries.

        Raises BudgetExhausted, charging nothing, if the P queries do not fit in the remaining budget; a
        failed lookup charges nothing either.
        """
        n = len(np.asarray(encodings))
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExhausted(
                f"query budget exhausted: {self.queries} of {self.budget} queries spent, {n} more requested; "
                f"look up at most {self.remaining} architectures or raise the budget"
            )
        values = self.table.lookup(encodings, column)
        self.queries += n
        return values


def _strides(space: Space, source: str) -> np.ndarray:
    """int64 ``[n_choices]``: place value of each choice in an encoding's mixed-radix number (last choice 1)."""
    cards = [int(c) for c in space.cardinalities]
    if math.prod(cards) >= 2**63:
        raise ValueError(
            f"space {space.name!r} has {math.prod(cards):.3g} encodings, too many to number in int64 for the "
            f"lookup index of table {source}; split the space or use fewer options"
        )
    return np.array([math.prod(cards[i + 1 :]) for i in range(len(cards))], np.int64)


def _parse(source: str, text: str, space: Space) -> Table:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header:
        raise ValueError(
            f"table {source} is empty; expected a header line 'arch,<metric>,...' and one row per architecture"
        )
    where = f"table {source}, line 1 (header)"
    if ARCH not in header:
        raise ValueError(
            f"{where}: no {ARCH!r} column among {header}; the architecture strings go in a column named {ARCH!r}"
        )
    for name in header:
        if not name or header.count(name) > 1:
            raise ValueError(f"{where}: column names must be non-empty and distinct, got {header}")
    if len(header) < 2:
        raise ValueError(f"{where}: only the {ARCH!r} column; add at least one metric column")
    arch_col = header.index(ARCH)
    metric_cols = [i for i in range(len(header)) if i != arch_col]
    lines, archs, values = [], [], []
    for line, row in enumerate(rows, start=2):
        if not row:
            continue  # blank lines, e.g. a trailing newline
        if len(row) != len(header):
            raise ValueError(
                f"table {source}, line {line}: {len(row)} fields, but the header has {len(header)} "
                f"({', '.join(header)})"
            )
        numbers = []
        for i in metric_cols:
            try:
                number = float(row[i])
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(
                    f"table {source}, line {line}, column {header[i]!r}: {row[i]!r} is not a finite number; "
                    "metric columns must hold numbers"
                )
            numbers.append(number)
        lines.append(line)
        archs.append(row[arch_col])
        values.append(numbers)
    if not archs:
        raise ValueError(f"table {source} has a header but no rows; add one row per architecture")
    encodings = _encode_all(space, archs, [f"table {source}, line {line}, column {ARCH!r}" for line in lines])
    first_line = {}
    for line, arch, enc in zip(lines, archs, encodings, strict=True):
        line_before = first_line.setdefault(enc.tobytes(), line)
        if line_before != line:
            raise ValueError(
                f"table {source}, line {line}, column {ARCH!r}: {arch!r} is the same architecture as line "
                f"{line_before}; each architecture may appear once - remove or merge one of the rows"
            )
    columns = tuple(header[i] for i in metric_cols)
    return Table(source, space, columns, encodings, np.array(values, np.float64))


def _encode_all(space: Space, texts: list[str], where: list[str]) -> np.ndarray:
    """int32 ``[N, n_choices]``: ``space.from_string`` of every text; ``where[r]`` locates text r in errors.

    ``from_string`` row by row takes 0.4-1 ms (it re-derives every choice's activity one choice at a time):
    6-14 s for the 15,625 NB201 cells. Here each text is only split by the space's own parser and the rules
    are checked once for the whole batch; a row failing any check is handed to ``from_string``, which stays
    the one authority on what is valid and words the error.
    """
    position = {name: j for j, name in enumerate(space.names)}
    option_index = [{text: i for i, text in enumerate(choice.texts)} for choice in space.choices]
    enc = np.zeros((len(texts), space.n_choices), np.int32)
    given = np.zeros(enc.shape, bool)
    failed = np.zeros(len(texts), bool)
    for r, text in enumerate(texts):
        try:
            parsed = space._parser(text)  # the space's string format; the batch below stands in for encode()
        except ValueError:
            failed[r] = True
            continue
        for name, option in parsed.items():
            j = position.get(name)
            i = None if j is None else option_index[j].get(option)
            if i is None:
                failed[r] = True
                break
            enc[r, j], given[r, j] = i, True
    # from_string accepts exactly the strings that name every active choice and no inactive one, with values
    # the rules allow.
    active = np.asarray(space.active_mask(enc))
    failed |= (given != active).any(-1) | ~np.asarray(space.is_valid(enc))
    for r in np.flatnonzero(failed):
        try:
            enc[r] = space.from_string(texts[r])
        except ValueError as e:
            raise ValueError(f"{where[r]}: not an architecture of space {space.name!r}: {e}") from None
    return enc
