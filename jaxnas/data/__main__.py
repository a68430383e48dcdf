"""Data smoke check: ``python -m jaxnas.data --config configs/quick.yaml [key=value ...]``.

Loads the configured dataset (text, as a language-model search reads it, for ``data.name=text:...`` or
``space.name=lm``), prints what it holds, and writes the fully resolved config and the
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
from jaxnas.data.text import TextDataset, load_text


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


def text_summary(dataset: TextDataset, seconds: float) -> tuple[str, dict]:
    """`summary` of a text dataset: tokenizer, vocabulary, window length, per split tokens and windows, and the
    start of the validation text."""
    info = dataset.info
    lines = [f"{info.name}: {info.tokenizer} tokens (vocabulary {info.vocab_size}), windows of {info.seq_len} "
             f"tokens (train stride {info.train_stride}), loaded in {seconds:.2f} s"]
    record = {"name": info.name, "tokenizer": info.tokenizer, "vocab_size": info.vocab_size, "seq_len": info.seq_len,
              "train_stride": info.train_stride}
    for name in SPLITS:
        stream, start, stop = info.spans[name]
        lines.append(f"  {name:<10} {info.tokens[name]:>9,} tokens, {info.windows[name]:>7,} windows "
                     f"(tokens [{start:,}, {stop:,}) of the {stream} stream)")
        record[name] = {"tokens": info.tokens[name], "windows": info.windows[name], "span": [stream, start, stop]}
    sample = dataset.decode(dataset.validation.tokens[:60])
    lines.append(f"  validation starts: {sample!r}")
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
    text_data = config.data.is_text or config.space.name == "lm"
    try:
        dataset = load_text(config.data.text_config()) if text_data else load_dataset(config.data)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    describe = text_summary if text_data else summary
    text, record = describe(dataset, time.perf_counter() - start)
    out = Path(config.output)
    dump_config(config, out / "config.yaml")
    atomic_write_text(out / "data_summary.json", json.dumps(record, indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'config.yaml'} and {out / 'data_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
