"""The SeqGate experiment: its :class:`Settings` and the run (:func:`run_seqgate`) that calibrates on
validation, enforces the guardrail on validation and reports on test.

Phases, in this order (the test split is read only in phase 3):

1. calibration (:mod:`torch_gating.seqgate.calibrate`) on windows of the corpus's calibration documents;
2. guardrail (:func:`enforce_guardrail`): the whole policy's sliding-window ΔPPL on the validation token
   stream; while it exceeds the guardrail the policy is tightened — alternately ``Bg`` halved and
   ``tau`` lowered so that half as many calibration windows are gated — down to never gating;
3. report on the test token stream: ΔPPL, fraction of windows gated, kept fraction, MACs saved per
   token, the memory on/off ablation, and (``repeats > 0``) interleaved prefill and decode timing;
   then, for each further guardrail of ``Settings.frontier``, phases 2–3 again from the same calibration
   (the frontier users choose a guardrail from; see :func:`plot_frontier`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from interop._atomic import atomic_write_bytes
from torch_gating.adapters import ModelAdapter, adapter_for, mlp_macs_per_token, model_macs_per_token
from torch_gating.perplexity import delta_ppl, sliding_window_ppl
from torch_gating.seqgate.calibrate import (
    build_memory,
    choose_sentinel,
    choose_level,
    collect_experiences,
    layer_tolerance,
    most_tolerant,
    static_importance,
)
from torch_gating.seqgate.policy import Decision, SeqGatePolicy
from torch_gating.text import tokenize_text, token_windows
from torch_gating.timing import (
    MIN_REPEATS,
    format_table,
    greedy_decode_workload,
    interleaved_benchmark,
    prefill_workload,
)


def _field(default, help: str, **limits):
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class Settings:
    """Knobs of one run, immutable. The CLI builds them through :mod:`interop.config` (YAML file, flags,
    ``key=value`` overrides), which checks each field's type and its metadata bounds; ``__post_init__``
    checks the rules between fields. Derive a variant with :func:`dataclasses.replace`."""

    guardrail: float = _field(0.01, "Max ΔPPL on validation, relative (0.01 = +1%).", nonfinite=True)
    bl: float = _field(0.12, "Per-layer budget: max fraction of a layer's blocks removed.", min=0.0, max=1.0)
    Bg: float = _field(0.06, "Global budget: max fraction of all gated layers' blocks removed.", min=0.0, max=1.0)
    align: int = _field(64, "Kept neuron counts are multiples of this (64 or 128).", min=1)
    block: int = _field(64, "Neurons per selectable block.", min=1)
    copy_weights: bool = _field(True, "Gated layers compute decode steps on contiguous copies of the kept weights "
                                "(see torch_gating.gated_mlp).")
    n_gated: int | None = _field(None, "Number of gated layers (None: a third of the layers).", min=1)
    drop_fraction: float = _field(0.25, "Fraction of a layer's blocks dropped to rank layer tolerance.",
                                  min=0.0, max=1.0)
    probe_tokens: int = _field(64, "Tokens probed at full width per sequence.", min=1)
    window: int = _field(512, "Tokens per window (perplexity, prefill, calibration).", min=1)
    stride: int | None = _field(None, "Sliding-window perplexity stride (None: window // 2).", min=1)
    calibration_windows: int = _field(16, "Validation windows used for calibration.", min=1)
    max_tokens: int = _field(16384, "Tokens used of each split (validation stream, test stream).", min=1)
    wcur: float = _field(0.8, "Weight of the current sequence's evidence in block scores.", min=0.0)
    wmem: float = _field(0.2, "Weight of the experiential memory's evidence in block scores.", min=0.0)
    max_tightening: int = _field(8, "Guardrail tightening steps before the policy never gates.", min=0)
    repeats: int = _field(5, f"Timed interleaved repeats per arm (>= {MIN_REPEATS}; 0 skips timing).", min=0)
    warmup: int = _field(1, "Untimed warm-up rounds of every arm before timing.", min=1)
    timing_windows: int = _field(2, "Prefill windows per timed call.", min=1)
    decode_prompt: int = _field(128, "Prompt tokens before generation (timing).", min=1)
    decode_tokens: int = _field(32, "Greedy tokens generated per timed call.", min=1)
    frontier: tuple[float, ...] = _field((), "Further guardrails reported from the same calibration, e.g. "
                                         "[0.02, 0.05].", nonfinite=True)
    progress: bool = _field(False, "Show progress bars.")

    def __post_init__(self):
        if not 0 < self.guardrail:
            raise ValueError(f"guardrail is a relative ΔPPL bound and must be > 0 (0.01 = +1%), got {self.guardrail}.")
        if self.repeats != 0 and self.repeats < MIN_REPEATS:
            raise ValueError(
                f"repeats={self.repeats}: timing needs at least {MIN_REPEATS} interleaved repeats (for a Student-t "
                "95% confidence interval), or 0 to skip timing."
            )
        if any(not 0 < g for g in self.frontier):
            raise ValueError(f"frontier guardrails must be > 0 (0.02 = +2%), got {list(self.frontier)}.")
        if self.stride is None:
            object.__setattr__(self, "stride", self.window // 2)  # resolved once, while the instance is built
        if self.probe_tokens + 2 > self.window:
            raise ValueError(
                f"probe_tokens={self.probe_tokens} leaves no tokens to gate in a window of {self.window}; "
                "use probe_tokens < window - 1 (e.g. window // 8)."
            )
        if self.decode_prompt <= self.probe_tokens:
            raise ValueError(
                f"decode_prompt={self.decode_prompt} must exceed probe_tokens={self.probe_tokens}: the decision "
                "is taken on the prompt's first probe_tokens tokens."
            )


@dataclass
class GateStats:
    """Aggregate of a list of decisions: fraction of sequences gated, mean kept fraction of the gated
    layers' neurons (1 for an ungated sequence), and MLP MACs saved per token (absolute, and as fractions
    of the full MLPs' and the full model's MACs per token). Probe tokens run at full width, so only the
    tokens after each probe save; only MLPs are gated, so the model saves exactly the MLP MACs saved."""

    n_sequences: int
    fraction_gated: float
    mean_kept_fraction: float
    mlp_macs_saved_per_token: float
    mlp_macs_saved_fraction: float
    model_macs_saved_fraction: float


def gate_stats(adapter: ModelAdapter, gated_layers: list[int], decisions: list[Decision]) -> GateStats:
    """:class:`GateStats` of ``decisions`` (MACs by :func:`mlp_macs_per_token`, counted not timed)."""
    full = {l: None for l in range(adapter.n_layers)}
    full_mlp, full_model = mlp_macs_per_token(adapter, full), model_macs_per_token(adapter, full)
    saved, tokens, kept_fractions = 0.0, 0, []
    for d in decisions:
        tokens += d.n_tokens
        if not d.gated:
            kept_fractions.append(1.0)
            continue
        kept_mlp = mlp_macs_per_token(adapter, {**full, **d.kept})
        saved += (full_mlp - kept_mlp) * (d.n_tokens - d.n_probe)
        # MLP MACs are linear in the kept neuron count, so the MACs ratio is the kept-neuron ratio.
        gated_full = len(gated_layers) * adapter.matrices_per_unit * adapter.hidden_size * adapter.mlp_width
        kept_fractions.append(1.0 - (full_mlp - kept_mlp) / gated_full)
    per_token = saved / tokens if tokens else 0.0
    return GateStats(
        n_sequences=len(decisions),
        fraction_gated=float(np.mean([d.gated for d in decisions])) if decisions else 0.0,
        mean_kept_fraction=float(np.mean(kept_fractions)) if kept_fractions else 1.0,
        mlp_macs_saved_per_token=per_token,
        mlp_macs_saved_fraction=per_token / full_mlp,
        model_macs_saved_fraction=per_token / full_model,
    )


def policy_ppl(policy: SeqGatePolicy, ids: torch.Tensor, settings: Settings):
    """Sliding-window perplexity of the policy on ``ids`` ``[N]`` and the decisions it took, one per window."""
    policy.decisions = []
    policy.log_decisions = True
    try:
        result = sliding_window_ppl(
            None, ids, window=settings.window, stride=settings.stride, forward=policy.forward, progress=settings.progress
        )
    finally:
        policy.log_decisions = False
    return result, list(policy.decisions)


def full_ppl(model, ids: torch.Tensor, settings: Settings):
    """Sliding-window perplexity of the unmodified model (nothing gated) on ``ids``."""
    return sliding_window_ppl(model, ids, window=settings.window, stride=settings.stride, progress=settings.progress)


def enforce_guardrail(
    policy: SeqGatePolicy, ids: torch.Tensor, settings: Settings, calibration_ratios: list[float]
) -> list[dict]:
    """Tighten ``policy`` in place until its validation ΔPPL on ``ids`` is ≤ ``settings.guardrail``.

    Returns every step tried: ``{"tau", "Bg", "ppl", "delta_ppl", "fraction_gated", "holds"}``; the last
    one is the final policy. Steps alternate ``Bg`` halved and ``tau`` lowered to gate half as many
    calibration windows; after ``max_tightening`` steps (or when nothing is gated any more) the policy
    never gates, which holds by construction.
    """
    base = full_ppl(policy.model, ids, settings)
    ratios = np.sort(np.asarray(calibration_ratios, dtype=float))
    steps = []
    for step in range(settings.max_tightening + 1):
        if step == settings.max_tightening:
            policy.tau = -math.inf
        result, decisions = policy_ppl(policy, ids, settings)
        dppl = delta_ppl(base, result)
        fraction = float(np.mean([d.gated for d in decisions]))
        steps.append(
            dict(tau=policy.tau, Bg=policy.Bg, ppl_full=base.ppl, ppl=result.ppl, delta_ppl=dppl,
                 fraction_gated=fraction, holds=dppl <= settings.guardrail)
        )
        if dppl <= settings.guardrail or policy.tau == -math.inf:
            break
        if step % 2 == 0:
            policy.Bg = policy.Bg / 2
        else:
            n_gated = int(np.sum(ratios <= policy.tau)) // 2
            policy.tau = -math.inf if n_gated == 0 else float((ratios[n_gated - 1] + ratios[n_gated]) / 2)
    return steps


def kept_sets_differ(a: Decision, b: Decision) -> bool:
    """Whether two decisions on the same sequence gate differently (gated vs not, or other kept blocks)."""
    return a.kept != b.kept


def kept_ppl(adapter: ModelAdapter, kept: dict[int, list[int]], ids: torch.Tensor, settings: Settings):
    """Sliding-window perplexity on ``ids`` with the fixed kept blocks ``kept`` (static pruning) on every token."""
    adapter.set_kept(kept)
    try:
        return full_ppl(adapter.model, ids, settings)
    finally:
        adapter.reset()


def static_stats(adapter: ModelAdapter, kept: dict[int, list[int]]) -> GateStats:
    """:class:`GateStats` of static pruning: every sequence and every token runs on ``kept``."""
    full = {l: None for l in range(adapter.n_layers)}
    full_mlp, full_model = mlp_macs_per_token(adapter, full), model_macs_per_token(adapter, full)
    saved = full_mlp - mlp_macs_per_token(adapter, {**full, **kept})
    gated_full = len(kept) * adapter.matrices_per_unit * adapter.hidden_size * adapter.mlp_width
    return GateStats(
        n_sequences=0, fraction_gated=1.0, mean_kept_fraction=1.0 - saved / gated_full if gated_full else 1.0,
        mlp_macs_saved_per_token=float(saved), mlp_macs_saved_fraction=saved / full_mlp,
        model_macs_saved_fraction=saved / full_model,
    )


def time_arms(
    adapter: ModelAdapter,
    test_ids: torch.Tensor,
    settings: Settings,
    *,
    policies: Mapping[str, SeqGatePolicy],
    static: Mapping[str, dict[int, list[int]]] | None = None,
) -> dict:
    """Interleaved prefill and decode benchmarks: ``"full"`` (the baseline, first) vs every SeqGate policy
    (probe and decision inside the timed call) vs every static kept set (set inside the timed call).

    Returns ``{"prefill": BenchmarkResult, "decode": BenchmarkResult}`` with one gain per named arm.
    """
    model = adapter.model
    windows = token_windows(test_ids, settings.window)[: settings.timing_windows]
    prompt = test_ids[: settings.decode_prompt]
    n_new = settings.decode_tokens

    def with_kept(kept, workload):
        def arm():
            adapter.reset()
            if kept:
                adapter.set_kept(kept)
            try:
                return workload()
            finally:
                adapter.reset()

        return arm

    prefill_arms = {"full": with_kept(None, lambda: prefill_workload(model, windows))}
    decode_arms = {"full": with_kept(None, lambda: greedy_decode_workload(model, prompt, n_new))}
    for name, kept in (static or {}).items():
        prefill_arms[name] = with_kept(kept, lambda: prefill_workload(model, windows))
        decode_arms[name] = with_kept(kept, lambda: greedy_decode_workload(model, prompt, n_new))
    for name, policy in policies.items():
        prefill_arms[name] = lambda policy=policy: policy.prefill(windows)
        decode_arms[name] = lambda policy=policy: policy.generate(prompt, n_new).numel()
    kw = dict(repeats=settings.repeats, warmup=settings.warmup, progress=settings.progress)
    return {"prefill": interleaved_benchmark(prefill_arms, **kw), "decode": interleaved_benchmark(decode_arms, **kw)}


def frontier_point(guardrail: float, steps: list[dict], test_delta_ppl: float, stats: GateStats, timing) -> dict:
    """One point of the frontier: a guardrail, the policy it left (``tau``, ``Bg``), its validation and test
    ΔPPL, MACs saved and (if timed) prefill / decode gains with their 95% CIs."""
    point = {
        "guardrail": guardrail, "tau": steps[-1]["tau"], "Bg": steps[-1]["Bg"],
        "delta_ppl_validation": steps[-1]["delta_ppl"], "delta_ppl_test": test_delta_ppl,
        "fraction_gated": stats.fraction_gated, "model_macs_saved_fraction": stats.model_macs_saved_fraction,
    }
    for name, result in (timing or {}).items():
        gain = result.gains["seqgate"]
        point[f"{name}_gain"], point[f"{name}_gain_ci95"] = gain.gain, list(gain.gain_ci95)
    return point


def plot_frontier(points: list[dict], path) -> None:
    """Tokens/s gain (prefill and decode, 95% CI bars) against test ΔPPL, one point per guardrail; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("prefill", "o"), ("decode", "s")):
        timed = [p for p in points if f"{name}_gain" in p]
        if not timed:
            continue
        x = [100 * p["delta_ppl_test"] for p in timed]
        y = [100 * p[f"{name}_gain"] for p in timed]
        err = [[100 * (p[f"{name}_gain"] - p[f"{name}_gain_ci95"][0]) for p in timed],
               [100 * (p[f"{name}_gain_ci95"][1] - p[f"{name}_gain"]) for p in timed]]
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=name)
        for p, xi, yi in zip(timed, x, y):
            ax.annotate(f"≤{p['guardrail']:.0%}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("ΔPPL on test (%)")
    ax.set_ylabel("tokens/s gain vs full model (%)")
    ax.set_title("SeqGate frontier (one point per validation guardrail)")
    ax.legend()
    fig.tight_layout()
    # Rendered in memory, then written atomically: an interrupted run never leaves half a PNG at ``path``.
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class TextTooShortError(ValueError):
    """The text has too few tokens for the calibration, validation or test windows a run needs."""


def check_text_length(tokenizer, corpus, settings: Settings, *, label: str | None = None) -> dict[str, int]:
    """Check that ``corpus`` is long enough for :func:`run_seqgate` with ``settings``; return the token counts.

    A run needs at least one full ``window`` of calibration tokens (every other validation document),
    of validation tokens and of test tokens (for timing, also ``decode_prompt`` test tokens), after the
    ``max_tokens`` cut. Raises :class:`TextTooShortError` naming what is needed and what the text has.
    Only counts tokens: reading the test split's length here tunes nothing. ``label`` names the text in
    the message (default: ``corpus.name``).
    """
    window = settings.window
    counts = {
        "calibration": int(tokenize_text(tokenizer, corpus.calibration).numel()),
        "validation": int(tokenize_text(tokenizer, corpus.validation).numel()),
        "test": int(tokenize_text(tokenizer, corpus.test).numel()),
    }
    need = {"calibration": window, "validation": window,
            "test": max(window, settings.decode_prompt) if settings.repeats > 0 else window}
    if settings.max_tokens < max(need["validation"], need["test"]):
        prompt = f", and a {settings.decode_prompt}-token decode prompt (--decode-prompt)" if settings.repeats else ""
        raise TextTooShortError(
            f"--max-tokens {settings.max_tokens} keeps fewer tokens of each split than the run needs: at least one "
            f"{window}-token window (--window) of validation and of test{prompt}. Use --max-tokens "
            f"{max(need.values())} or more, or a smaller --window."
        )
    short = [split for split in counts if counts[split] < need[split]]
    if not short:
        return counts
    n_docs = len(corpus.validation_docs) + len(corpus.test_docs)
    documents = "paragraphs" if str(corpus.source).startswith("file:") else "documents"
    has = ", ".join(f"{split} {counts[split]}" for split in counts)
    needs = ", ".join(f"{split} {need[split]}" for split in counts)
    raise TextTooShortError(
        f"The text {label or corpus.name!r} is too short for a {window}-token window (--window {window}): "
        f"it has {counts['validation'] + counts['test']} tokens in {n_docs} {documents} "
        f"(tokens per split: {has}; too few in {', '.join(short)}), and a run needs at least "
        f"one {window}-token window in each split (tokens per split: {needs}). The validation split is the "
        f"first half of the text, calibration every other validation {documents[:-1]} and test the second half, "
        f"so give roughly {4 * max(need.values())} tokens or more in many {documents} (separated by blank lines), "
        "or use a smaller --window (and --probe-tokens)."
    )


def calibration_windows(tokenizer, corpus, settings: Settings, device) -> torch.Tensor:
    """``[n, window]`` token windows of the corpus's calibration documents (validation only)."""
    calibration_ids = tokenize_text(tokenizer, corpus.calibration)
    return token_windows(calibration_ids, settings.window)[: settings.calibration_windows].to(device)


def rank_layers(
    adapter: ModelAdapter, calib: torch.Tensor, settings: Settings
) -> tuple[dict[int, torch.Tensor], dict[int, float], list[int]]:
    """Calibration steps 1–2 on ``calib`` ``[n, L]``: static block importance per layer, layer tolerance
    (ΔPPL with ``drop_fraction`` of one layer dropped) and the ``n_gated`` most tolerant layers."""
    n_gated = settings.n_gated or max(1, adapter.n_layers // 3)
    importance = static_importance(adapter, calib)
    tolerance = layer_tolerance(
        adapter, calib, importance, drop_fraction=settings.drop_fraction, progress=settings.progress
    )
    return importance, tolerance, most_tolerant(tolerance, n_gated)


def calibrate_policy(
    adapter: ModelAdapter, calib: torch.Tensor, gated_layers: list[int], settings: Settings
) -> tuple[SeqGatePolicy, list, list[float]]:
    """Calibration steps 3–5 for ``settings.guardrail``: experiences, sentinel, ``tau`` and memory.

    Returns the calibrated policy (memory on), the experiences and the calibration windows' sentinel
    ratios (what :func:`enforce_guardrail` lowers ``tau`` along).
    """
    common = dict(bl=settings.bl, Bg=settings.Bg, align=settings.align, probe_tokens=settings.probe_tokens,
                  wcur=settings.wcur, wmem=settings.wmem)
    probe_policy = SeqGatePolicy(adapter, gated_layers, sentinel=gated_layers[0], tau=math.inf, **common)
    experiences = collect_experiences(probe_policy, calib, guardrail=settings.guardrail, progress=settings.progress)
    sentinel = choose_sentinel(experiences, fallback=gated_layers[0])
    ratios = [e.ratios[sentinel] for e in experiences]
    level, tau = choose_level(ratios, [e.outcome for e in experiences])
    policy = SeqGatePolicy(
        adapter, gated_layers, sentinel=sentinel, tau=tau, memory=build_memory(experiences, gated_layers, sentinel),
        **{**common, "Bg": level * settings.Bg},
    )
    return policy, experiences, ratios


def run_seqgate(model, tokenizer, corpus, settings: Settings, *, model_info: dict | None = None) -> dict:
    """Calibrate, enforce the guardrail and report (see the module docstring); returns the JSON-ready report.

    ``corpus`` is a :class:`~torch_gating.text.TextCorpus` (its ``test`` is read only after the guardrail
    phase). The adapter is installed for the run and removed at the end.
    """
    adapter = adapter_for(model, block=settings.block, copy_weights=settings.copy_weights)
    with adapter, torch.inference_mode():
        report = _run(adapter, tokenizer, corpus, settings)
    report["model"] = model_info or {}
    return report


def _run(adapter: ModelAdapter, tokenizer, corpus, settings: Settings) -> dict:
    model = adapter.model
    device = next(model.parameters()).device
    calib = calibration_windows(tokenizer, corpus, settings, device)
    _, tolerance, gated_layers = rank_layers(adapter, calib, settings)
    policy, experiences, ratios = calibrate_policy(adapter, calib, gated_layers, settings)
    sentinel, tau, Bg = policy.sentinel, policy.tau, policy.Bg

    validation_ids = tokenize_text(tokenizer, corpus.validation)[: settings.max_tokens].to(device)
    calibrated = (policy.tau, policy.Bg)
    steps = enforce_guardrail(policy, validation_ids, settings, ratios)
    final = (policy.tau, policy.Bg)

    # Report phase: the first time the test split is read.
    test_ids = tokenize_text(tokenizer, corpus.test)[: settings.max_tokens].to(device)
    base = full_ppl(model, test_ids, settings)
    gated, decisions = policy_ppl(policy, test_ids, settings)
    memory = policy.memory
    policy.memory = None
    no_memory, decisions_off = policy_ppl(policy, test_ids, settings)
    policy.memory = memory
    stats = gate_stats(adapter, gated_layers, decisions)
    changed = [kept_sets_differ(a, b) for a, b in zip(decisions, decisions_off)]
    timing = time_arms(adapter, test_ids, settings, policies={"seqgate": policy}) if settings.repeats > 0 else None
    frontier = [frontier_point(settings.guardrail, steps, delta_ppl(base, gated), stats, timing)]
    for guardrail in settings.frontier:
        policy.tau, policy.Bg = calibrated
        other = replace(settings, guardrail=guardrail, frontier=())
        other_steps = enforce_guardrail(policy, validation_ids, other, ratios)
        other_ppl, other_decisions = policy_ppl(policy, test_ids, settings)
        other_timing = time_arms(adapter, test_ids, settings, policies={"seqgate": policy}) if settings.repeats > 0 else None
        frontier.append(frontier_point(
            guardrail, other_steps, delta_ppl(base, other_ppl), gate_stats(adapter, gated_layers, other_decisions),
            other_timing,
        ))
    policy.tau, policy.Bg = final

    return {
        "settings": asdict(settings),
        "text": {"name": corpus.name, "source": corpus.source, "calibration_tokens": int(calib.numel()),
                 "validation_tokens": int(validation_ids.numel()), "test_tokens": int(test_ids.numel())},
        "calibration": {
            "n_sequences": len(experiences),
            "layer_tolerance": {str(l): t for l, t in tolerance.items()},
            "gated_layers": gated_layers,
            "sentinel": sentinel,
            "tau": tau,
            "Bg": Bg,
            "outcomes": [e.outcome for e in experiences],
            "sentinel_ratios": ratios,
        },
        "guardrail": {
            "limit": settings.guardrail,
            "steps": steps,
            "final": {"tau": policy.tau, "Bg": policy.Bg, "delta_ppl_validation": steps[-1]["delta_ppl"],
                      "holds": steps[-1]["holds"]},
        },
        "test": {
            "ppl_full": base.ppl,
            "ppl_seqgate": gated.ppl,
            "delta_ppl": delta_ppl(base, gated),
            "n_tokens": base.n_tokens,
            **asdict(stats),
            "full_mlp_macs_per_token": mlp_macs_per_token(adapter, {l: None for l in range(adapter.n_layers)}),
            "full_model_macs_per_token": model_macs_per_token(adapter, {l: None for l in range(adapter.n_layers)}),
        },
        "memory_ablation": {
            "ppl_memory_off": no_memory.ppl,
            "delta_ppl_memory_off": delta_ppl(base, no_memory),
            "delta_ppl_memory_on": delta_ppl(base, gated),
            "fraction_decisions_changed": float(np.mean(changed)) if changed else 0.0,
            "fraction_gated_memory_off": gate_stats(adapter, gated_layers, decisions_off).fraction_gated,
        },
        "frontier": frontier,
        "timing": None if timing is None else {name: result.to_dict() for name, result in timing.items()},
        "timing_tables": None if timing is None else {name: format_table(result) for name, result in timing.items()},
        "extra_memory_bytes": adapter.extra_memory_bytes(),
        "weight_bytes": adapter.weight_bytes(),
    }


def format_report(report: dict) -> str:
    """The printed summary: calibration choices, guardrail steps, test figures, ablation and timing tables."""
    cal, guard, test, ablation = report["calibration"], report["guardrail"], report["test"], report["memory_ablation"]
    lines = [
        f"gated layers {cal['gated_layers']}  sentinel {cal['sentinel']}  calibrated tau {cal['tau']:.4g}  Bg {cal['Bg']:.4g}",
        "",
        "guardrail on validation (whole policy, sliding-window ΔPPL):",
        f"  {'step':>4}  {'tau':>10}  {'Bg':>8}  {'ΔPPL':>8}  {'gated':>6}  holds",
    ]
    for i, s in enumerate(guard["steps"]):
        lines.append(
            f"  {i:>4}  {s['tau']:>10.4g}  {s['Bg']:>8.4f}  {s['delta_ppl']:>+8.2%}  {s['fraction_gated']:>6.0%}  {s['holds']}"
        )
    lines += [
        "",
        "test split:",
        f"  ppl full {test['ppl_full']:.3f}   ppl seqgate {test['ppl_seqgate']:.3f}   ΔPPL {test['delta_ppl']:+.2%}",
        f"  windows gated {test['fraction_gated']:.0%}   kept fraction of gated layers {test['mean_kept_fraction']:.3f}",
        f"  MACs saved per token: MLP {test['mlp_macs_saved_per_token'] / 1e6:.3f}M "
        f"of {test['full_mlp_macs_per_token'] / 1e6:.1f}M ({test['mlp_macs_saved_fraction']:.2%}); "
        f"model {test['model_macs_saved_fraction']:.2%} of {test['full_model_macs_per_token'] / 1e6:.1f}M",
        f"  memory off: ΔPPL {ablation['delta_ppl_memory_off']:+.2%}   decisions changed by memory "
        f"{ablation['fraction_decisions_changed']:.0%}",
    ]
    for name, table in (report.get("timing_tables") or {}).items():
        lines += ["", f"{name} tokens/s:", table]
    if len(report["frontier"]) > 1:
        lines += ["", "frontier (test split; gains with 95% CIs):",
                  f"  {'guardrail':>9}  {'ΔPPL':>8}  {'gated':>6}  {'MACs saved':>10}  {'prefill gain':>26}  {'decode gain':>26}"]
        for p in report["frontier"]:
            gains = [
                f"{p[f'{n}_gain']:+.2%} [{p[f'{n}_gain_ci95'][0]:+.2%}, {p[f'{n}_gain_ci95'][1]:+.2%}]"
                if f"{n}_gain" in p else "not timed" for n in ("prefill", "decode")
            ]
            lines.append(f"  {p['guardrail']:>9.2%}  {p['delta_ppl_test']:>+8.2%}  {p['fraction_gated']:>6.0%}  "
                         f"{p['model_macs_saved_fraction']:>10.2%}  {gains[0]:>26}  {gains[1]:>26}")
    return "\n".join(lines)
