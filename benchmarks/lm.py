"""Language-model search on pydoc text against a GPT-2-like baseline family, and population training vs PyTorch eager.

Three measurements in one process, on ``text:pydoc`` (the standard library's pydoc topics, byte-level tokens,
windows of ``data.seq_len``):

1. **Search.** ``python -m jaxnas.search``'s own code (mode train, regularized evolution, every generation's
   candidates trained together as one vmapped population) over a CPU-sized ``lm`` space with two objectives,
   validation perplexity and measured decode latency per token (``val_ppl:min, latency_ms_per_token:min``).
   Its Pareto front (at most ``--front`` members, the lowest perplexities first) is what the search found.
2. **Equal training budget.** The front and a GPT-2-like baseline family - attention, LayerNorm, GELU, learned
   positions, multi-head (kv_heads = heads), FFN x4, on the depth x width grid ``--grid-layers`` x
   ``--grid-widths`` - are retrained from scratch together with one recipe (``final.epochs``, the same batches,
   Adam at ``train.learning_rate``) over ``--retrain-seeds`` seeds; validation and test perplexity are the
   means over the seeds. Decode latency per token (one jitted cached ``decode_step`` at batch 1) is measured
   for every network with interleaved rounds (all networks in turn, ``--latency-rounds`` times; per round the
   median of ``--latency-calls`` calls; the reported value is the median over rounds with a Student-t 95% CI).
   Printed: the comparison at equal parameter count (for every baseline, the searched network of at most its
   parameters with the lowest validation perplexity) and how many baseline points the searched front dominates
   in (validation perplexity, latency).
3. **Population training vs PyTorch eager.** The same networks (front + grid), from the same initial weights
   (each candidate's twin copied into `benchmarks/lm_reference.TorchLM`), trained for one epoch on the same
   batches with the same optimiser: jaxnas's `train_population` (one compiled program for the whole population;
   its first call compiles unless the retraining already compiled that population size, then the steady epoch)
   against PyTorch eager training the networks one after
   another, in interleaved repeats. The masked population computes every network at the space's largest sizes
   with all its token mixers, so the padded fraction is printed next to the ratio. torch runs on
   ``--torch-threads`` threads (default 1, as benchmarks/population.py: beside XLA in one process on 2 cores,
   more threads ran these small networks slower).

The search's seconds include compiling; the search trains candidates for ``train.epochs`` (a low fidelity),
the retraining for ``final.epochs``.

    python benchmarks/lm.py                           # the full comparison
    python benchmarks/lm.py --quick                   # tiny space, 1 epoch, 1 seed: a smoke run
    python benchmarks/lm.py --json lm.json            # also write every number as JSON
    python benchmarks/lm.py --skip-torch search.budget=48   # any RunConfig override after the options
    python benchmarks/lm.py --torch-only lm.json      # only the PyTorch comparison, on an earlier report's networks
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interop._atomic import atomic_write_text  # noqa: E402
from interop.config import load_config, to_dict  # noqa: E402
from jaxnas import population as pop  # noqa: E402
from jaxnas.population import lm_sized  # noqa: E402
from jaxnas.config import RunConfig  # noqa: E402
from jaxnas.data import load_text  # noqa: E402
from jaxnas.data.batching import epoch_indices  # noqa: E402
from jaxnas.search.evaluate import TrainEvaluator, perplexity  # noqa: E402
from jaxnas.search.loop import run_search  # noqa: E402
from jaxnas.search.models import build_space, model_for  # noqa: E402
from jaxnas.search.pareto import pareto_mask  # noqa: E402
from jaxnas.spaces.lm import LMArch  # noqa: E402
from torch_gating.timing import student_t_ci  # noqa: E402

BASE = [
    "mode=train", "space.name=lm", "data.name=text:pydoc", "data.tokenizer=bytes", "search.strategy=evolution",
    "objectives.objectives=[val_ppl:min,latency_ms_per_token:min]", "final.top_k=0", "progress=false",
    "space.norms=[layernorm,rmsnorm]", "space.lm_activations=[gelu,swiglu]",
    "space.mixers=[attention,linear,recurrent]", "space.positions=[learned,rope,alibi]",
]
FULL = [
    "data.seq_len=64", "data.train_stride=256", "space.max_layers=3", "space.hidden=[32,64,96]",
    "space.heads=[2,4]", "space.kv_heads=[1,2,4]", "space.ffn_mults=[2,4]", "search.population=8",
    "search.budget=32", "train.epochs=1", "train.batch_size=32", "train.learning_rate=0.003", "final.epochs=3",
    "final.patience=null",
]
QUICK = [
    "data.seq_len=16", "data.train_stride=512", "space.max_layers=1", "space.hidden=[16,32]", "space.heads=[2]",
    "space.kv_heads=[1,2]", "space.ffn_mults=[2,4]", "search.population=3", "search.budget=3", "train.epochs=1",
    "train.batch_size=32", "train.learning_rate=0.003", "final.epochs=1", "final.patience=null",
    "objectives.latency_repeats=3",
]


def _quiet(*args, **kwargs) -> None:
    pass


def gpt2_like(space, layers: int, width: int) -> str:
    """The GPT-2-like architecture of ``layers`` x ``width`` in ``space``: attention, LayerNorm, GELU, learned
    positions, head dimension 16 where the space has such a head count (else its largest dividing count),
    kv_heads = heads, FFN x4 (the space's largest multiplier if it has no 4)."""
    options = {c.name: list(c.options) for c in space.choices}
    dividing = [h for h in options["layer1.heads"] if width % h == 0]
    if not dividing:
        raise ValueError(f"no head count of the space divides width {width}")
    heads = width // 16 if width // 16 in dividing else max(dividing)
    ffn = 4 if 4 in options["layer1.ffn_mult"] else max(options["layer1.ffn_mult"])
    parts = [f"layers={layers}", f"hidden={width}", "norm=layernorm", "activation=gelu", "mixer=attention",
             "position=learned"]
    for i in range(1, layers + 1):
        parts += [f"layer{i}.heads={heads}", f"layer{i}.kv_heads={heads}", f"layer{i}.ffn_mult={ffn}"]
    return space.to_string(space.from_string(";".join(parts)))


def decode_latencies(model, params_by_arch: dict[str, dict], encs: dict[str, np.ndarray], max_len: int,
                     rounds: int, calls: int) -> dict[str, dict]:
    """arch -> {"ms": median over rounds of the per-round median ms of one cached decode step (batch 1),
    "ci95": Student-t half-width over rounds, "rounds": [...]}; every network's step is compiled first, then the
    networks run in turn (order reversed every other round) ``rounds`` times."""
    steps = {}
    for arch, params in params_by_arch.items():
        _, twin = model.extract(params, encs[arch])
        twin.eval()
        graph, state = nnx.split(twin)

        def step(state, cache, token, graph=graph):
            return nnx.merge(graph, state).decode_step(cache, token)

        step = jax.jit(step)
        cache, token = twin.init_cache(1, max_len), jnp.zeros((1,), jnp.int32)
        jax.block_until_ready(step(state, cache, token))
        steps[arch] = (step, state, cache, token)
    per_round: dict[str, list[float]] = {a: [] for a in steps}
    order = list(steps)
    for r in range(rounds):
        for arch in order if r % 2 == 0 else order[::-1]:
            step, state, cache, token = steps[arch]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(step(state, cache, token))
                times.append(time.perf_counter() - start)
            per_round[arch].append(float(np.median(times)) * 1e3)
    out = {}
    for arch, values in per_round.items():
        half = student_t_ci(values)[1][1] - float(np.mean(values)) if len(values) > 1 else None
        out[arch] = {"ms": float(np.median(values)), "ci95": half, "rounds": values}
    return out


def dominated(searched: list[dict], baselines: list[dict]) -> list[dict]:
    """For every baseline point: the searched points that dominate it in (val_ppl, latency_ms) - no worse in
    both, better in one - and those that do so beyond the latency noise (lower perplexity, and the searched
    network's latency CI lies at or below the baseline's: mean + ci95 <= baseline's mean - ci95)."""
    out = []
    for b in baselines:
        by = [s["arch"] for s in searched
              if s["val_ppl"] <= b["val_ppl"] and s["latency_ms"] <= b["latency_ms"]
              and (s["val_ppl"] < b["val_ppl"] or s["latency_ms"] < b["latency_ms"])]
        robust = [s["arch"] for s in searched if s["val_ppl"] < b["val_ppl"]
                  and _high(s) <= b["latency_ms"] - (b.get("latency_ci95") or 0.0)]
        out.append({"baseline": b["arch"], "dominated_by": by, "beyond_noise_by": robust})
    return out


def _high(row: dict) -> float:
    return row["latency_ms"] + (row.get("latency_ci95") or 0.0)


def at_equal_params(searched: list[dict], baselines: list[dict]) -> list[dict]:
    """For every baseline: the searched network with at most its parameters and the lowest validation
    perplexity (None if the front has no network that small)."""
    rows = []
    for b in baselines:
        fits = [s for s in searched if s["params"] <= b["params"]]
        best = min(fits, key=lambda s: s["val_ppl"]) if fits else None
        rows.append({
            "baseline": b["arch"], "baseline_params": b["params"], "baseline_val_ppl": b["val_ppl"],
            "searched": best and best["arch"], "searched_params": best and best["params"],
            "searched_val_ppl": best and best["val_ppl"],
            "searched_wins": bool(best and best["val_ppl"] < b["val_ppl"]),
        })
    return rows


def torch_ratio(evaluator: TrainEvaluator, archs: list[str], repeats: int, threads: int) -> dict:
    """One epoch of the population ``archs`` trained by `train_population` vs PyTorch eager one after another
    (``evaluator``'s data, model and optimiser: the retraining's compiled epoch is reused for the same P)."""
    import torch
    from lm_reference import torch_lm_from_twin, train_sequential
    from population_timing import summary, timed

    torch.set_num_threads(threads)
    cfg, model, d, optimizer = evaluator.cfg, evaluator.model, evaluator.data, evaluator.optimizer
    space = model.supernet.space
    encs = np.stack([space.from_string(a) for a in archs])
    params_P = pop.init_population(model.init, jax.random.key(cfg.seed), len(archs))
    keys = pop.candidate_keys(jax.random.key(cfg.seed), len(archs))
    batch = cfg.train.batch_size
    n_train = int(d.train_x.shape[0])
    order = [epoch_indices(n_train, batch, cfg.seed, 0)]
    train_x, train_y = np.asarray(d.train_x), np.asarray(d.train_y)
    val_x, val_y = np.asarray(d.val_x), np.asarray(d.val_y)
    twins = []
    for p in range(len(archs)):
        params = jax.tree.map(lambda a, p=p: a[p], params_P)
        _, twin = model.extract(params, encs[p])
        twins.append((LMArch.from_encoding(space, encs[p]), twin))
    sn = model.supernet

    def jax_epoch():
        result = pop.train_population(model.apply, params_P, jnp.asarray(encs), optimizer, d.train_x, d.train_y,
                                      d.val_x, d.val_y, epochs=1, batch_size=batch, seed=cfg.seed, keys=keys)
        jax.block_until_ready(result.params)
        return result

    def sized_epoch():
        result = lm_sized.train_lm_sized(model, params_P, encs, optimizer, d.train_x, d.train_y, d.val_x, d.val_y,
                                         epochs=1, batch_size=batch, seed=cfg.seed)
        jax.block_until_ready(result.params)
        return result

    def torch_epoch():
        models = [torch_lm_from_twin(twin, arch, vocab_size=sn.vocab_size, positions=sn.seq_len)
                  for arch, twin in twins]
        return train_sequential(models, train_x, train_y, val_x, val_y, epochs=1, batch_size=batch,
                                lr=cfg.train.learning_rate, batches=order)

    first, trained = timed(jax_epoch)
    sized_first, _ = timed(sized_epoch)
    torch_epoch()  # warm-up (allocator, kernels)
    jax_times, sized_times, torch_times, torch_rows = [], [], [], None
    for _ in range(repeats):
        t, trained = timed(jax_epoch)
        jax_times.append(t)
        t, sized_result = timed(sized_epoch)
        sized_times.append(t)
        t, torch_rows = timed(torch_epoch)
        torch_times.append(t)
    scores = evaluator.score(trained.params, encs, d.val_x, d.val_y, shared=False)
    jax_losses = np.asarray(trained.train_loss)[-1]
    macs = np.array([model.macs(e) for e in encs], float)
    largest = float(model.macs(model.supernet.largest(jnp.asarray(encs[0]))))
    jax_s, sized_s, torch_s = summary(jax_times), summary(sized_times), summary(torch_times)
    return {
        "population": len(archs), "threads": threads, "repeats": repeats, "batches": int(order[0].shape[0]),
        "batch_size": batch, "jax_first_call_seconds": round(first, 3), "jax_epoch": jax_s, "torch_epoch": torch_s,
        "torch_over_jax_steady": torch_s["median"] / jax_s["median"],
        "torch_over_jax_first_call": torch_s["median"] / first,
        "sized_first_call_seconds": round(sized_first, 3), "sized_epoch": sized_s,
        "torch_over_sized_steady": torch_s["median"] / sized_s["median"],
        "sized_train_loss": [float(v) for v in np.asarray(sized_result.train_loss)[-1]],
        "padded_fraction": float(macs.mean() / largest),
        "jax_train_loss": [float(v) for v in jax_losses], "torch_train_loss": [r["train_loss"] for r in torch_rows],
        "jax_val_loss": [float(v) for v in scores["loss"]], "torch_val_loss": [r["val_loss"] for r in torch_rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny space and data, 1 epoch, 1 seed: a smoke run")
    parser.add_argument("--front", type=int, help="most front members retrained (default 6; quick 2)")
    parser.add_argument("--grid-layers", help="baseline depths, comma-separated (default 1,2,3; quick 1)")
    parser.add_argument("--grid-widths", help="baseline widths, comma-separated (default 32,64,96; quick 16,32)")
    parser.add_argument("--headline", help="the hand-picked baseline as LAYERSxWIDTH (default 2x64; quick 1x32)")
    parser.add_argument("--retrain-seeds", type=int, help="seeds of the retraining (default 2; quick 1)")
    parser.add_argument("--latency-rounds", type=int, help="interleaved latency rounds (default 7; quick 2)")
    parser.add_argument("--latency-calls", type=int, default=50, help="decode steps per network and round")
    parser.add_argument("--repeats", type=int, help="interleaved repeats of the torch comparison (default 3; quick 1)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--skip-torch", action="store_true", help="leave the PyTorch comparison out")
    parser.add_argument("--torch-only", type=Path, metavar="REPORT",
                        help="run only the PyTorch comparison, on the networks of an earlier --json report (same "
                             "options and overrides as that run), and add it to that report")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="RunConfig overrides for every run")
    args = parser.parse_args(argv)
    quick = args.quick
    front_max = args.front or (2 if quick else 6)
    retrain_seeds = args.retrain_seeds or (1 if quick else 2)
    rounds = args.latency_rounds or (2 if quick else 7)
    repeats = args.repeats or (1 if quick else 3)
    try:
        grid_layers = [int(v) for v in (args.grid_layers or ("1" if quick else "1,2,3")).split(",")]
        grid_widths = [int(v) for v in (args.grid_widths or ("16,32" if quick else "32,64,96")).split(",")]
        head_layers, head_width = (int(v) for v in (args.headline or ("1x32" if quick else "2x64")).split("x"))
        if min(front_max, retrain_seeds, rounds, repeats, args.latency_calls, args.torch_threads) < 1:
            raise ValueError("--front, --retrain-seeds, --latency-rounds, --latency-calls, --repeats and "
                             "--torch-threads must be >= 1")
        cfg = load_config(RunConfig, None, [*BASE, *(QUICK if quick else FULL), *args.overrides])
        space = build_space(cfg.space)
        grid = {(n, w): gpt2_like(space, n, w) for n in grid_layers for w in grid_widths}
        headline = gpt2_like(space, head_layers, head_width)
    except ValueError as error:
        print(f"error: {' '.join(str(error).split())}; grid and headline sizes must be options of the space "
              "(space.max_layers, space.hidden)", file=sys.stderr)
        return 2
    dataset = load_text(cfg.data.text_config())
    model = model_for(space, cfg.space, (dataset.info.seq_len,), dataset.info.vocab_size)
    if args.torch_only:
        return _torch_only(args.torch_only, cfg, model, dataset, repeats, args.torch_threads)
    print(f"data {cfg.data.name}: {dataset.train.windows.shape[0]} train windows of {cfg.data.seq_len} tokens; "
          f"space lm: <= {cfg.space.max_layers} layers, hidden {list(cfg.space.hidden)}, mixers "
          f"{list(cfg.space.mixers)}; search {cfg.search.budget} candidates x {cfg.train.epochs} epochs; "
          f"retraining {cfg.final.epochs} epochs x {retrain_seeds} seeds", flush=True)

    with tempfile.TemporaryDirectory(prefix="jaxnas-lm-") as folder:
        run = dataclasses.replace(cfg, output=str(Path(folder) / "search"))
        summary_ = run_search(run, log=_quiet)
        pareto = json.loads((Path(run.output) / "pareto.json").read_text())
        with (Path(run.output) / "history.csv").open() as f:
            candidates = [{"arch": r["arch"], "status": r["status"], "val_ppl": float(r["val_ppl"]),
                           "latency_ms_per_token": float(r["latency_ms_per_token"]), "params": float(r["params"])}
                          for r in csv.DictReader(f) if r["status"] in ("ok", "early_stopped")]
    front = sorted(pareto["front"], key=lambda r: r["values"]["val_ppl"])[:front_max]
    print(f"search: {summary_['evaluations']} candidates in {summary_['search_seconds']:.1f} s; front of "
          f"{len(pareto['front'])}, retraining {len(front)}", flush=True)

    searched = [r["arch"] for r in front]
    baselines = list(dict.fromkeys([*grid.values(), headline]))
    archs = list(dict.fromkeys(searched + baselines))
    encs = {a: space.from_string(a) for a in archs}
    start = time.perf_counter()
    evaluator = TrainEvaluator(cfg, model, dataset)
    result = evaluator.final(np.stack([encs[a] for a in archs]), seeds=retrain_seeds)
    retrain_seconds = time.perf_counter() - start
    params_P = pop.init_population(model.init, jax.random.key(cfg.seed), 1)
    one = jax.tree.map(lambda a: a[0], params_P)  # latency does not depend on the weights' values
    latency = decode_latencies(model, {a: one for a in archs}, encs, cfg.data.seq_len, rounds, args.latency_calls)

    rows = {}
    for i, a in enumerate(archs):
        val = [perplexity(v[i]) for v in result["val_loss"]]
        test = [perplexity(t[i]) for t in result["test_loss"]]
        rows[a] = {"arch": a, "params": int(model.param_count(encs[a])), "macs_per_token": int(model.macs(encs[a])),
                   "val_ppl": float(np.mean(val)), "val_ppl_seeds": val, "test_ppl": float(np.mean(test)),
                   "test_ppl_seeds": test, "latency_ms": latency[a]["ms"], "latency_ci95": latency[a]["ci95"],
                   "search_values": next((r["values"] for r in front if r["arch"] == a), None)}
    s_rows, b_rows = [rows[a] for a in searched], [rows[a] for a in grid.values()]
    dom = dominated(s_rows, b_rows)
    equal = at_equal_params(s_rows, [rows[headline], *b_rows])
    values = np.array([[r["val_ppl"], r["latency_ms"]] for r in rows.values()])
    joint = pareto_mask(values, ["val_ppl:min", "latency_ms:min"])
    report = {
        "config": to_dict(cfg), "retrain_seeds": retrain_seeds, "search_seconds": summary_["search_seconds"],
        "search_evaluations": summary_["evaluations"], "front_size": len(pareto["front"]),
        "search_candidates": candidates,
        "retrain_seconds": round(retrain_seconds, 2), "latency": {"rounds": rounds, "calls": args.latency_calls},
        "searched": s_rows, "baselines": b_rows,
        "headline": {**equal[0], "layers_x_width": f"{head_layers}x{head_width}"},
        "equal_params": equal[1:], "dominance": dom, "dominated_count": sum(bool(d["dominated_by"]) for d in dom),
        "dominated_beyond_noise_count": sum(bool(d["beyond_noise_by"]) for d in dom),
        "joint_front": [a for a, m in zip(rows, joint) if m], "torch": None,
    }
    if not args.skip_torch:
        report["torch"] = torch_ratio(evaluator, archs, repeats, args.torch_threads)
    print(_table(report, grid))
    text = json.dumps(report, indent=2)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return 0


def _torch_only(path: Path, cfg: RunConfig, model, dataset, repeats: int, threads: int) -> int:
    """The PyTorch comparison on the networks of the report at ``path``, written back into it."""
    try:
        report = json.loads(path.read_text())
        archs = list(dict.fromkeys(r["arch"] for r in report["searched"] + report["baselines"]))
        if report["config"]["space"] != to_dict(cfg)["space"]:
            raise ValueError("its space differs from this run's: pass the same options and overrides")
    except (OSError, ValueError, KeyError) as error:
        print(f"error: --torch-only {path}: {error}; expected a report written by benchmarks/lm.py --json",
              file=sys.stderr)
        return 2
    report["torch"] = torch_ratio(TrainEvaluator(cfg, model, dataset), archs, repeats, threads)
    report["dominance"] = dominance = dominated(report["searched"], report["baselines"])  # reports of older versions
    report["dominated_beyond_noise_count"] = sum(bool(d["beyond_noise_by"]) for d in dominance)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(_table(report, {}))
    return 0


def _short(arch: str) -> str:
    """A compact label: layers x hidden, mixer, norm, activation, position, per-layer heads/kv and ffn."""
    d = dict(kv.split("=") for kv in arch.split(";"))
    layers = int(d["layers"])
    heads = "/".join(f"{d[f'layer{i}.heads']}:{d[f'layer{i}.kv_heads']}" for i in range(1, layers + 1)
                     if f"layer{i}.heads" in d)
    ffn = "/".join(d[f"layer{i}.ffn_mult"] for i in range(1, layers + 1))
    parts = [f"{layers}x{d['hidden']}", d["mixer"], d["norm"], d["activation"], d.get("position", "-"),
             f"heads {heads}" if heads else "", f"ffn {ffn}"]
    return " ".join(p for p in parts if p)


def _table(report: dict, grid: dict) -> str:
    lines = ["", f"{'network':<62} {'params':>8} {'val ppl':>8} {'test ppl':>8} {'ms/token':>14}"]
    names = {a: f"gpt2-like {n}x{w}" for (n, w), a in grid.items()}
    for label, group in (("searched (front)", report["searched"]), ("baseline grid", report["baselines"])):
        lines.append(f"-- {label}")
        for r in group:
            ci = f" ±{r['latency_ci95']:.3f}" if r["latency_ci95"] is not None else ""
            name = names.get(r["arch"], _short(r["arch"]))
            lines.append(f"{name:<62.62} {r['params']:>8,} {r['val_ppl']:>8.3f} {r['test_ppl']:>8.3f} "
                         f"{r['latency_ms']:>7.3f}{ci:<7}")
    h = report["headline"]
    if h["searched"] is None:
        lines.append(f"headline gpt2-like {h['layers_x_width']} ({h['baseline_params']:,} params, val ppl "
                     f"{h['baseline_val_ppl']:.3f}): no searched network has at most its parameters")
    else:
        lines.append(f"headline gpt2-like {h['layers_x_width']} ({h['baseline_params']:,} params): val ppl "
                     f"{h['baseline_val_ppl']:.3f}; searched {_short(h['searched'])} "
                     f"({h['searched_params']:,} params): "
                     f"{h['searched_val_ppl']:.3f} -> {'searched wins' if h['searched_wins'] else 'baseline wins'}")
    wins = sum(r["searched_wins"] for r in report["equal_params"])
    compared = sum(r["searched"] is not None for r in report["equal_params"])
    lines.append(f"at equal parameter count (the best searched network with at most the baseline's parameters): "
                 f"searched wins at {wins} of {compared} grid points ({len(report['equal_params']) - compared} "
                 "smaller than every searched network)")
    lines.append(f"the searched front dominates {report['dominated_count']} of {len(report['baselines'])} grid "
                 f"points in (val ppl, ms/token); {report['dominated_beyond_noise_count']} beyond the latency noise "
                 "(lower perplexity and a latency CI entirely below the baseline's)")
    t = report["torch"]
    if t is not None:
        lines.append(f"one epoch of {t['population']} LMs ({t['batches']} batches of {t['batch_size']}): jaxnas "
                     f"population {t['jax_epoch']['median']:.2f} s steady (first call {t['jax_first_call_seconds']:.2f}"
                     f" s: it compiles unless the retraining compiled this population size), PyTorch eager one after "
                     f"another {t['torch_epoch']['median']:.2f} s ({t['threads']} thread(s)): torch / jaxnas = "
                     f"{t['torch_over_jax_steady']:.2f}x; padded fraction "
                     f"{t['padded_fraction']:.2f} (candidate MACs / the largest network's, one mixer counted)")
        lines.append(f"the sized backend (each twin at its own sizes, jaxnas.population.lm_sized): "
                     f"{t['sized_epoch']['median']:.2f} s steady (first call {t['sized_first_call_seconds']:.2f} s, "
                     f"compiling each twin layout): torch / jaxnas sized = {t['torch_over_sized_steady']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
