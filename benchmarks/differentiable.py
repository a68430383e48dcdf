"""Differentiable search (DARTS, PC-DARTS, GDAS) against random architectures and evolution, on one space.

Every strategy searches the NAS-Bench-201 cell (``--space nb201``, the default) or the macro space's conv families
(``--space macro``: configs/macro_darts.yaml; darts and gdas) on mnist5k once per ``--seeds`` seed: a run of mode
differentiable (``python -m jaxnas.search``'s own code, final retraining off) gives the derived architecture and its
search time. Then every derived architecture, ``--random`` ones drawn uniformly from the space, and the pick of
regularized evolution (mode
train's candidate training, run through the ask / tell API until it has used the differentiable searches' mean
wall time) are retrained from scratch together with one recipe (``final.epochs``, ``final.patience``,
``train.*``) over ``--retrain-seeds`` seeds and tested. A strategy's test accuracy is the mean over its search
seeds and the retraining seeds; random's is the mean over its cells, and its best cell by validation accuracy is
what random search at that budget would pick.

The first search of each strategy includes compiling its step (later seeds reuse the program); evolution's time
includes compiling the candidates' training, and it runs at least one generation whatever that costs. Defaults
are sized for a CPU, where the stand-alone retraining (the masked population backend:
every candidate computes all five ops of every edge) dominates: 8 x 8 images (mnist5k's 28 x 28 resized), one
cell per stage, 4 channels, 10 search epochs, 6 retraining epochs (NB201 itself: 32 x 32, five cells, 16 channels).
The macro space runs at configs/macro_darts.yaml's sizes (16 x 16 images, stem stride 2) for the same epochs.

    python benchmarks/differentiable.py                          # the full comparison
    python benchmarks/differentiable.py data.image_size=[16,16] differentiable.epochs=10   # any RunConfig override
    python benchmarks/differentiable.py --space macro            # the macro space: darts and gdas
    python benchmarks/differentiable.py --quick                  # digits, 1 epoch, 1 seed, no evolution: a smoke run
    python benchmarks/differentiable.py --json out.json          # also write every number as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from interop._atomic import atomic_write_text
from interop.config import load_config, to_dict
from jaxnas.config import GRADIENT_STRATEGIES, RunConfig
from jaxnas.data import load_dataset
from jaxnas.search import differentiable as dif
from jaxnas.search.evaluate import TrainEvaluator
from jaxnas.search.loop import run_search
from jaxnas.search.models import build_space, model_for
from jaxnas.search.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "space.name=nb201", "space.cells=1", "mode=differentiable", "final.top_k=0", "progress=false",
    "train.batch_size=64", "search.population=8", "train.epochs=1",
]
FULL = ["data.name=mnist5k", "data.image_size=[8,8]", "space.cell_channels=4", "differentiable.epochs=10",
        "final.epochs=6", "final.patience=null"]
QUICK = ["data.name=digits", "space.cell_channels=4", "differentiable.epochs=1", "final.epochs=1"]
MACRO = ROOT / "configs" / "macro_darts.yaml"
MACRO_BASE = ["final.top_k=0", "progress=false", "train.batch_size=64", "search.population=8", "train.epochs=1"]
MACRO_FULL = ["differentiable.epochs=10", "final.epochs=6", "final.patience=null"]
MACRO_QUICK = ["data.name=digits", "data.image_size=null", "space.families=[cnn,mobilenet]", "space.channels=[4,8]",
               "space.max_stages=2", "space.max_depth=1", "differentiable.epochs=1", "final.epochs=1"]


def _quiet(*args, **kwargs) -> None:
    pass


def searches(cfg: RunConfig, strategies: list[str], seeds: int, folder: Path) -> dict[str, list[dict]]:
    """strategy -> one record per search seed: the derived cell, the search's seconds and its collapse numbers."""
    out = {}
    for strategy in strategies:
        out[strategy] = []
        for seed in range(seeds):
            run = dataclasses.replace(cfg, seed=seed, output=str(folder / f"{strategy}-{seed}"),
                                      search=dataclasses.replace(cfg.search, strategy=strategy))
            summary = run_search(run, log=_quiet)
            found = summary["differentiable"]
            out[strategy].append({"seed": seed, "arch": found["derived_arch"],
                                  "search_seconds": summary["search_seconds"],
                                  "param_free_share": found.get("param_free_share_per_epoch", [None])[-1],
                                  "alpha_entropy": found["alpha_entropy"], "epochs": found["epochs"]})
            print(f"  {strategy} seed {seed}: {found['derived_arch']} in {summary['search_seconds']:.1f} s",
                  flush=True)
    return out


