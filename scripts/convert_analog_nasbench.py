"""One-off conversion of the ``analog-nasbench`` package's NB201 results into our table format.

    pip install --no-deps analog-nasbench==0.1.3      # needs numpy and pandas, which we have
    python scripts/convert_analog_nasbench.py         # -> jaxnas/tables_data/nb201_analog.{csv,json}

The package is read only here, through its public API (`AnalogNASBench`), and never at run time: jaxnas
reads the CSV this script writes (`jaxnas.tables`). Its cells are 6-tuples of op codes; `from_analog_tuple`
turns them into our encodings (the mapping is in `jaxnas.spaces.nb201` and in the sidecar JSON written
here). Rows are in encoding order (mixed radix over the six edges), floats are rounded to the precision the
package measured them with, so rebuilding gives the shipped files byte for byte (`tests/test_tables.py`).
The script refuses to write a table that fails these sanity facts of analog-nasbench (15,625 distinct cells, the
all-``none`` cell at 10%, best baseline accuracy 94.07%).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import sys
import types
from pathlib import Path

import numpy as np

from interop._atomic import atomic_write_text
from jaxnas.spaces import from_analog_tuple, nb201_space, to_analog_tuple
from jaxnas.spaces.nb201 import ANALOG_OPS, ANALOG_POSITIONS, EDGES

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jaxnas" / "tables_data" / "nb201_analog.csv"
PACKAGE = "analog-nasbench"
PAPER = "Benmeziane et al., AnalogNAS-Bench: A NAS Benchmark for Analog In-Memory Computing, arXiv:2506.18495"

# Our column -> (the package's metric, decimals, description). Plain accuracies are means of 25 evaluations
# on the 10,000 CIFAR-10 test images, hence exact at 4 decimals (one stray value, 91.80559, loses 1e-5);
# the package stores drift results as "mean ± std" strings with 2 decimals. The stds (spread over 25 drift
# draws) are left out.
COLUMNS = {
    "baseline_acc": ("baseline_accuracy", 4, "full-precision digital model (200 epochs of SGD), evaluated digitally"),
    "ptq_acc": ("ptq_accuracy", 4, "the baseline model after 8-bit post-training quantization (PyTorch x86)"),
    "qat_acc": ("qat_accuracy", 4, "the baseline model after 20 epochs of 8-bit quantization-aware training"),
    "noisy_acc": (
        "noisy_accuracy",
        4,
        "the baseline model's weights on simulated analog in-memory hardware (AIHWKit, PCM noise), no retraining",
    ),
    "analog_acc": (
        "analog_accuracy",
        4,
        "the baseline model after hardware-aware training on simulated analog hardware, evaluated there",
    ),
}
DRIFT = {"1m": 60, "1h": 3_600, "1d": 86_400, "30d": 2_592_000}
for _when, _seconds in DRIFT.items():
    COLUMNS[f"noisy_drift_{_when}"] = (
        f"baseline_drift_{_seconds}",
        2,
        f"noisy_acc after {_seconds:,} s of PCM conductance drift (mean of 25 drift draws)",
    )
for _when, _seconds in DRIFT.items():
    COLUMNS[f"analog_drift_{_when}"] = (
        f"analog_drift_{_seconds}",
        2,
        f"analog_acc after {_seconds:,} s of PCM conductance drift (mean of 25 drift draws)",
    )

N_CELLS = 5**6
ALL_NONE_ACC = 10.0
BEST_BASELINE_ACC = 94.07


def load_benchmark():
    """The package's `AnalogNASBench` (its pickle is loaded on construction)."""
    try:
        import pkg_resources  # the package calls pkg_resources.resource_filename
    except ImportError:
        # setuptools >= 81 no longer ships pkg_resources; the package needs only resource_filename, so this
        # process gets a stand-in built on importlib.resources instead of pinning an old setuptools.
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        sys.modules["pkg_resources"] = shim
    try:
        from analognasbench import AnalogNASBench
    except ImportError:
        raise SystemExit(f"{PACKAGE} is not installed; run: pip install --no-deps {PACKAGE}") from None
    return AnalogNASBench()


def read_cells(bench) -> tuple[np.ndarray, np.ndarray]:
    """(analog cells int32 [N, 6], metric values float64 [N, len(COLUMNS)]) from the package's public API."""
    cells = sorted(bench.list_available_architectures())
    values = np.empty((len(cells), len(COLUMNS)), np.float64)
    for r, cell in enumerate(cells):
        for c, (metric, _, _) in enumerate(COLUMNS.values()):
            value = bench.query_metric(cell, metric)
            values[r, c] = getattr(value, "value", value)  # drift metrics come as DriftMeasurement(value, std)
    return np.array(cells, np.int32), values


