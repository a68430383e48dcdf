"""Ranking fidelity of one-shot scores: how well a trained supernet ranks architectures it never trained alone.

For a config (default ``configs/quick.yaml``, the embedded default) the benchmark draws ``--candidates``
distinct random architectures of its space plus the space's largest network, trains every one of them
stand-alone with the config's final recipe (``final.epochs``, ``final.patience``, ``train.*``) over
``--ref-seeds`` seeds, and takes the mean test accuracy as the reference. Then, for each of ``--supernet-seeds``
seeds, it trains the supernet with the config's ``supernet.*`` recipe (any ``key=value`` override applies, so
recipes are compared by running the benchmark once per recipe), scores the same candidates with inherited
weights and recalibrated BatchNorm statistics (exactly as a one-shot run does) and prints Kendall tau and
Spearman rho against the reference, next to scores that need no training at all: ranking by parameter
count and by MACs, and the zero-cost proxies of `jaxnas.search.proxies` (grad_norm, snip, synflow, naswot:
the untrained supernet, one batch of 64). The seed-to-seed agreement of the reference itself (tau between two stand-alone seeds) is
printed too: no cheap score can be expected to beat it.

The stand-alone reference is the expensive part (minutes per seed on a CPU), so it is cached in ``--cache`` keyed by everything it depends on (data, space, final / train recipe,
candidates, seeds); change the supernet recipe freely without paying it again.

    python benchmarks/ranking.py                                      # quick space, current supernet recipe
    python benchmarks/ranking.py supernet.epochs=10 supernet.distill=0.5
    python benchmarks/ranking.py --quick                              # digits, tiny space: a smoke run
    python benchmarks/ranking.py --json out.json                      # also write every number as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from interop._atomic import atomic_write_text
from interop.config import load_config, to_dict
from jaxnas.config import RunConfig
from jaxnas.data import load_dataset
from jaxnas.search import fidelity, proxies
from jaxnas.search.evaluate import Ends, OneShotEvaluator, train_supernet
from jaxnas.search.models import build_space, model_for

QUICK = [
    "data.name=digits", "space.max_stages=2", "space.max_depth=1", "space.channels=[4,8]", "supernet.epochs=1",
    "final.epochs=2", "search.population=4",
]


def candidates(space, model, n: int, seed: int = 123) -> np.ndarray:
    """``n`` distinct random architectures of ``space`` (seeded) and, last, the space's largest network."""
    largest = fidelity.largest_architecture(space, Ends(model, "largest"))
    found = {space.to_string(largest): largest}
    key = jax.random.key(seed)
    for attempt in range(50):
        for enc in np.asarray(space.sample(jax.random.fold_in(key, attempt), 4 * n)):
            if len(found) < n + 1:
                found.setdefault(space.to_string(enc), enc)
        if len(found) > n:
            break
    archs = list(found)[1:] + list(found)[:1]
    return np.stack([found[a] for a in archs])


