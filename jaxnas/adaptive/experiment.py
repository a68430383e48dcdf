"""The adaptive-inference experiment on an exported conv network: calibrate and guard on validation, report on test.

Phases, in this order (the test split is read only in phase 3):

1. calibration (:mod:`jaxnas.adaptive.calibrate`) on the first half of the validation split: measured channel
   importance per calibration batch, the reference (static importance); per budget pair ``(bl, Bg)`` of the grid,
   the batches' outcomes and the experiential memory of those that held the guardrail;
2. guardrail: for every grid point, each gated arm - STATIC (one kept set from static importance), CURRENT (per
   batch, the probe's evidence only: memory off) and EXPERIENCE (per batch, probe + memory) - is tightened on the
   whole validation split until its accuracy drop is <= ``max_drop`` points;
   early exits (:mod:`jaxnas.adaptive.exits`): heads trained on the train split (backbone frozen), thresholds
   chosen on validation with the guardrail checked on the whole exit policy;
3. report on test: accuracy and its drop, active fraction (MACs computed / the full twin's), kept widths, and
   interleaved throughput (images/s, Student-t 95% CIs, paired gains over BASE, the decision inside the timer);
   for early exits, exit rates and average MACs (each exit's MACs weighted by the fraction leaving there).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import jax
import numpy as np

from interop.timing import MIN_REPEATS, format_table, interleaved_benchmark
from jaxnas.adaptive.calibrate import (
    accuracy,
    build_memory,
    collect_evidence,
    drop_bound,
    evidence_rule,
    enforce_guardrail,
    outcomes,
    reference_of,
)
from jaxnas.adaptive.exits import ExitCalibration, average_macs, exit_rates, fit_exits
from jaxnas.adaptive.finetune import finetune_for_gating
from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import ChannelGatePolicy, active_fraction, predict_batches, stream_classes

ARMS = ("static", "current", "experience")


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Knobs of one run (the CLI's flags)."""

    max_drop: float = _field(0.5, "Guardrail: max accuracy drop on validation, in points.")
    guardrail_z: float = _field(1.645, "The guardrail holds the drop's upper confidence bound: the drop plus this "
                                       "many standard errors of the paired per-image differences (1.645: one-sided "
                                       "95%; 0: the drop itself).")
    bl_grid: tuple[float, ...] = _field((0.10, 0.12, 0.18), "Per-gate budgets tried.")
    Bg_grid: tuple[float, ...] = _field((0.05, 0.06, 0.08), "Global budgets tried.")
    align: int = _field(8, "Kept channel counts are multiples of this (or the whole gate); 8: the vector width "
                           "XLA:CPU convolutions run fast at.")
    min_keep: float = _field(0.5, "Fewest channels a gate keeps, as a fraction.")
    probe_images: int = _field(8, "Images of each batch probed at full width (through the deepest cut gate only, "
                                  "with measured widths).")
    batch_size: int = _field(256, "Images per batch (one decision per batch).")
    decide_every: int = _field(1, "The per-batch arms decide on the first batch of every group of this many and run "
                                  "the group's other batches at that decision (1: every batch).")
    calibration_batch: int = _field(64, "Images per calibration batch (one experience each).")
    wcur: float = _field(0.8, "Weight of the batch's own evidence.")
    wmem: float = _field(0.2, "Weight of the experiential memory's evidence.")
    repeats: int = _field(10, f"Timed interleaved repeats per arm (>= {MIN_REPEATS}; 0 skips timing).")
    warmup: int = _field(1, "Untimed warm-up rounds of every arm.")
    timing_passes: int = _field(2, "Passes over the test split per timed call.")
    exit_epochs: int = _field(30, "Epochs of exit-head training (backbone frozen); 0 skips early exits.")
    exit_grid: int = _field(4, "Exit heads read features averaged over a grid x grid partition of the positions "
                               "(1: global average pool).")
    finetune_epochs: int = _field(30, "Epochs of gate-aware fine-tuning on the train split before calibration "
                                     "(jaxnas.adaptive.finetune; 0: gate the exported weights as they are).")
    finetune_lr: float = _field(1e-3, "Adam learning rate of the gate-aware fine-tuning.")
    latency_rounds: int = _field(15, "Interleaved rounds timing every reachable kept-width program at calibration "
                                     "(0: no measurement, every width allowed).")
    min_speedup: float = _field(0.03, "A kept-width program runs only if measured at least this fraction faster "
                                      "than full width.")

    def __post_init__(self):
        if not self.guardrail_z >= 0:
            raise ValueError(f"guardrail_z is a number of standard errors and must be >= 0, got {self.guardrail_z}")
        if not self.max_drop >= 0:
            raise ValueError(f"max_drop is an accuracy drop in points and must be >= 0, got {self.max_drop}")
        if self.repeats and self.repeats < MIN_REPEATS:
            raise ValueError(f"repeats={self.repeats}: timing needs at least {MIN_REPEATS} interleaved repeats, or 0")
        if self.decide_every < 1:
            raise ValueError(f"decide_every is a number of batches and must be >= 1, got {self.decide_every}")
        if self.probe_images >= self.batch_size:
            raise ValueError(f"probe_images={self.probe_images} must be below batch_size={self.batch_size}")
        if self.exit_grid < 1:
            raise ValueError(f"exit_grid is a number of cells per side and must be >= 1, got {self.exit_grid}")
        if self.finetune_epochs < 0 or not self.finetune_lr > 0:
            raise ValueError(f"finetune_epochs must be >= 0 and finetune_lr > 0, got {self.finetune_epochs} and "
                             f"{self.finetune_lr}")
        if self.latency_rounds < 0 or not 0 <= self.min_speedup < 1:
            raise ValueError(f"latency_rounds must be >= 0 and min_speedup a fraction in [0, 1), got "
                             f"{self.latency_rounds} and {self.min_speedup}")
        for name in ("bl_grid", "Bg_grid"):
            if not getattr(self, name) or any(not 0 <= v <= 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must list fractions in [0, 1], got {list(getattr(self, name))}")


@dataclass
class GridPoint:
    """One budget pair's calibrated arms and what the guardrail did to each."""

    bl: float
    Bg: float
    policies: dict[str, ChannelGatePolicy]
    guardrail: dict[str, list[dict]]
    memory_entries: int
    experiences: int


def measure_widths(net: GatedNet, images: np.ndarray, settings: Settings) -> dict[tuple[int, ...], float]:
    """Milliseconds per call of every kept-width program the grid can reach (and of full width), on a batch of
    ``batch_size - probe_images`` validation images (what a gated program runs); ``{}`` if ``latency_rounds`` is 0."""
    if not settings.latency_rounds:
        return {}
    widths = {net.full: None}
    for bl, Bg in itertools.product(settings.bl_grid, settings.Bg_grid):
        policy = ChannelGatePolicy(net, bl=bl, Bg=Bg, align=settings.align, min_keep=settings.min_keep)
        widths.update(dict.fromkeys(policy.reachable_widths()))
    rows = settings.batch_size - settings.probe_images
    batch = np.resize(images[:rows], (rows, *images.shape[1:]))
    return net.latencies(list(widths), batch, rounds=settings.latency_rounds)


def fast_widths(latency: dict[tuple[int, ...], float], full: tuple[int, ...], min_speedup: float) -> dict | None:
    """width tuple -> ms of those measured at least ``min_speedup`` faster than ``full`` (None: nothing measured)."""
    if not latency:
        return None
    return {w: ms for w, ms in latency.items() if w != full and ms <= (1 - min_speedup) * latency[full]}


def calibrate_grid(net: GatedNet, validation, settings: Settings,
                   latency: dict[tuple[int, ...], float] | None = None, trained_rule: bool = False) -> list[GridPoint]:
    """Phases 1 and 2 on the validation split (images, labels) for every grid point; ``latency`` (from
    :func:`measure_widths`) restricts the decisions to the widths measured faster than full width.

    ``trained_rule``: ``net`` was fine-tuned to be gated by the uncalibrated evidence (`finetune_gates`), so the
    arms keep that rule: no calibrated reference, the memory's payloads and the static scores are the batches'
    evidence (`jaxnas.adaptive.calibrate.evidence_rule`) instead of their measured channel importance."""
    images, labels = validation
    half = len(images) // 2
    common = dict(align=settings.align, min_keep=settings.min_keep, probe_images=settings.probe_images,
                  wcur=settings.wcur, wmem=settings.wmem)
    evidence = collect_evidence(ChannelGatePolicy(net, **common), images[:half], labels[:half],
                                batch_size=settings.calibration_batch, sensitivity=not trained_rule)
    if trained_rule:
        evidence = evidence_rule(net, evidence)
    reference = reference_of(evidence)
    fast = fast_widths(latency or {}, net.full, settings.min_speedup)
    points = []
    for bl, Bg in itertools.product(settings.bl_grid, settings.Bg_grid):
        budgets = dict(common, bl=bl, Bg=Bg, reference=None if trained_rule else reference, fast_widths=fast,
                       decide_every=settings.decide_every)
        memory = build_memory(evidence, outcomes(ChannelGatePolicy(net, **budgets), evidence,
                                                 max_drop=settings.max_drop))
        policies = {
            "static": ChannelGatePolicy(net, **budgets, static=reference.importance),
            "current": ChannelGatePolicy(net, **budgets),
            "experience": ChannelGatePolicy(net, **budgets, memory=memory),
        }
        guardrail = {name: enforce_guardrail(p, images, labels, batch_size=settings.batch_size,
                                             max_drop=settings.max_drop, z=settings.guardrail_z)
                     for name, p in policies.items()}
        points.append(GridPoint(bl, Bg, policies, guardrail, len(memory), len(evidence)))
    return points


def calibrate_exits(model, gated: GatedNet, train, validation, settings: Settings) -> ExitCalibration:
    """Exit heads trained on ``train`` (backbone frozen), thresholds chosen and the guardrail checked on
    ``validation`` for the whole policy (`jaxnas.adaptive.exits.fit_exits` with this run's settings)."""
    return fit_exits(model.twin, train, validation, epochs=settings.exit_epochs, grid=settings.exit_grid,
                     max_drop=settings.max_drop, z=settings.guardrail_z, batch_size=settings.batch_size, net=gated)


def report_exits(calibrated: ExitCalibration, test, settings: Settings, base_accuracy: float, gated: GatedNet) -> dict:
    """Early exits on test: accuracy, drop, exit rates, average MACs and interleaved timing against the twin, all
    with the fused forward (`EarlyExitNet.predict_fused`: one jitted program per batch shape, routing on device)."""
    images, labels = test
    net = calibrated.net
    outs = [net.predict_fused(images[i : i + settings.batch_size])
            for i in range(0, len(images), settings.batch_size)]
    logits, where = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    acc = accuracy(logits.argmax(-1), labels)
    macs = average_macs(where, calibrated.segment_macs)
    full = gated.macs(gated.full, tuple(images.shape[1:]))  # the twin's own MACs: what BASE computes per image
    out = dict(
        exits_after_blocks=net.exits, thresholds=net.thresholds, validation=calibrated.validation,
        accuracy=acc, accuracy_drop=base_accuracy - acc,
        exit_rates=exit_rates(where, len(net.exits)),
        segment_macs=calibrated.segment_macs, avg_macs=macs, macs_full=full, macs_saved_fraction=1 - macs / full,
        timing=None,
    )
    if settings.repeats:
        timed = {"base": _throughput_arm(gated, images, settings.batch_size, settings.timing_passes),
                 "early_exit": _throughput_arm(lambda x: net.fused_forward(x)[0], images, settings.batch_size,
                                               settings.timing_passes)}
        result = interleaved_benchmark(timed, repeats=settings.repeats, warmup=settings.warmup)
        gain = result.gains["early_exit"]
        out.update(timing=dict(result.to_dict(), table=format_table(result, unit="images/s")),
                   throughput_gain=gain.gain, throughput_gain_ci95=list(gain.gain_ci95))
    return out


def _throughput_arm(forward, images: np.ndarray, batch_size: int, passes: int):
    def arm() -> int:
        out = None
        for _ in range(passes):
            for i in range(0, len(images), batch_size):
                out = forward(images[i : i + batch_size])
        jax.block_until_ready(out)
        return passes * len(images)

    return arm


def _stream_arm(policy: ChannelGatePolicy, images: np.ndarray, batch_size: int, passes: int):
    """The passes as one stream of ``passes`` copies of ``images`` (built before timing): the pipeline fills once
    per timed call, as it does over a long input, instead of once per pass."""
    stream = np.concatenate([images] * passes)

    def arm() -> int:
        out = None
        for out in policy.stream(stream, batch_size):
            pass
        jax.block_until_ready(out)
        return len(stream)

    return arm


def report_point(net: GatedNet, point: GridPoint, test, settings: Settings, base_accuracy: float, image_shape,
                 gated_full_accuracy: float | None = None) -> dict:
    """Phase 3 for one grid point: test accuracy, drop, active fraction, widths, memory use and timing.
    ``base_accuracy``: the exported network's; ``gated_full_accuracy``: that of the network the arms gate, when
    it differs (fine-tuned), for the drop due to gating alone."""
    images, labels = test
    arms = {}
    for name, policy in point.policies.items():
        policy.decisions, policy.log_decisions = [], True
        acc = accuracy(stream_classes(policy, images, settings.batch_size), labels)
        policy.log_decisions = False
        decisions = list(policy.decisions)
        widths = sorted({d.widths for d in decisions})
        arms[name] = dict(
            bl=policy.bl, Bg=policy.Bg, accuracy=acc, accuracy_drop=base_accuracy - acc,
            accuracy_drop_gating=(base_accuracy if gated_full_accuracy is None else gated_full_accuracy) - acc,
            guardrail_validation=point.guardrail[name][-1], tightening_steps=len(point.guardrail[name]) - 1,
            active_fraction=active_fraction(net, decisions, image_shape),
            widths=[list(w) for w in widths], memory_used=any(d.used_memory for d in decisions),
            # A policy the guardrail left with nothing to remove runs the very program BASE runs (no probe):
            # any timing difference of this arm is noise, and is reported as such.
            same_program_as_base=policy.never_gates,
        )
    timing = None
    if settings.repeats:
        timed = {"base": _throughput_arm(net, images, settings.batch_size, settings.timing_passes)}
        for name, policy in point.policies.items():
            timed[name] = _stream_arm(policy, images, settings.batch_size, settings.timing_passes)
        result = interleaved_benchmark(timed, repeats=settings.repeats, warmup=settings.warmup)
        timing = result.to_dict()
        timing["table"] = format_table(result, unit="images/s")
        for name in point.policies:
            gain = result.gains[name]
            arms[name].update(throughput_gain=gain.gain, throughput_gain_ci95=list(gain.gain_ci95),
                              images_per_s=result.arms[name].mean)
    return dict(bl=point.bl, Bg=point.Bg, experiences=point.experiences, memory_entries=point.memory_entries,
                arms=arms, timing=timing)


def finetune_gates(net: GatedNet, dataset, settings: Settings, validation_predictions: np.ndarray,
                   fast: dict | None) -> tuple[GatedNet, dict | None]:
    """The network the gating arms run: ``net`` itself, or with ``finetune_epochs`` its gate-aware fine-tuned copy
    (`jaxnas.adaptive.finetune`, train split: each step one of the ``fast`` width tuples - those measured faster
    than full width; without a measurement, removals up to the grid's largest ``bl`` on the ``align`` grid - with
    the channels the policy's uncalibrated evidence ranks lowest on a probe of the batch dropped) - kept only if its
    full-width validation accuracy is no lower than ``net``'s (``validation_predictions``), else ``net``. The
    guardrail then holds each gated arm against the network it gates, so on validation the drop against the
    exported network is at most the arm's."""
    if not settings.finetune_epochs or fast == {}:
        return net, None
    train_x, train_y = dataset.train.images, dataset.train.labels
    tuned, summary = finetune_for_gating(
        net, train_x, train_y, epochs=settings.finetune_epochs, bl=max(settings.bl_grid), align=settings.align,
        min_keep=settings.min_keep, learning_rate=settings.finetune_lr, batch_size=min(128, len(train_y)), seed=0,
        selection="evidence", widths=None if fast is None else sorted(fast), probe_images=settings.probe_images,
    )
    images, labels = dataset.validation.images, dataset.validation.labels
    predictions = predict_batches(tuned, images, settings.batch_size)
    drop, bound = drop_bound(validation_predictions == labels, predictions == labels, settings.guardrail_z)
    kept = bool(drop <= 1e-9)
    summary.update(validation_accuracy_full_width=accuracy(predictions, labels), validation_drop_full_width=drop,
                   validation_drop_bound_full_width=bound, used=kept)
    return (tuned if kept else net), summary


def run_adaptive(model, dataset, settings: Settings, *, progress=print) -> dict:
    """Calibrate and guard on ``dataset.validation``, then report on ``dataset.test`` (read only after that)."""
    net = GatedNet(model.twin)
    validation = (dataset.validation.images, dataset.validation.labels)
    image_shape = tuple(int(v) for v in validation[0].shape[1:])
    progress(f"gates {dict(zip(net.names, net.full))}; calibrating {len(settings.bl_grid) * len(settings.Bg_grid)} "
             f"budget pairs on {len(validation[0])} validation images")
    latency = measure_widths(net, validation[0], settings)
    fast = fast_widths(latency, net.full, settings.min_speedup)
    if latency:
        progress(f"kept-width programs measured faster than full width ({latency[net.full]:.2f} ms): "
                 f"{len(fast)} of {len(latency) - 1}")
    validation_predictions = predict_batches(net, validation[0], settings.batch_size)
    validation_full = accuracy(validation_predictions, validation[1])
    gating, finetune = finetune_gates(net, dataset, settings, validation_predictions, fast)
    if finetune is not None:
        progress(f"gate-aware fine-tuning: {finetune}")
    points = calibrate_grid(gating, validation, settings, latency, trained_rule=gating is not net)
    exits = None
    if settings.exit_epochs:
        exits = calibrate_exits(model, net, (dataset.train.images, dataset.train.labels), validation, settings)
        progress(f"early exits after blocks {exits.net.exits}: validation {exits.validation}")
    # The guardrail has been enforced on every arm of every grid point and on the early exits: only now is the
    # test split read.
    test = (dataset.test.images, dataset.test.labels)
    base = accuracy(predict_batches(net, test[0], settings.batch_size), test[1])
    gated_full = None
    if finetune is not None:
        gated_full = accuracy(predict_batches(gating, test[0], settings.batch_size), test[1])
        finetune["test_accuracy_full_width"] = gated_full
    rows = []
    for point in points:
        rows.append(report_point(net, point, test, settings, base, image_shape, gated_full))
        progress(summary_line(rows[-1]))
    early_exit = None if exits is None else report_exits(exits, test, settings, base, net)
    if early_exit is not None:
        progress(exit_line(early_exit))
    return dict(
        arch=model.arch, gates=dict(zip(net.names, net.full)), macs_full=net.macs(net.full, image_shape),
        settings=dataclasses.asdict(settings), validation_accuracy_full=validation_full,
        latency_ms=[dict(widths=list(w), ms=ms, fast=w in (fast or {})) for w, ms in latency.items()],
        finetune=finetune,
        test_images=len(test[0]), base=dict(accuracy=base), grid=rows, best=best_point(rows),
        best_by_arm={name: best_point(rows, name) for name in ARMS}, early_exit=early_exit,
    )


def exit_line(report: dict) -> str:
    """One line: early exits' test drop, exit rates, MACs saved and throughput gain with its CI."""
    rates = [round(r, 3) for r in report["exit_rates"]]
    text = (f"early exits: drop {report['accuracy_drop']:+.2f} pt, rates {rates}, "
            f"avg MACs {report['avg_macs']:.0f} of {report['macs_full']} ({report['macs_saved_fraction']:.1%} fewer)")
    if report.get("throughput_gain") is not None:
        low, high = report["throughput_gain_ci95"]
        text += f", {report['throughput_gain']:+.1%} [{low:+.1%}, {high:+.1%}] images/s"
    return text


def best_point(rows: list[dict], arm_name: str = "experience") -> dict | None:
    """The ``arm_name`` arm that gates (runs a smaller program than BASE) with the largest throughput gain whose CI
    lower bound is > 0 (else the largest gain); None if no grid point gates after the guardrail."""
    timed = [(r, r["arms"][arm_name]) for r in rows
             if "throughput_gain" in r["arms"][arm_name] and not r["arms"][arm_name]["same_program_as_base"]]
    if not timed:
        return None
    r, arm = max(timed, key=lambda t: (t[1]["throughput_gain_ci95"][0] > 0, t[1]["throughput_gain"]))
    return dict(bl=r["bl"], Bg=r["Bg"], **{k: arm[k] for k in ("accuracy_drop", "active_fraction", "widths",
                                                                  "throughput_gain", "throughput_gain_ci95")})


def plot_report(report: dict, path) -> None:
    """Throughput gain (95% CI bars) against test accuracy drop, one point per arm and grid point; PNG at ``path``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from interop._atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in zip(ARMS, "osD"):
        arms = [row["arms"][name] for row in report["grid"] if "throughput_gain" in row["arms"][name]]
        if not arms:
            continue
        gains = [100 * a["throughput_gain"] for a in arms]
        err = [[g - 100 * a["throughput_gain_ci95"][0] for g, a in zip(gains, arms)],
               [100 * a["throughput_gain_ci95"][1] - g for g, a in zip(gains, arms)]]
        ax.errorbar([a["accuracy_drop"] for a in arms], gains, yerr=err, fmt=marker, capsize=3, label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("accuracy drop on test (points)")
    ax.set_ylabel("images/s gain vs base (%)")
    ax.set_title(f"channel gating, {report['arch'].split('|')[0]} (one point per arm and budget pair)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def summary_line(row: dict) -> str:
    """One line per grid point: each arm's final budgets, test drop, active fraction and gain with its CI."""
    parts = [f"bl={row['bl']:.2f} Bg={row['Bg']:.2f}"]
    for name, arm in row["arms"].items():
        text = f"{name}: drop {arm['accuracy_drop']:+.2f} pt, active {arm['active_fraction']:.3f}"
        if arm["same_program_as_base"]:
            text += " (= base program)"
        if "throughput_gain" in arm:
            low, high = arm["throughput_gain_ci95"]
            text += f", {arm['throughput_gain']:+.1%} [{low:+.1%}, {high:+.1%}]"
        parts.append(text)
    return " | ".join(parts)


__all__ = ["ARMS", "ExitCalibration", "GridPoint", "Settings", "best_point", "calibrate_exits", "calibrate_grid",
           "plot_report", "report_exits", "report_point", "run_adaptive"]