def check_sanity(encodings: np.ndarray, values: np.ndarray) -> None:
    """Raise SystemExit unless the table has the known facts of analog-nasbench (15,625 cells, all-none at 10%, best 94.07%)."""
    problems = []
    keys = np.ravel_multi_index(tuple(encodings.T), (5,) * 6)
    if len(keys) != N_CELLS or len(np.unique(keys)) != N_CELLS:
        problems.append(f"expected {N_CELLS} distinct cells, got {len(np.unique(keys))} of {len(keys)} rows")
    baseline = values[:, list(COLUMNS).index("baseline_acc")]
    none = baseline[keys == 0]
    if none.size != 1 or abs(none[0] - ALL_NONE_ACC) > 1e-9:
        problems.append(f"the all-none cell should score {ALL_NONE_ACC}% baseline accuracy, got {none}")
    if abs(baseline.max() - BEST_BASELINE_ACC) > 0.005:
        problems.append(f"best baseline accuracy should be ~{BEST_BASELINE_ACC}%, got {baseline.max()}")
    if problems:
        raise SystemExit(f"{PACKAGE} data fails its sanity checks, nothing written:\n  " + "\n  ".join(problems))


def table_text(archs: list[str], values: np.ndarray) -> str:
    """The CSV: header ``arch,<columns>``, one line per cell; numbers as the shortest repr of the rounded value."""
    decimals = [d for _, d, _ in COLUMNS.values()]
    lines = [",".join(["arch", *COLUMNS])]
    for arch, row in zip(archs, values, strict=True):
        lines.append(",".join([arch, *(repr(round(float(v), d)) for v, d in zip(row, decimals, strict=True))]))
    return "\n".join(lines) + "\n"


def sidecar_text(version: str, n_rows: int) -> str:
    """The JSON describing the CSV: source, column meanings and the op / edge mapping used."""
    meta = {
        "source": {
            "package": PACKAGE,
            "version": version,
            "api": "analognasbench.AnalogNASBench().query_metric(cell, metric)",
            "paper": PAPER,
            "dataset": "CIFAR-10; every accuracy is top-1 % on its 10,000 test images (no separate validation split)",
        },
        "space": "nb201",
        "rows": n_rows,
        "row_order": "ascending encoding, mixed radix over the six edges in NB201 string order",
        "columns": {
            name: {"from": metric, "unit": "%", "decimals": decimals, "description": text}
            for name, (metric, decimals, text) in COLUMNS.items()
        },
        "mapping": {
            "op_codes": {str(code): op for code, op in enumerate(ANALOG_OPS)},
            "tuple_edges": ["0->1", "0->2", "0->3", "1->2", "1->3", "2->3"],
            "nb201_edges": [f"{src}->{to}" for to, src in EDGES],
            "tuple_position_of_nb201_edge": list(ANALOG_POSITIONS),
        },
    }
    return json.dumps(meta, indent=2, ensure_ascii=False) + "\n"


def convert(out: Path) -> None:
    bench = load_benchmark()
    version = importlib.metadata.version(PACKAGE)
    cells, values = read_cells(bench)
    encodings = np.asarray(from_analog_tuple(cells))
    if not np.array_equal(np.asarray(to_analog_tuple(encodings)), cells):
        raise SystemExit("from_analog_tuple / to_analog_tuple do not round-trip the package's cells")
    order = np.lexsort(encodings.T[::-1])  # first edge most significant: encoding order
    encodings, values = encodings[order], values[order]
    check_sanity(encodings, values)
    space = nb201_space()
    archs = [space.to_string(enc) for enc in encodings]
    atomic_write_text(out, table_text(archs, values))
    atomic_write_text(out.with_suffix(".json"), sidecar_text(version, len(archs)))
    baseline = values[:, list(COLUMNS).index("baseline_acc")]
    best = int(np.argmax(baseline))
    print(f"{PACKAGE} {version}: {len(archs)} cells -> {out} ({out.stat().st_size:,} bytes) and its .json")
    print(f"all-none cell: {baseline[0]}%; best baseline_acc {baseline[best]}% for {archs[best]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to write; the JSON goes beside it")
    convert(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
