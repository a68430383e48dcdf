"""SeqGate on SmolLM2-135M (CPU, pydoc text): full model vs static pruning vs SeqGate with and without memory.

Everything runs in this process, on the embedded model and text (no download):

1. Calibration on validation (`torch_gating.seqgate.experiment.rank_layers`): static block importance and layer
   tolerance once; the most tolerant ``--layers`` layers are gated.
2. For each guardrail (default 1%, 2%, 5%): `calibrate_policy` (experiences, sentinel, threshold, budget
   level, memory) and `enforce_guardrail` on the validation stream, which tightens the whole policy until its
   ΔPPL holds. Arms at that guardrail:
   - *seqgate*: the final policy, memory on (the product);
   - *seqgate, memory off*: the same policy with the memory removed (current evidence only);
   - *static*: one fixed kept set for every sequence and token, scored by the calibrated static importance, on
     the same layers with the same starting budgets and alignment, its ``Bg`` halved on validation until its
     ΔPPL holds the guardrail (`static_sweep`) — what pruning without per-sequence decisions gives at the same
     guardrail.
3. Report on the test stream (read only after every guardrail has been enforced): ΔPPL of every arm, the
   fraction of MLP (and whole-model) MACs removed per token, and interleaved prefill and greedy batch-1
   KV-cache decode timing (`torch_gating.timing.interleaved_benchmark`: warm-up, arms alternating A B C D,
   D C B A, ..., ``--repeats`` ≥ 5, paired Student-t 95% CIs of the gain over the full model; SeqGate's probe
   and decision are inside the timed call).
4. Why the gains are what they are: the MACs each arm removes, and the measured cost of the gated MLP kernels
   themselves (every layer's MLP at full width vs with 2 and 6 of its 24 blocks removed, `GatedMLP` on per-run
   views and on dense copies of the kept weights, the copy inside the timer), at one token (decode) and a
   window (prefill).

SeqGate and static pruning run on dense copies (``Settings.copy_weights``, the default); a per-sequence
policy makes its copies on every sequence, inside the timed call.

    python benchmarks/seqgate.py                       # ~15 min on 2 shared cores
    python benchmarks/seqgate.py --json seqgate.json
    python benchmarks/seqgate.py --quick               # tiny budgets: a smoke run (< 2 min), numbers meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interop._atomic import atomic_write_text  # noqa: E402
from torch_gating.adapters import ModelAdapter, adapter_for  # noqa: E402
from torch_gating.models import EMBEDDED_MODEL, ModelNotAvailableError, load_model, tiny_random_model  # noqa: E402
from torch_gating.perplexity import delta_ppl  # noqa: E402
from torch_gating.seqgate import SeqGatePolicy  # noqa: E402
from interop.jsonsafe import json_safe  # noqa: E402
from torch_gating.seqgate.experiment import (  # noqa: E402
    Settings,
    calibrate_policy,
    calibration_windows,
    enforce_guardrail,
    full_ppl,
    gate_stats,
    kept_ppl,
    kept_sets_differ,
    policy_ppl,
    rank_layers,
    static_stats,
    time_arms,
)
from torch_gating.text import TextNotAvailableError, load_text, tokenize_text  # noqa: E402
from torch_gating.timing import format_table, interleaved_benchmark  # noqa: E402

GUARDRAILS = (0.01, 0.02, 0.05)
TARGET_GAIN = 0.05  # the target: +5% prefill and decode tokens/s at test ΔPPL ≤ 1%
ARMS = ("static", "seqgate", "seqgate, memory off")
# Budgets the guardrail tightens from: large enough that even the 5% guardrail has to tighten, so every
# guardrail finds its own policy (ExNAS's bl = 0.12, Bg = 0.06 already hold 1% here and would leave a flat frontier).
FULL = dict(bl=0.5, Bg=0.25, n_gated=15, window=256, probe_tokens=64, calibration_windows=4, max_tokens=1024,
            repeats=5, timing_windows=1, decode_prompt=128, decode_tokens=32, max_tightening=6)
QUICK = dict(bl=0.5, Bg=0.25, n_gated=4, window=48, probe_tokens=16, calibration_windows=1, max_tokens=96,
             repeats=5, timing_windows=1, decode_prompt=24, decode_tokens=2, max_tightening=2)
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
# Calibration windows used for the layer-tolerance ranking (each costs one forward per layer); the experiences
# (sentinel, threshold, memory) use all of Settings.calibration_windows.
TOLERANCE_WINDOWS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, a smoke run (< 2 min); numbers are meaningless")
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"{EMBEDDED_MODEL} (default), any torch_gating model name, or {', '.join(TINY_MODELS)} (random)")
    p.add_argument("--text", default="pydoc", help="pydoc (default), wikitext-2 or a text file")
    p.add_argument("--guardrails", default=",".join(str(g) for g in GUARDRAILS), help="comma-separated ΔPPL limits")
    for name, kind, what in (
        ("bl", float, "starting per-layer budget (fraction of a layer's blocks)"),
        ("Bg", float, "starting global budget (fraction of the gated layers' blocks)"),
        ("layers", int, "gated layers (the most tolerant ones)"),
        ("window", int, "tokens per window (perplexity, prefill, calibration)"),
        ("probe-tokens", int, "tokens probed at full width per sequence"),
        ("calibration-windows", int, "validation windows for calibration"),
        ("max-tokens", int, "tokens of each split (validation, test)"),
        ("repeats", int, "timed repeats per arm (>= 5)"),
        ("decode-tokens", int, "greedy tokens generated per timed decode call"),
    ):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: full run / --quick preset)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on our shared 2-core machine 2 threads ran 3x slower)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def settings_of(args) -> Settings:
    preset = dict(QUICK if args.quick else FULL)
    overrides = dict(bl=args.bl, Bg=args.Bg, n_gated=args.layers, window=args.window, probe_tokens=args.probe_tokens,
                     calibration_windows=args.calibration_windows, max_tokens=args.max_tokens, repeats=args.repeats,
                     decode_tokens=args.decode_tokens)
    preset.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**preset, progress=not args.no_progress)


def load(name: str):
    if name in TINY_MODELS:
        model, tokenizer, info = tiny_random_model(name.removeprefix("tiny-"), seed=0, n_layers=6)
        return model, tokenizer, info, 16  # tiny MLPs have 256 neurons: blocks of 16
    model, tokenizer, info = load_model(name)
    return model, tokenizer, info, 64


def run(args, settings: Settings, guardrails: tuple[float, ...]) -> dict:
    model, tokenizer, info, block = load(args.model)
    settings = dataclasses.replace(settings, block=block, align=block)
    corpus = load_text(args.text)
    adapter = adapter_for(model, block=block, copy_weights=settings.copy_weights)
    started = time.perf_counter()
    with adapter, torch.inference_mode():
        result = _run(adapter, tokenizer, corpus, settings, guardrails)
    result.update(model=dataclasses.asdict(info), seconds=time.perf_counter() - started,
                  settings=dataclasses.asdict(settings), threads=torch.get_num_threads(),
                  loadavg_end=list(os.getloadavg()))
    return result


def _run(adapter: ModelAdapter, tokenizer, corpus, settings: Settings, guardrails) -> dict:
    model = adapter.model
    calib = calibration_windows(tokenizer, corpus, settings, "cpu")
    importance, tolerance, gated_layers = rank_layers(adapter, calib[:TOLERANCE_WINDOWS], settings)
    validation_ids = tokenize_text(tokenizer, corpus.validation)[: settings.max_tokens]
    static_levels = static_sweep(adapter, importance, gated_layers, settings, validation_ids, min(guardrails))

    points = []
    for guardrail in guardrails:
        at = dataclasses.replace(settings, guardrail=guardrail)
        policy, _, ratios = calibrate_policy(adapter, calib, gated_layers, at)
        calibrated = dict(tau=policy.tau, Bg=policy.Bg, sentinel=policy.sentinel)
        steps = enforce_guardrail(policy, validation_ids, at, ratios)
        level = next((lv for lv in static_levels if lv["delta_ppl_validation"] <= guardrail),
                     dict(Bg=0.0, kept={}, delta_ppl_validation=0.0))
        points.append(dict(guardrail=guardrail, policy=policy, calibrated=calibrated, steps=steps, static=level["kept"],
                           static_Bg=level["Bg"], static_validation=level["delta_ppl_validation"]))

    # Report phase: the test split is read here for the first time.
    test_ids = tokenize_text(tokenizer, corpus.test)[: settings.max_tokens]
    base = full_ppl(model, test_ids, settings)
    out_points = []
    for point in points:
        policy = point["policy"]
        no_memory = dataclasses.replace(policy, memory=None, decisions=[])
        on, decisions_on = policy_ppl(policy, test_ids, settings)
        off, decisions_off = policy_ppl(no_memory, test_ids, settings)
        static_test = kept_ppl(adapter, point["static"], test_ids, settings)
        timing = time_arms(adapter, test_ids, settings, policies={"seqgate": policy, "seqgate, memory off": no_memory},
                           static={"static": point["static"]})
        stats = {"seqgate": gate_stats(adapter, gated_layers, decisions_on),
                 "seqgate, memory off": gate_stats(adapter, gated_layers, decisions_off),
                 "static": static_stats(adapter, point["static"])}
        ppl = {"seqgate": on, "seqgate, memory off": off, "static": static_test}
        final = point["steps"][-1]
        validation = {"seqgate": final["delta_ppl"], "seqgate, memory off": None, "static": point["static_validation"]}
        arms = {}
        for name in ARMS:
            arms[name] = dict(
                delta_ppl_validation=validation[name], delta_ppl_test=delta_ppl(base, ppl[name]),
                **dataclasses.asdict(stats[name]),
                **{f"{w}_gain": timing[w].gains[name].gain for w in timing},
                **{f"{w}_gain_ci95": list(timing[w].gains[name].gain_ci95) for w in timing},
            )
        out_points.append(dict(
            guardrail=point["guardrail"], tau=policy.tau, Bg=policy.Bg, sentinel=policy.sentinel, static_Bg=point["static_Bg"],
            calibrated=point["calibrated"], guardrail_steps=point["steps"], holds=final["holds"],
            static_kept_blocks={str(l): k for l, k in point["static"].items()},
            decisions_changed_by_memory=float(np.mean([kept_sets_differ(a, b) for a, b in zip(decisions_on, decisions_off)])),
            arms=arms,
            timing={w: r.to_dict() for w, r in timing.items()},
            timing_tables={w: format_table(r) for w, r in timing.items()},
        ))
    return dict(
        ppl_full_test=base.ppl, test_tokens=base.n_tokens, validation_tokens=int(validation_ids.numel()),
        calibration_tokens=int(calib.numel()), gated_layers=gated_layers,
        layer_tolerance={str(l): t for l, t in tolerance.items()}, points=out_points,
        static_levels=[dict(Bg=lv["Bg"], delta_ppl_validation=lv["delta_ppl_validation"]) for lv in static_levels],
        kernels=kernel_costs(adapter, settings),
    )


def static_sweep(adapter: ModelAdapter, importance, gated_layers: list[int], settings: Settings,
                 validation_ids: torch.Tensor, smallest_guardrail: float) -> list[dict]:
    """Static pruning tightened on validation like SeqGate: ``Bg`` halved from the starting budget (same layers,
    ``bl`` and alignment; kept blocks by the calibrated static importance) until its ΔPPL holds the smallest
    guardrail. Returns ``[{"Bg", "kept", "delta_ppl_validation"}]``, largest ``Bg`` first."""
    base = full_ppl(adapter.model, validation_ids, settings)
    levels, Bg = [], settings.Bg
    for _ in range(settings.max_tightening):
        policy = SeqGatePolicy(adapter, gated_layers, sentinel=gated_layers[0], tau=-math.inf, bl=settings.bl, Bg=Bg,
                               align=settings.align)
        kept = policy.static_kept(importance)
        dppl = delta_ppl(base, kept_ppl(adapter, kept, validation_ids, settings))
        levels.append(dict(Bg=Bg, kept=kept, delta_ppl_validation=dppl))
        if dppl <= smallest_guardrail:
            break
        Bg /= 2
    return levels


def kernel_costs(adapter: ModelAdapter, settings: Settings) -> dict:
    """Measured cost of the gated MLPs alone: every layer's MLP, full vs 2 and 6 blocks removed, on per-run views
    and on dense copies (the copy is made inside the timed call, once per call of ``n_calls`` forwards)."""
    n_blocks = math.ceil(adapter.mlp_width / adapter.block)
    # 2 blocks removed apart from each other (3 runs: what the budget cuts usually leave) and 6 spread out.
    removed = {n: {int(b) for b in np.linspace(1, n_blocks - 2, n).round()} for n in (2, 6)}
    mlps = adapter.gated_mlps()
    out = {}
    for tokens in (1, settings.window):
        x = torch.randn(1, tokens, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
        n_calls = 20 if tokens == 1 else 1
        arms, ideal = {}, {}

        def arm_of(kept, copy_weights):
            def arm():
                for mlp in mlps:
                    mlp.copy_weights = copy_weights
                adapter.set_kept({l: kept for l in range(adapter.n_layers)})
                try:
                    for _ in range(n_calls):
                        for mlp in mlps:
                            mlp(x)
                finally:
                    adapter.reset()
                return n_calls * tokens

            return arm

        arms["full"] = arm_of(None, False)
        for n_removed, drop in removed.items():
            kept = [b for b in range(n_blocks) if b not in drop]
            ideal[f"-{n_removed}/{n_blocks} blocks"] = len(drop) / n_blocks
            arms[f"-{n_removed}/{n_blocks} blocks, views"] = arm_of(kept, False)
            arms[f"-{n_removed}/{n_blocks} blocks, dense copy"] = arm_of(kept, True)
        try:
            result = interleaved_benchmark(arms, repeats=settings.repeats, warmup=1)
        finally:
            for mlp in mlps:
                mlp.copy_weights = settings.copy_weights
        out[str(tokens)] = dict(result=result.to_dict(), table=format_table(result), ideal_time_saved=ideal,
                                forwards_per_call=n_calls)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.2%}"


def _gain(arm: dict, workload: str) -> str:
    low, high = arm[f"{workload}_gain_ci95"]
    return f"{arm[f'{workload}_gain']:+.2%} [{low:+.2%}, {high:+.2%}]"


def format_results(r: dict) -> str:
    lines = [
        f"model {r['model']['name']} ({r['model']['n_layers']} layers, MLP {r['model']['mlp_width']}), "
        f"torch threads {r['threads']}, load average at start {r['loadavg_start'][0]:.2f} "
        f"{r['loadavg_start'][1]:.2f} {r['loadavg_start'][2]:.2f}, at end {r['loadavg_end'][0]:.2f} "
        f"{r['loadavg_end'][1]:.2f} {r['loadavg_end'][2]:.2f}",
        f"tokens: calibration {r['calibration_tokens']}, validation {r['validation_tokens']}, test {r['test_tokens']}; "
        f"gated layers {r['gated_layers']}; test ppl full model {r['ppl_full_test']:.3f}",
        "",
        "guardrail policies (enforced on validation; tau: sentinel-ratio threshold, Bg: global budget):",
    ]
    for p in r["points"]:
        lines.append(
            f"  {p['guardrail']:.0%}: calibrated tau {p['calibrated']['tau']:.4g} Bg {p['calibrated']['Bg']:.4g} "
            f"-> final tau {p['tau']:.4g} Bg {p['Bg']:.4g} after {len(p['guardrail_steps'])} step(s), "
            f"holds {p['holds']}, sentinel {p['sentinel']}, decisions changed by memory "
            f"{p['decisions_changed_by_memory']:.0%}; static pruning Bg {p['static_Bg']:.4g}"
        )
    header = (f"{'guardrail':>9}  {'arm':<19}  {'val ΔPPL':>8}  {'test ΔPPL':>9}  {'gated':>5}  {'MLP MACs -':>10}  "
              f"{'model MACs -':>12}  {'prefill gain [95% CI]':>26}  {'decode gain [95% CI]':>26}")
    lines += ["", "test split (gains: tokens/s vs the full model, paired interleaved repeats):", header,
              "-" * len(header)]
    for p in r["points"]:
        for name, arm in p["arms"].items():
            lines.append(
                f"{p['guardrail']:>9.0%}  {name:<19}  {_pct(arm['delta_ppl_validation']):>8}  "
                f"{_pct(arm['delta_ppl_test']):>9}  {arm['fraction_gated']:>5.0%}  {arm['mlp_macs_saved_fraction']:>10.2%}  "
                f"{arm['model_macs_saved_fraction']:>12.2%}  {_gain(arm, 'prefill'):>26}  {_gain(arm, 'decode'):>26}"
            )
    first = next((p for p in r["points"] if p["guardrail"] <= 0.01), None)
    if first is not None:
        arm = first["arms"]["seqgate"]
        met = (arm["delta_ppl_test"] <= 0.01 and all(
            arm[f"{w}_gain"] >= TARGET_GAIN and arm[f"{w}_gain_ci95"][0] > 0 for w in ("prefill", "decode")))
        lines += ["", f"target (SeqGate at guardrail 1%: test ΔPPL ≤ 1%, prefill and decode gain ≥ +5% with CI lower "
                      f"bounds > 0): {'met' if met else 'not met'}"]
    lines += ["", "gated MLP kernels alone (every layer's MLP per call; ideal time saved = the MACs removed):"]
    for tokens, k in r["kernels"].items():
        ideal = ", ".join(f"{name} -{f:.1%}" for name, f in k["ideal_time_saved"].items())
        lines += [f"  {tokens} token(s) per forward, {k['forwards_per_call']} forward(s) per call (ideal time saved "
                  f"{ideal}):", k["table"]]
    for p in r["points"]:
        for workload, table in p["timing_tables"].items():
            lines += ["", f"guardrail {p['guardrail']:.0%}, {workload} tokens/s:", table]
    lines.append(f"\ntotal {r['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loadavg_start = list(os.getloadavg())
    try:
        settings = settings_of(args)
        guardrails = tuple(float(g) for g in args.guardrails.split(",") if g.strip())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = run(args, settings, guardrails)
    except (ModelNotAvailableError, TextNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["loadavg_start"] = loadavg_start
    if args.json:  # first, so a long run's numbers survive any printing problem
        atomic_write_text(args.json, json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    print(format_results(result))
    if args.json:
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
