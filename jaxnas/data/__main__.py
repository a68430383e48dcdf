"""Data smoke check: ``python -m jaxnas.data --config configs/quick.yaml [key=value ...]``.

Loads the configured dataset, prints what it holds, and writes the fully resolved config and the
summary into the run folder (``output=``). ``--help-config`` lists every key with its help.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from interop._atomic import atomic_write_text
from interop.config import ConfigError, config_help, dump_config, load_config
from jaxnas.config import RunConfig
from jaxnas.data.core import SPLITS, Dataset
from jaxnas.data.errors import DataError
from jaxnas.data.load import load_dataset


def summary(dataset: Dataset, seconds: float) -> tuple[str, dict]:
    """Printable lines and a JSON-able dict: metadata, then per split shape, dtype, range, class counts."""
    info = dataset.info
    names = ", ".join(info.class_names[:20]) + (", ..." if info.num_classes > 20 else "")
    lines = [
        f"{info.name}: image_shape {info.image_shape} (H, W, C), {info.num_classes} classes [{names}], "
        f"loaded in {seconds:.2f} s",
    ]
    record = {"name": info.name, "image_shape": list(info.image_shape), "class_names": list(info.class_names)}
    for name in SPLITS:
        split = getattr(dataset, name)
        counts = np.bincount(split.labels, minlength=info.num_classes).tolist()
        lo, hi = float(split.images.min()), float(split.images.max())
        lines.append(
            f"  {name:<10} images {split.images.shape} {split.images.dtype} in [{lo:.3f}, {hi:.3f}], "
            f"labels {split.labels.dtype}, per class {counts}"
        )
        record[name] = {"shape": list(split.images.shape), "min": lo, "max": hi, "per_class": counts}
    return "\n".join(lines), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxnas.data", description="Load a dataset and summarise it.")
    parser.add_argument("--config", help="YAML run config (e.g. configs/quick.yaml); defaults apply without it")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.name=digits")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(config_help(RunConfig)))
        return 0
    try:
        config = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        dataset = load_dataset(config.data)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text, record = summary(dataset, time.perf_counter() - start)
    out = Path(config.output)
    dump_config(config, out / "config.yaml")
    atomic_write_text(out / "data_summary.json", json.dumps(record, indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'config.yaml'} and {out / 'data_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