def random_cells(space, n: int, seed: int = 123) -> list[str]:
    """``n`` distinct architectures drawn uniformly from ``space`` (seeded)."""
    found: dict[str, None] = {}
    for attempt in range(50):
        for enc in np.asarray(space.sample(jax.random.fold_in(jax.random.key(seed), attempt), 4 * n)):
            if len(found) < n:
                found.setdefault(space.to_string(enc), None)
        if len(found) == n:
            return list(found)
    raise ValueError(f"could not draw {n} distinct architectures")


def evolution(cfg: RunConfig, space, model, dataset, seconds: float) -> dict:
    """Regularized evolution (mode train's candidate training) through ask / tell until ``seconds`` are used (at
    least one generation); its pick is the candidate with the best validation accuracy."""
    cfg = dataclasses.replace(cfg, mode="train", search=dataclasses.replace(cfg.search, strategy="evolution"))
    strategy = build_strategy(cfg, space, 1)
    evaluator = TrainEvaluator(cfg, model, dataset)
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    key = jax.random.key(cfg.seed)
    state = strategy.init(jax.random.fold_in(key, 0))
    start, scored, g = time.perf_counter(), {}, 0
    while g == 0 or time.perf_counter() - start < seconds:
        encs, state = ask(jax.random.fold_in(key, g + 1), state)
        rows = evaluator.evaluate(np.asarray(encs), g)
        fitness = np.array([r["val_accuracy"] for r in rows], np.float32)
        state = tell(state, encs, np.nan_to_num(fitness, nan=-np.inf))
        for enc, value in zip(np.asarray(encs), fitness):
            scored.setdefault(space.to_string(enc), float(value))
        g += 1
    arch = max(scored, key=lambda a: scored[a])
    return {"arch": arch, "val_accuracy_in_search": scored[arch], "generations": g, "evaluations": len(scored),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=("nb201", "macro"), default="nb201",
                        help="the NAS-Bench-201 cell, or the macro space's conv families (configs/macro_darts.yaml)")
    parser.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 seed, 2 random cells, no evolution")
    parser.add_argument("--seeds", type=int, help="search seeds per strategy (default 2; quick 1)")
    parser.add_argument("--random", type=int, help="random cells of the space (default 8; quick 2)")
    parser.add_argument("--retrain-seeds", type=int, help="seeds of the stand-alone retraining (default 2; quick 1)")
    parser.add_argument("--strategies", help="comma-separated, e.g. darts,gdas (default: darts,pc_darts,gdas; "
                        "macro: darts,gdas)")
    parser.add_argument("--no-evolution", action="store_true", help="leave regularized evolution out")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="RunConfig overrides for every run")
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds or (1 if quick else 2)
    n_random = args.random or (2 if quick else 8)
    retrain_seeds = args.retrain_seeds or (1 if quick else 2)
    cell = args.space == "nb201"
    chosen = args.strategies or ",".join(s for s in GRADIENT_STRATEGIES if cell or s != "pc_darts")
    strategies = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in GRADIENT_STRATEGIES]
    if unknown or min(seeds, n_random, retrain_seeds) < 1:
        print(f"error: --strategies takes {', '.join(GRADIENT_STRATEGIES)} (got {', '.join(unknown)}); --seeds, "
              "--random and --retrain-seeds must be >= 1", file=sys.stderr)
        return 2
    try:
        if cell:
            cfg = load_config(RunConfig, None, [*BASE, *(QUICK if quick else FULL), *args.overrides,
                                                f"search.strategy={strategies[0]}"])
        else:
            cfg = load_config(RunConfig, MACRO, [*MACRO_BASE, *(MACRO_QUICK if quick else MACRO_FULL), *args.overrides,
                                                 f"search.strategy={strategies[0]}"])
    except ValueError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    dataset = load_dataset(cfg.data)
    space = build_space(cfg.space)
    model = model_for(space, cfg.space, dataset.info.image_shape, dataset.info.num_classes)
    searched = (f"nb201 cells: C={cfg.space.cell_channels}, N={cfg.space.cells}" if cell else
                f"macro space {'/'.join(cfg.space.families)}: channels {list(cfg.space.channels)}, "
                f"{cfg.space.max_stages} stages x {cfg.space.max_depth} blocks")
    print(f"data {cfg.data.name} {dataset.info.image_shape}, {searched}; {cfg.differentiable.epochs} search epochs; "
          f"retraining {cfg.final.epochs} epochs x {retrain_seeds} seeds", flush=True)
    with tempfile.TemporaryDirectory(prefix="jaxnas-differentiable-") as folder:
        found = searches(cfg, strategies, seeds, Path(folder))
    budget = float(np.mean([r["search_seconds"] for runs in found.values() for r in runs]))
    evo = None
    if not (args.no_evolution or quick):
        evo = evolution(cfg, space, model, dataset, budget)
        print(f"  evolution: {evo['evaluations']} cells in {evo['generations']} generations, {evo['seconds']:.1f} s; "
              f"pick {evo['arch']}", flush=True)
    random = random_cells(space, n_random)
    archs = list(dict.fromkeys([r["arch"] for runs in found.values() for r in runs] + random
                               + ([evo["arch"]] if evo else [])))
    start = time.perf_counter()
    result = TrainEvaluator(cfg, model, dataset).final(np.stack([space.from_string(a) for a in archs]),
                                                       seeds=retrain_seeds)
    retrain_seconds = time.perf_counter() - start
    test = {a: [float(t[i]) for t in result["test_accuracy"]] for i, a in enumerate(archs)}
    val = {a: float(np.mean([v[i] for v in result["val_accuracy"]])) for i, a in enumerate(archs)}

    def stats(values: list[float], of: list[str]) -> dict:
        """Test accuracy over ``values`` and the mean MACs per example of the architectures ``of``."""
        return {"test_accuracy_mean": float(np.mean(values)), "test_accuracy_std": float(np.std(values)),
                "n": len(values), "macs_mean": float(np.mean([model.macs(space.from_string(a)) for a in of]))}

    report = {"space": args.space, "config": to_dict(cfg), "seeds": seeds, "retrain_seeds": retrain_seeds,
              "retrain_seconds": round(retrain_seconds, 2), "strategies": {}}
    for strategy, runs in found.items():
        for r in runs:
            r["test_accuracy"] = test[r["arch"]]
        report["strategies"][strategy] = {
            "runs": runs, "search_seconds_mean": float(np.mean([r["search_seconds"] for r in runs])),
            **stats([t for r in runs for t in r["test_accuracy"]], [r["arch"] for r in runs]),
        }
    best_random = max(random, key=lambda a: val[a])
    report["random"] = {
        "archs": [{"arch": a, "test_accuracy": test[a],
                   "param_free_share": dif.param_free_share(space.from_string(a)) if cell else None} for a in random],
        **stats([t for a in random for t in test[a]], random),
        "best_by_validation": {"arch": best_random, **stats(test[best_random], [best_random])},
    }
    if evo is not None:
        evo.update(test_accuracy=test[evo["arch"]], **stats(test[evo["arch"]], [evo["arch"]]))
    report["evolution"] = evo
    print(_table(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return 0


def _table(report: dict) -> str:
    def acc(row: dict) -> str:
        return (f"{row['test_accuracy_mean']:.4f} +- {row['test_accuracy_std']:.4f} (n={row['n']})  "
                f"{row['macs_mean']:>10.0f}")

    cell = report["space"] == "nb201"
    lines = [f"{'method':<26} {'search s':>9}  {'test accuracy':<26}  {'mean MACs':>10} "
             + ("cells (param-free share)" if cell else "architectures")]
    for name, row in report["strategies"].items():
        found = "; ".join(r["arch"] + (f" ({r['param_free_share']:.2f})" if cell else "") for r in row["runs"])
        lines.append(f"{name:<26} {row['search_seconds_mean']:>9.1f}  {acc(row)} {found}")
    rnd = report["random"]
    free = f"mean param-free {np.mean([a['param_free_share'] for a in rnd['archs']]):.2f}" if cell else ""
    lines.append(f"{'random (' + str(len(rnd['archs'])) + ' archs, mean)':<26} {'':>9}  {acc(rnd)} {free}")
    best = rnd["best_by_validation"]
    lines.append(f"{'random, best by val.':<26} {'':>9}  {acc(best)} {best['arch']}")
    evo = report["evolution"]
    if evo is not None:
        lines.append(f"{'evolution (' + str(evo['evaluations']) + ' archs)':<26} {evo['seconds']:>9.1f}  "
                     f"{acc(evo)} {evo['arch']}")
    lines.append(f"retraining: {report['retrain_seeds']} seeds x {report['config']['final']['epochs']} epochs, "
                 f"{report['retrain_seconds']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
