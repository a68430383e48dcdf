"""Experiential channel gating (`jaxnas.adaptive`) on the make-run winner and the quick space's largest network.

    python benchmarks/adaptive.py [--json out.json] [--repeats 10] [--winner runs/quick/model]
    python benchmarks/adaptive.py --networks winner,largest,wide      # and a 64-channel network on the issue's grid
    python benchmarks/adaptive.py --config configs/cifar10.yaml --winner runs/cifar10/model   # tfds data prepared
    python benchmarks/adaptive.py --quick --json out.json    # smoke run: tiny networks on digits, one grid point

1. the winner of ``make run`` (``runs/quick/model``: a cnn found on mnist5k);
2. the largest network of the quick space (every stage d2, w32, bn, skip), trained stand-alone with the quick
   config's final recipe on mnist5k and exported once into ``~/.cache/jaxnas/adaptive/quick/largest`` (reused);
3. with ``--networks ...,wide``: the same network at 64 channels per stage (``.../quick/wide64``),
   on the issue's grid only - the budgets there cut 6-11 of 64 channels, which the 16- / 32-channel gates cannot.

For each: the kept-width programs timed, gate-aware fine-tuning (train split) for the fast ones, calibration and
the 0.5-point guardrail on validation (on the drop's one-sided 95% bound), then the test report of
`jaxnas.adaptive.experiment.run_adaptive` - BASE / STATIC / CURRENT (memory off) / EXPERIENCE over
bl in {0.10, 0.12, 0.18, 0.25, 0.5} x Bg in {0.05, 0.06, 0.08, 0.125, 0.25} (the issue's grid and the cuts of 8
channels these 16- and 32-channel networks need to get faster on a CPU), interleaved images/s with Student-t 95%
CIs (the probe and the decision inside the timed call), and early exits. Targets: channel gating +8.5% images/s
with the CI's lower bound above 0 at <= 0.5 points; early exits >= 30% fewer average MACs and a measured gain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from interop._atomic import atomic_write_text
from interop.config import load_config
from interop.jsonsafe import json_safe
from jaxnas import load_model
from jaxnas.adaptive.experiment import Settings, run_adaptive
from jaxnas.config import RunConfig
from jaxnas.data import load_dataset
from jaxnas.data.errors import DataError
from jaxnas.search import fidelity
from jaxnas.search.evaluate import Ends, OneShotEvaluator
from jaxnas.search.export import export_model
from jaxnas.search.__main__ import main as search_main
from jaxnas.search.models import build_space, model_for


# --quick: a one-network search and a two-stage conv space on digits, one budget pair, the fewest timed repeats.
QUICK_SPACE = ["data.name=digits", "space.families=[cnn]", "space.max_stages=2", "space.max_depth=2",
               "space.channels=[8]", "space.kernels=[3]", "space.activations=[relu]", "space.dropouts=[0.0]",
               "space.batchnorm=[true]", "space.skip=[false]", "train.batch_size=64", "train.learning_rate=0.01",
               "final.epochs=1", "final.seeds=1", "progress=false"]
QUICK_SEARCH = ["mode=train", "search.strategy=random", "search.population=1", "search.budget=1", "train.epochs=1",
                "final.top_k=1", "final.control=0", "final.baselines=[]"]
QUICK_SETTINGS = {"bl_grid": (0.5,), "Bg_grid": (0.5,), "align": 4, "batch_size": 32, "calibration_batch": 32,
                  "probe_images": 4, "repeats": 5, "timing_passes": 1, "exit_epochs": 3, "finetune_epochs": 2,
                  "latency_rounds": 3}
BL_GRID = (0.10, 0.12, 0.18, 0.25, 0.5)
BG_GRID = (0.05, 0.06, 0.08, 0.125, 0.25)
ISSUE_BL, ISSUE_BG = (0.10, 0.12, 0.18), (0.05, 0.06, 0.08)  # the budget grid issue 19 names
WIDE = ("space.channels=[64]",)  # --networks wide: the quick space's largest network at 64 channels per stage


def largest_model(config: str, folder: Path, overrides: tuple[str, ...] = (), dataset=None):
    """The config's space's largest network, trained with its final recipe and exported into ``folder`` (once;
    a folder holding another network is refused)."""
    cfg = load_config(RunConfig, config, ["progress=false", *overrides])
    space = build_space(cfg.space)
    dataset = load_dataset(cfg.data) if dataset is None else dataset
    model = model_for(space, cfg.space, dataset.info.image_shape, dataset.info.num_classes)
    enc = fidelity.largest_architecture(space, Ends(model, "largest"))
    if (folder / "arch.json").is_file():
        saved = load_model(folder)
        if saved.arch != space.to_string(enc):
            raise SystemExit(f"{folder} holds {saved.arch}, not this config's largest network "
                             f"{space.to_string(enc)}; delete the folder or pass another --largest / --wide")
        return saved
    start = time.perf_counter()
    out = OneShotEvaluator(cfg, model, dataset, None).final(np.asarray(enc)[None], seeds=1)
    print(f"largest {space.to_string(enc)}: trained in {time.perf_counter() - start:.0f} s, "
          f"test accuracy {out['test_accuracy'][0][0]:.4f}", flush=True)
    export_model(folder, model, cfg.space, jnp.asarray(enc), out["params"], out["bn_stats"],
                 {"test_accuracy": out["test_accuracy"][0][0], "val_accuracy": out["val_accuracy"][0][0]})
    return load_model(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--winner", default="runs/quick/model")
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--largest", help="folder of the trained largest network (default: "
                                            "~/.cache/jaxnas/adaptive/<config name>/largest, trained there once)")
    parser.add_argument("--wide", help="the same for --networks wide (default: .../<config name>/wide64)")
    parser.add_argument("--networks", default="winner,largest",
                        help="comma-separated: winner, largest, wide (the largest network at 64 channels per stage, "
                             "on the issue's grid bl {0.10, 0.12, 0.18} x Bg {0.05, 0.06, 0.08} only)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decide-every", type=int, default=1,
                        help="the per-batch arms decide once per group of this many batches (Settings.decide_every)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a one-network search and a tiny space's largest network on digits (in a "
                             "temporary folder), one budget pair, 5 timed repeats, 3 exit-head epochs")
    parser.add_argument("--json", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="jaxnas-adaptive-") as folder:
            run = Path(folder) / "winner"
            if search_main([f"output={run}", *QUICK_SPACE, *QUICK_SEARCH]) != 0:
                return 1
            models = {"winner": load_model(run),
                      "largest": largest_model(args.config, Path(folder) / "largest", tuple(QUICK_SPACE))}
            return _report(models, load_dataset("digits"), Settings(**QUICK_SETTINGS), args.json)
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(networks) - {"winner", "largest", "wide"})
    if unknown or not networks:
        parser.error(f"--networks: expected a comma-separated subset of winner, largest, wide, got {args.networks!r}")
    try:  # the config's dataset (mnist5k for quick.yaml; tfds:cifar10 for cifar10.yaml once it is prepared)
        dataset = load_dataset(load_config(RunConfig, args.config, ["progress=false"]).data)
    except DataError as error:
        print(f"benchmarks/adaptive.py: {error}", file=sys.stderr)
        return 2
    cache = Path.home() / ".cache" / "jaxnas" / "adaptive" / Path(args.config).stem
    load = {"winner": lambda: load_model(args.winner),
            "largest": lambda: largest_model(args.config, Path(args.largest or cache / "largest"), (), dataset),
            "wide": lambda: largest_model(args.config, Path(args.wide or cache / "wide64"), WIDE, dataset)}
    models = {name: load[name]() for name in networks}
    settings = Settings(repeats=args.repeats, bl_grid=BL_GRID, Bg_grid=BG_GRID, decide_every=args.decide_every)
    per_network = {"wide": dataclasses.replace(settings, bl_grid=ISSUE_BL, Bg_grid=ISSUE_BG)}
    return _report(models, dataset, settings, args.json, per_network)


def _report(models: dict, dataset, settings: Settings, json_path: str | None,
            per_network: dict[str, Settings] | None = None) -> int:
    reports = {}
    for name, model in models.items():
        print(f"\n== {name}: {model.arch}", flush=True)
        start = time.perf_counter()
        own = (per_network or {}).get(name, settings)
        reports[name] = run_adaptive(model, dataset, own, progress=lambda line: print(line, flush=True))
        print(f"{name}: base test accuracy {reports[name]['base']['accuracy']:.1f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for arm, best in reports[name]["best_by_arm"].items():
            print(f"  best {arm} arm: {json.dumps(best)}", flush=True)
    if json_path:
        atomic_write_text(json_path, json.dumps(json_safe({"settings": dataclasses.asdict(settings), **reports}),
                                                indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