def reference(cfg: RunConfig, evaluator, space, encs: np.ndarray, seeds: int, cache: Path) -> dict:
    """Stand-alone {"val", "test"} [seeds][n] accuracies with the final recipe, cached in ``cache``."""
    archs = [space.to_string(e) for e in encs]
    recipe = {k: to_dict(cfg)[k] for k in ("seed", "data", "space", "train", "final")}
    key = hashlib.sha256(json.dumps([recipe, archs, seeds], sort_keys=True, default=str).encode()).hexdigest()[:16]
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in stored:
        print(f"reference: {len(archs)} architectures x {seeds} seeds from {cache} ({key})", flush=True)
        return stored[key]
    start = time.perf_counter()
    out = evaluator.final(encs, seeds=seeds)
    entry = {"archs": archs, "val": out["val_accuracy"], "test": out["test_accuracy"],
             "seconds": round(time.perf_counter() - start, 1)}
    print(f"reference: trained {len(archs)} architectures x {seeds} seeds stand-alone in {entry['seconds']} s",
          flush=True)
    stored[key] = entry
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(stored) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--candidates", type=int, default=24, help="random architectures (the largest is added)")
    parser.add_argument("--ref-seeds", type=int, default=2, help="stand-alone trainings per architecture")
    parser.add_argument("--supernet-seeds", type=int, default=2, help="supernets trained (one per seed)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "jaxnas" / "ranking_reference.json"))
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="digits, a tiny space, 6 candidates: a smoke run")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. supernet.epochs=10)")
    args = parser.parse_args(argv)
    overrides = [*(QUICK if args.quick else []), *args.overrides, "progress=false"]
    if args.quick:
        args.candidates, args.supernet_seeds = min(args.candidates, 6), 1
    cfg = load_config(RunConfig, args.config, overrides)
    space = build_space(cfg.space)
    dataset = load_dataset(cfg.data)
    model = model_for(space, cfg.space, dataset.info.image_shape, dataset.info.num_classes)
    encs = candidates(space, model, args.candidates)
    # every candidate scored in one population (the masked, vmapped scoring of GPU / non-macro spaces pads to it)
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, population=max(cfg.search.population, len(encs))))
    s = cfg.supernet
    families = f" ({', '.join(cfg.space.families)})" if space.name == "macro" else ""
    print(f"space {space.name}{families} on {cfg.data.name}: {len(encs)} architectures; "
          f"supernet: {s.epochs} epochs, {s.sampler} x {s.subnets}, lr {s.learning_rate} {s.schedule}, "
          f"distill {s.distill}, shift {s.augment_shift}, bn_batches {s.bn_batches}", flush=True)

    evaluator = OneShotEvaluator(cfg, model, dataset, None)
    ref = reference(cfg, evaluator, space, encs, args.ref_seeds, Path(args.cache))
    test = np.asarray(ref["test"], float)
    standalone = np.nanmean(test, axis=0)
    cheap = {"params": [model.param_count(e) for e in encs], "macs": [model.macs(e) for e in encs]}
    rows = {name: fidelity.rank_correlation(v, standalone) | {"scores": [float(x) for x in v]}
            for name, v in cheap.items()}
    if len(test) >= 2:
        rows["stand-alone seed 1 vs seed 2"] = fidelity.rank_correlation(test[0], test[1])
    # Zero-cost proxies: the untrained supernet (seed 0), one training batch of 64.
    init = model.init(jax.random.key(cfg.seed))
    batch = np.random.default_rng(cfg.seed).permutation(len(dataset.train.labels))[: proxies.BATCH]
    for name in proxies.PROXIES:
        if name == "naswot" and not getattr(model, "has_activation_kernel", False):
            continue  # the transformer supernet records no activation codes
        start = time.perf_counter()
        values = np.asarray(proxies.score_model(name, model, init, encs, dataset.train.images[batch],
                                                dataset.train.labels[batch]))
        rows[f"zero-cost {name} (at init)"] = fidelity.rank_correlation(values, standalone) | {
            "seconds": round(time.perf_counter() - start, 1), "scores": values.tolist()}
    oneshot = []
    for seed in range(args.supernet_seeds):
        run_cfg = dataclasses.replace(cfg, seed=cfg.seed + seed)
        start = time.perf_counter()
        params, losses = train_supernet(run_cfg, model, dataset)
        trained = time.perf_counter() - start
        scores = np.asarray([r["val_accuracy"] for r in OneShotEvaluator(run_cfg, model, dataset, params).evaluate(encs, 0)])
        row = fidelity.rank_correlation(scores, standalone)
        row |= {"supernet_seconds": round(trained, 1), "final_loss": round(losses[-1], 4),
                "at_chance": int((scores < 1.5 / dataset.info.num_classes).sum()), "scores": scores.tolist()}
        rows[f"one-shot (supernet seed {run_cfg.seed})"] = row
        oneshot.append(row)
        print(f"supernet seed {run_cfg.seed}: trained in {trained:.1f} s (final loss {losses[-1]:.3f}); "
              f"tau {row['kendall_tau']:.3f}", flush=True)
    if oneshot:
        taus = [r["kendall_tau"] for r in oneshot]
        rows["one-shot (mean over supernets)"] = {
            "kendall_tau": float(np.mean(taus)), "spearman": float(np.mean([r["spearman"] for r in oneshot])),
            "n": oneshot[0]["n"],
        }

    print(f"\nrank correlation with the stand-alone test accuracy (mean of {len(test)} seeds), "
          f"{len(encs)} architectures:")
    for r in rows.values():  # as a pre-filter: the share of the stand-alone top quarter in the score's best half
        if "scores" in r:
            r["top_quarter_recall"] = fidelity.top_recall(r["scores"], standalone, keep=0.5, top=0.25)
    print(f"{'score':<38} {'Kendall tau':>11} {'Spearman':>9} {'top-25% in best half':>21}")
    for name, r in rows.items():
        recall = f"{r['top_quarter_recall']:.2f}" if "top_quarter_recall" in r else "-"
        print(f"{name:<38} {r['kendall_tau']:>11.3f} {r['spearman']:>9.3f} {recall:>21}")
    print("\nstand-alone test accuracy (mean) | one-shot score(s) | arch")
    for i in np.argsort(-standalone):
        shots = " ".join(f"{r['scores'][i]:.3f}" for r in oneshot)
        print(f"  {standalone[i]:.3f} | {shots} | {space.to_string(encs[i])}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({
            "config": args.config, "overrides": overrides, "archs": ref["archs"], "standalone_test": test.tolist(),
            "correlations": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
