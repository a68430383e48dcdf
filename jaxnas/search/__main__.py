"""``python -m jaxnas.search --config configs/<name>.yaml [key=value ...]`` or ``--resume <run folder>``.

Runs a search and writes its run folder (``output=``): config.yaml, history.csv, generations.csv, best.json,
pareto.json, summary.json, the plots and report.html, the exported best model (modes oneshot / train) and the
Orbax checkpoints. ``--help-config`` lists every key. Exit status 2 for a bad config, data or table, or a run
that cannot start or resume as asked (one line on stderr saying why), 130 when interrupted (Ctrl-C; the run
resumes with ``--resume``). The config is checked before jax is imported, so a bad one fails at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interop.config import ConfigError, config_help, load_config, read_yaml
from jaxnas.config import RunConfig
from jaxnas.data.errors import DataError
from jaxnas.search.runfolder import RunError


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
    overrides = list(args.overrides)
    try:
        if args.resume:
            if not Path(source).is_file():
                raise RunError(f"--resume {args.resume}: no config.yaml there, so there is no run to resume")
            if "output" not in read_yaml(source):
                raise RunError(f"--resume {args.resume}: its config.yaml is empty or not a run's config (no output "
                               "key); it is written by the run itself: restore it, or start a new run with --config")
            overrides.append(f"output={args.resume}")  # a run resumes in place, wherever its folder now is
        config = load_config(RunConfig, source, overrides)
    except (ConfigError, RunError) as error:
        return _fail(error)
    from jaxnas.search.loop import run_search  # jax is imported only once the config is good

    try:
        summary = run_search(config, resume=bool(args.resume))
    except (RunError, ValueError, DataError, FileNotFoundError) as error:
        return _fail(error)
    except KeyboardInterrupt:
        print(f"interrupted; resume with: python -m jaxnas.search --resume {config.output}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    print(f"run folder: {config.output} (report.html, history.csv, best.json, pareto.json, summary.json)")
    return 0


def _fail(error: Exception) -> int:
    """One line on stderr (the message says what was wrong and what to do), exit status 2."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


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
