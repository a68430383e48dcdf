"""``python -m jaxnas.adaptive --model <run>/model [options]``: experiential channel gating of a found conv network.

Calibrates on the validation split, enforces the accuracy guardrail there on every arm and budget pair, then
reports on the test split: BASE -> STATIC -> CURRENT (memory off) -> EXPERIENCE (memory on) over the budget grid,
accuracy and its drop, active fraction, kept widths and interleaved throughput with 95% CIs. Writes the JSON
report (default ``<model folder>/adaptive.json``) and prints one line per grid point and each timing table.

The data is the run's own (``data`` of ``<run>/config.yaml``) unless ``--data`` names one. Exit status 2 for bad
input, with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interop._atomic import atomic_write_text
from interop.jsonsafe import json_safe
from jaxnas.data.errors import DataError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.10,0.12, got {text!r}") from None


def _data_config(model_folder: Path, name: str | None):
    """The data the run was searched on (its config.yaml), or ``name``."""
    from jaxnas.config import DataConfig
    from interop.config import from_dict

    if name is not None:
        return DataConfig(name=name)
    config = model_folder.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{model_folder} has no run config beside it ({config}); name the data with --data")
    import yaml

    return from_dict(DataConfig, (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data", {}))


def main(argv: list[str] | None = None) -> int:
    from jaxnas.adaptive.experiment import Settings

    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m jaxnas.adaptive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported model: <run>/model (or the run folder)")
    parser.add_argument("--data", help="dataset name (default: the run's data from <run>/config.yaml)")
    parser.add_argument("--output", help="JSON report path (default <model folder>/adaptive.json)")
    parser.add_argument("--plot", help="also write a PNG of throughput gain vs accuracy drop here")
    parser.add_argument("--max-drop", type=float, default=defaults.max_drop, help="guardrail, accuracy points")
    parser.add_argument("--bl", type=_floats, default=defaults.bl_grid, help="per-gate budgets, e.g. 0.10,0.12,0.18")
    parser.add_argument("--Bg", type=_floats, default=defaults.Bg_grid, help="global budgets, e.g. 0.05,0.06,0.08")
    for name in ("align", "batch_size", "calibration_batch", "probe_images", "repeats", "warmup", "timing_passes",
                 "exit_epochs", "exit_grid", "finetune_epochs", "latency_rounds", "decide_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=Settings.__dataclass_fields__[name].metadata["help"])
    for name in ("min_keep", "wcur", "wmem", "min_speedup", "guardrail_z", "finetune_lr"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help=Settings.__dataclass_fields__[name].metadata["help"])
    args = parser.parse_args(argv)
    try:
        settings = Settings(
            max_drop=args.max_drop, bl_grid=args.bl, Bg_grid=args.Bg, align=args.align, min_keep=args.min_keep,
            probe_images=args.probe_images, batch_size=args.batch_size, calibration_batch=args.calibration_batch,
            wcur=args.wcur, wmem=args.wmem, repeats=args.repeats, warmup=args.warmup,
            timing_passes=args.timing_passes, exit_epochs=args.exit_epochs, exit_grid=args.exit_grid,
            latency_rounds=args.latency_rounds, guardrail_z=args.guardrail_z,
            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
            min_speedup=args.min_speedup, decide_every=args.decide_every,
        )
        for name in ("align", "batch_size", "calibration_batch", "probe_images", "warmup", "timing_passes",
                     "exit_grid"):
            if getattr(settings, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
        from jaxnas import load_model
        from jaxnas.adaptive.experiment import run_adaptive
        from jaxnas.data import load_dataset
        from jaxnas.supernet.conv import TwinConvNet

        model = load_model(args.model)
        if not isinstance(model.twin, TwinConvNet):
            raise ValueError(f"{args.model} holds a {model.arch.split('|')[0]} model; channel gating needs a conv "
                             "network (cnn, resnet or mobilenet)")
        dataset = load_dataset(_data_config(Path(model.folder), args.data))
        output = Path(args.output) if args.output else Path(model.folder) / "adaptive.json"
        report = run_adaptive(model, dataset, settings)
    except (ValueError, OSError, KeyError, DataError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    atomic_write_text(output, json.dumps(json_safe(report), indent=2) + "\n")
    for row in report["grid"]:
        if row["timing"]:
            print(f"\nbl={row['bl']} Bg={row['Bg']}\n{row['timing']['table']}")
    if report["early_exit"] and report["early_exit"]["timing"]:
        print(f"\nearly exits\n{report['early_exit']['timing']['table']}")
    if args.plot:
        from jaxnas.adaptive.experiment import plot_report

        plot_report(report, args.plot)
    print(f"\nreport: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
