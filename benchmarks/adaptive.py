"""Experiential channel gating (`jaxnas.adaptive`) on the make-run winner and the quick space's largest network.

    python benchmarks/adaptive.py [--json out.json] [--repeats 10] [--winner runs/quick/model]

1. the winner of ``make run`` (``runs/quick/model``: a cnn found on mnist5k);
2. the largest network of the quick space (every stage d2, w32, bn, skip), trained stand-alone with the quick
   config's final recipe on mnist5k and exported once into ``~/.cache/jaxnas/adaptive/largest`` (reused after).

For each: calibration and the 0.5-point guardrail on validation, then the test report of
`jaxnas.adaptive.experiment.run_adaptive` - BASE / STATIC / CURRENT (memory off) / EXPERIENCE over
bl in {0.10, 0.12, 0.18} x Bg in {0.05, 0.06, 0.08}, interleaved images/s with Student-t 95% CIs (the probe and
the decision inside the timed call). Targets: +8.5% images/s with the CI's lower bound above 0 at <= 0.5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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
from jaxnas.search import fidelity
from jaxnas.search.evaluate import Ends, OneShotEvaluator
from jaxnas.search.export import export_model
from jaxnas.search.models import build_space, model_for


def largest_model(config: str, folder: Path):
    """The quick space's largest network, trained with the final recipe and exported into ``folder`` (once)."""
    if (folder / "arch.json").is_file():
        return load_model(folder)
    cfg = load_config(RunConfig, config, ["progress=false"])
    space = build_space(cfg.space)
    dataset = load_dataset(cfg.data)
    model = model_for(space, cfg.space, dataset.info.image_shape, dataset.info.num_classes)
    enc = fidelity.largest_architecture(space, Ends(model, "largest"))
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
    parser.add_argument("--largest", default=str(Path.home() / ".cache" / "jaxnas" / "adaptive" / "largest"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    settings = Settings(repeats=args.repeats)
    dataset = load_dataset("mnist5k")
    models = {"winner": load_model(args.winner), "largest": largest_model(args.config, Path(args.largest))}
    reports = {}
    for name, model in models.items():
        print(f"\n== {name}: {model.arch}", flush=True)
        start = time.perf_counter()
        reports[name] = run_adaptive(model, dataset, settings, progress=lambda line: print(line, flush=True))
        best = reports[name]["best"]
        print(f"{name}: base test accuracy {reports[name]['base']['accuracy']:.1f}; best experience arm "
              f"{json.dumps(best)} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(json_safe({"settings": dataclasses.asdict(settings), **reports}),
                                                indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
