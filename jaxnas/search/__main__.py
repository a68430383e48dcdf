"""``python -m jaxnas.search --config configs/<name>.yaml [key=value ...]`` or ``--resume <run folder>``.

Runs a search and writes its run folder (``output=``): config.yaml, history.csv, generations.csv, best.json,
pareto.json, summary.json, the plots and report.html, the exported best model (modes oneshot / train) and the
Orbax checkpoints. ``--help-config`` lists every key. Exit status 2 for a bad config or a run that cannot
start or resume as asked, 1 for data that cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interop.config import ConfigError, config_help, load_config
from jaxnas.config import RunConfig
from jaxnas.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxnas.search", description="Run a neural architecture search.")
    parser.add_argument("--config", help="YAML run config (e.g. configs/quick.yaml); defaults apply without it")
    parser.add_argument("--resume", metavar="RUN_FOLDER", help="continue the run in this folder (its config.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help and exit")
    parser.add_argument("--choose", metavar="RUN_FOLDER", help="choose an architecture from a finished run (below)")
    parser.add_argument("--minimise", metavar="OBJECTIVE", help="--choose: the objective to optimise (e.g. params)")
    parser.add_argument("--floor", action="append", default=[], metavar="NAME=VALUE",
                        help="--choose: a bound that must hold, e.g. val_accuracy=0.97 (repeatable)")
    parser.add_argument("--knee", action="store_true", help="--choose: the knee of the Pareto front")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. search.budget=64")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(config_help(RunConfig)))
        return 0
    if args.choose:
        return _choose(args)
    if args.resume and args.config:
        print("error: --resume reads the run's own config.yaml; drop --config", file=sys.stderr)
        return 2
    source = str(Path(args.resume) / "config.yaml") if args.resume else args.config
    if args.resume and not Path(source).is_file():
        print(f"error: --resume {args.resume}: no config.yaml there, so there is no run to resume", file=sys.stderr)
        return 2
    try:
        config = load_config(RunConfig, source, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from jaxnas.search.loop import RunError, run_search  # jax is imported only once the config is good

    if args.resume and Path(config.output).resolve() != Path(args.resume).resolve():
        print(f"error: --resume {args.resume}: its config.yaml says output={config.output}; a run resumes in place",
              file=sys.stderr)
        return 2
    try:
        summary = run_search(config, resume=bool(args.resume))
    except (RunError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(f"run folder: {config.output} (report.html, history.csv, best.json, pareto.json, summary.json)")
    return 0


def _choose(args) -> int:
    from jaxnas.search.choose import choose

    try:
        floor = {}
        for item in args.floor:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--floor {item!r}: expected name=value, e.g. --floor val_accuracy=0.97")
            floor[name.strip()] = float(value)
        row = choose(args.choose, minimise=args.minimise, floor=floor, knee=args.knee)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if row is None:
        print("no evaluated candidate meets every floor", file=sys.stderr)
        return 1
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
