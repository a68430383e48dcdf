"""Experiential channel gating of a found conv network, decided per batch (ExNAS's promise, on images).

For every batch of images:

1. **Probe.** The first ``probe_images`` images run through the exported twin at full width (their logits are
   the twin's) while every gate's mean |activation| is recorded. Current evidence per gate and channel: the
   channel's calibrated importance (the validation loss increase when it alone is dropped) scaled by how active
   it is in this batch relative to calibration; uncalibrated, that mean times the L2 norm of the weights
   reading the channel (`GatedNet.reader_norms`).
2. **Fingerprint and memory.** The stem's activations of the probe images (an early layer, pooled over images
   and positions) are fingerprinted by :class:`interop.Fingerprinter` (d = 64) inside the probe's jitted
   program; the top-K = 16 most similar calibration batches are retrieved from :class:`interop.ExperienceMemory`
   and their measured channel importance (each batch's own loss increases) averaged by similarity (memory
   evidence).
3. **Selection.** :class:`interop.TransversalSelector` scores the channels of every gate - non-consecutive
   layers, the stem and each stage's stream - as ``wcur * rank(current) + wmem * rank(memory)``;
   :class:`interop.BudgetController` keeps channels under ``bl`` (per gate), ``Bg`` (over all gates) and
   ``align`` (kept counts on a grid: the few static widths that get compiled programs).
4. **Rest.** The other images run in the `GatedNet` program of exactly the kept widths.

All of it happens inside :meth:`ChannelGatePolicy.predict`, so a timer around it includes the probe and the
decision. A policy with ``Bg = 0`` never removes a channel and runs the plain twin (no probe).

**Hardware.** A smaller width is not always a faster program: XLA:CPU's convolutions are fast at channel counts
that are multiples of the vector width and slow in between (docs/benchmarks.md). ``fast_widths``, when given,
maps the width tuples measured faster than the full network to their milliseconds per batch (`GatedNet.latencies`
over :meth:`ChannelGatePolicy.reachable_widths`, at calibration). Then the budgets choose *how much* is removed
by time instead of by channel count: of the width tuples the budgets reach, the fastest measured one (where
BudgetController takes the most channels); the scores still choose *which* channels of each gate go (the lowest).
A policy that reaches no fast tuple never gates (no probe). With the widths fixed, the probe needs evidence only
for the gates those widths cut: it is *shallow* - it stops after the deepest of them (`gate_depth`; the stem alone
when only the stem is cut), gives no logits, and every image of the batch, the probed ones included, runs in the
gated program (the probe's few early-layer MACs are counted in the active fraction).

**Pipelining.** :meth:`ChannelGatePolicy.stream` decides every batch exactly as :meth:`predict` does, but the
probe of batch ``t + depth`` runs inside batch ``t``'s gated program (one dispatch per batch instead of two), so
when the host reads batch ``t``'s probe and decides, the programs of the batches before it are still queued: the
decision leaves the critical path (jax dispatches asynchronously) instead of stalling every batch. The host's
work per decision (reading the probe, fingerprint, memory, selection) still shares the CPU with the programs;
``decide_every = k`` decides once per group of ``k`` consecutive batches (the issue's "per group of inputs"), the
group's other batches running at its first batch's kept channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from interop import BudgetController, ExperienceMemory, Fingerprinter, TransversalSelector
from jaxnas.adaptive.gated import GatedNet, gate_depth

FINGERPRINT_DIM = 64
TOP_K = 16
PIPELINE_DEPTH = 2  # ChannelGatePolicy.stream: batch t's program carries the probe of batch t + PIPELINE_DEPTH


@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
    """What the full-width probe of one batch leaves: ``logits`` ``[P, classes]`` (jax; None from a shallow probe,
    which stops before the head); host numpy arrays for the decision: ``activity`` gate -> ``[C]`` mean
    |activation|, ``evidence`` gate -> ``[C]`` current evidence (see `ChannelGatePolicy`), ``fingerprint``
    ``[64]`` (a unit vector)."""

    logits: jax.Array | None
    evidence: dict[str, np.ndarray]
    fingerprint: np.ndarray
    activity: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """Calibrated channel statistics: ``importance`` gate -> ``[C]`` (e.g. the validation loss increase when the
    channel alone is dropped) and ``activity`` gate -> ``[C]`` its mean |activation| over the same images (> 0)."""

    importance: dict[str, np.ndarray]
    activity: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Decision:
    """One batch's choice: ``widths`` (the kept width of each gate, in ``GatedNet.names`` order), the batch's
    ``n_images`` of which the first ``n_probe`` ran at full width, whether the memory was consulted, and
    ``probe_macs``: MACs a shallow probe spent (its images also run gated)."""

    widths: tuple[int, ...]
    n_images: int
    n_probe: int
    used_memory: bool
    probe_macs: int = 0


@dataclasses.dataclass
class ChannelGatePolicy:
    """A channel-gating policy over a `GatedNet` (see the module docstring).

    ``bl`` / ``Bg``: fractions of a gate's / of all gates' channels that may be removed; ``align``: kept counts
    are multiples of it (or the whole gate); ``min_keep``: fewest channels a gate keeps (fraction or count);
    ``memory``: payloads named by gate (``None``: current evidence only). Current evidence of a channel:
    with a calibrated ``reference``, its measured importance scaled by how active it is in this batch relative to
    calibration (``importance * activity / reference activity``); without, ``mean|activation| * reader norm``.
    ``static``: fixed channel scores (gate -> ``[C]``): the static baseline - one kept set at the current budgets
    for every batch, no probe.
    ``fast_widths``: width tuple -> measured ms, for the tuples faster than full width (None: the budgets decide
    by channel count; see the module docstring's *Hardware*).
    ``decide_every``: :meth:`stream` decides on the first batch of every group of this many consecutive batches and
    runs the group's other batches at that decision (no probe, no host work for them; :meth:`predict` decides
    every call).
    Decisions are appended to :attr:`decisions` when :attr:`log_decisions` is set.
    """

    net: GatedNet
    bl: float = 0.12
    Bg: float = 0.06
    align: int = 4
    min_keep: int | float = 0.5
    probe_images: int = 8
    memory: ExperienceMemory | None = None
    wcur: float = 0.8
    wmem: float = 0.2
    fingerprint_seed: int = 0
    static: dict | None = None
    reference: Reference | None = None
    fast_widths: dict | None = None
    decide_every: int = 1
    log_decisions: bool = False
    decisions: list[Decision] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.probe_images < 1:
            raise ValueError(
                f"probe_images must be >= 1 (the images run at full width per batch), got {self.probe_images}"
            )
        if not isinstance(self.decide_every, int) or self.decide_every < 1:
            raise ValueError(f"decide_every must be a whole number of batches >= 1, got {self.decide_every!r}")
        # Calibrated evidence is a loss increase, one scale across gates: compared as is. Raw activation evidence
        # is not comparable across gates: ranked per gate.
        normalize = "rank" if self.reference is None else "none"
        self.selector = TransversalSelector(self.net.names, self.wcur, self.wmem, normalize=normalize)
        self.fingerprinter = Fingerprinter(self.net.full[0], FINGERPRINT_DIM, seed=self.fingerprint_seed)
        self._host_norms = jax.device_get(self.net.reader_norms())
        self._static_cache: dict = {}
        self._pipelined: dict = {}
        self._hardware_cache: dict = {}
        self._probes: dict = {}
        self._macs_cache: dict = {}

    def budget(self, Bg: float | None = None) -> BudgetController:
        return BudgetController(self.bl, self.Bg if Bg is None else Bg, align=self.align, min_keep=self.min_keep)

    def _probe_program(self, depth: int | None):
        """The jitted ``(state, x) -> (logits or None, activity, fingerprint)`` of a probe through block ``depth``
        (None: the whole network); gates past ``depth`` report an activity of ones (they are not cut)."""
        if depth not in self._probes:
            recorder, fingerprinter = self.net.recorder_until(depth), self.fingerprinter
            widths = dict(zip(self.net.names, self.net.full))

            def run(state, x):
                logits, record = recorder(state, x)
                activity = {n: record[n] if n in record else jnp.ones(w, jnp.float32) for n, w in widths.items()}
                return logits, activity, fingerprinter(record["stem_activations"], pool_axes=(0, 1, 2))

            self._probes[depth] = jax.jit(run)
        return self._probes[depth]

    @property
    def shallow(self) -> bool:
        """Whether the probe stops after the last gate a decision can cut (with ``fast_widths``: the gates the
        fastest reachable widths cut) and every image of the batch runs gated (no image at full width)."""
        return self.fast_widths is not None and not self.never_gates

    def probe_depth(self) -> int | None:
        """The block a probe runs through: the deepest gate the hardware widths cut (None: the whole network)."""
        if not self.shallow:
            return None
        cut = [g for g, k in zip(self.net.gates, self.hardware_widths()) if k < g.width]
        return max(gate_depth(g) for g in cut)

    def _probe(self, state, x, depth: int | None = None):
        return self._probe_program(depth)(state, x)

    def _probe_result(self, raw) -> Probe:
        logits, activity, fp = raw
        activity, fp = jax.device_get((activity, fp))
        return Probe(logits, self.current_evidence(activity), fp, activity)

    def probe(self, x, full: bool = False) -> Probe:
        """The full-width probe of images ``x`` ``[P, H, W, C]``: logits (None for a shallow probe), channel
        evidence, stem fingerprint; through :meth:`probe_depth` unless ``full``.

        The activations stay in the jitted program; only the ``[C]`` evidence vectors and the ``[64]``
        fingerprint come to the host (one transfer of a few hundred floats), where the decision runs in numpy:
        the memory, selector and budget are a few dozen tiny array operations, which eager jax would dispatch
        one by one at tens of microseconds each - milliseconds per batch, billed to every decision.
        """
        depth = None if full else self.probe_depth()
        return self._probe_result(self._probe(self.net.state, jnp.asarray(x, jnp.float32), depth))

    def current_evidence(self, activity: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """gate -> ``[C]`` current evidence from a batch's mean |activation| per channel (see the class docstring)."""
        if self.reference is None:
            return {n: activity[n] * self._host_norms[n] for n in self.net.names}
        ref = self.reference
        return {n: ref.importance[n] * activity[n] / np.maximum(ref.activity[n], 1e-12) for n in self.net.names}

    def select(self, probe: Probe, *, memory: ExperienceMemory | None = None, Bg: float | None = None) -> dict:
        """Kept channel indices per gate (int arrays) from ``probe``'s evidence and ``memory``'s, if given."""
        memory_evidence = None
        if memory is not None and len(memory):
            retrieval = memory.query(probe.fingerprint, k=TOP_K)
            memory_evidence = {n: memory.payload_evidence(n, retrieval) for n in self.net.names}
        return self.keep(self.selector.scores(probe.evidence, memory_evidence), Bg)

    def static_keep(self, importance: dict[str, jax.Array]) -> dict:
        """Static pruning at this policy's budgets: one kept set for every batch, from fixed channel scores
        (e.g. the calibrated mean evidence), scored and budgeted as :meth:`select` scores a probe's."""
        return self.keep(self.selector.scores(importance))

    def keep(self, scores: dict, Bg: float | None = None) -> dict:
        """Kept indices per gate from channel ``scores``: by the budget controller, or with ``fast_widths`` at the
        fastest reachable measured widths, each gate keeping its highest-scoring channels (ties: the lower
        index is removed first, as the controller does). ``{}`` keeps everything."""
        if self.fast_widths is None:
            return self.budget(Bg).select(scores)
        widths = self.hardware_widths(Bg)
        keep = {}
        for name, k, full in zip(self.net.names, widths, self.net.full):
            if k < full:
                values = np.asarray(scores[name])
                removed = np.lexsort((np.arange(full), values))[: full - k]
                keep[name] = np.setdiff1d(np.arange(full), removed)
        return keep

    def hardware_widths(self, Bg: float | None = None) -> tuple[int, ...]:
        """With ``fast_widths``: the fastest measured width tuple the budgets reach (the full widths if none)."""
        key = (self.bl, self.Bg if Bg is None else Bg, self.align, self.min_keep)
        if key not in self._hardware_cache:
            options = [w for w in self.reachable_widths(Bg) if w in self.fast_widths]
            fastest = min(options, key=lambda w: (self.fast_widths[w], w)) if options else self.net.full
            self._hardware_cache[key] = fastest
        return self._hardware_cache[key]

    def reachable_widths(self, Bg: float | None = None) -> list[tuple[int, ...]]:
        """Every width tuple a decision can produce at the current budgets (the full one first): each gate's
        allowed removals (``bl``, ``align``, ``min_keep``) combined within the global cap (``Bg``)."""
        budget = self.budget(Bg)
        cap = budget.global_cap(sum(self.net.full))
        found = [()]
        for width in self.net.full:
            found = [(*t, width - r) for t in found for r in budget.removal_options(width)
                     if sum(self.net.full[: len(t)]) - sum(t) + r <= cap]
        return sorted(found, key=lambda t: (-sum(t), t))

    @property
    def never_gates(self) -> bool:
        """Whether no decision can run a smaller program (then no batch is probed): no gate may lose a chunk
        within ``bl`` that also fits in the global budget, or (with ``fast_widths``) none of the width tuples
        the budgets reach was measured faster than full width."""
        if self.fast_widths is not None:
            return self.hardware_widths() == self.net.full
        budget = self.budget()
        cap = budget.global_cap(sum(self.net.full))
        return not any(0 < r <= cap for w in self.net.full for r in budget.removal_options(w))

    def _decide(self, probe: Probe) -> dict:
        """Kept indices for the batch behind ``probe`` (memory consulted if any)."""
        return self.select(probe, memory=self.memory)

    def predict(self, x) -> jax.Array:
        """Logits ``[B, classes]`` of one batch ``x`` ``[B, H, W, C]``: probe, decision, the rest gated."""
        x = jnp.asarray(x, jnp.float32)
        n = x.shape[0]
        if self.never_gates:
            self._log(Decision(self.net.full, n, 0, False))
            return self.net(x)
        if self.static is not None:
            keep = self._static_keep(self.bl, self.Bg)
            self._log(Decision(self.net.widths(keep), n, 0, False))
            return self.net(x, keep)
        n_probe = min(self.probe_images, n)
        probe = self.probe(x[:n_probe])
        if self.shallow:
            keep = self._decide(probe)
            self._log(Decision(self.net.widths(keep), n, 0, self.memory is not None and len(self.memory) > 0,
                               self._shallow_macs(x.shape[1:]) * n_probe))
            return self.net(x, keep)
        if n_probe == n:
            self._log(Decision(self.net.full, n, n_probe, False))
            return probe.logits
        keep = self._decide(probe)
        self._log(Decision(self.net.widths(keep), n, n_probe, self.memory is not None and len(self.memory) > 0))
        return jnp.concatenate([probe.logits, self.net(x[n_probe:], keep)])

    def _pipelined_program(self, widths: tuple[int, ...], depth: int | None = None):
        """The jitted ``(state, rest, keep, next probe images) -> (rest logits, next batch's raw probe)``."""
        if (widths, depth) not in self._pipelined:
            program, probe = self.net.program(widths), self._probe_program(depth)
            self._pipelined[(widths, depth)] = jax.jit(lambda state, rest, keep, nxt: (program(state, rest, keep),
                                                                                       probe(state, nxt)))
        return self._pipelined[(widths, depth)]

    def _shallow_macs(self, image_shape) -> int:
        """MACs of one image through the shallow probe (the stem and the blocks up to :meth:`probe_depth`)."""
        key = (self.probe_depth(), tuple(int(v) for v in image_shape))
        if key not in self._macs_cache:  # layer_macs rebuilds the twin: once per depth and shape, not per batch
            self._macs_cache[key] = int(sum(self.net.layer_macs(self.net.full, key[1])[: key[0] + 2]))
        return self._macs_cache[key]

    def stream(self, images, batch_size: int, depth: int = PIPELINE_DEPTH):
        """Logits ``[b, classes]`` of each batch of ``images`` (``batch_size`` at a time), decided as
        :meth:`predict` decides them, with the probe of batch ``t + depth`` inside batch ``t``'s program (see the
        module docstring's *Pipelining*). With ``decide_every = k`` only the first batch of each group of ``k``
        is probed and decided (its probe rides in the program ``depth`` batches earlier); the others run at its
        kept channels. A generator: a timer around its consumption includes every decision."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (how many batches ahead the probes run), got {depth}")
        starts = range(0, len(images), batch_size)
        if self.never_gates or self.static is not None:
            for start in starts:
                yield self.predict(images[start : start + batch_size])
            return
        batches = [images[start : start + batch_size] for start in starts]
        used_memory = self.memory is not None and len(self.memory) > 0
        leads = set(range(0, len(batches), self.decide_every))  # the batches that are probed and decided

        shallow, until = self.shallow, self.probe_depth()
        probe_macs = self._shallow_macs(images.shape[1:]) if shallow else 0

        def probe_images(i: int) -> jax.Array:
            return jnp.asarray(batches[i][: self.probe_images], jnp.float32)

        # raw (device) probes by batch: those of the first ``depth`` batches on their own, every later one inside
        # the program ``depth`` batches earlier - so while the host reads batch t's probe and decides, the programs
        # of batches t - depth + 1 .. t - 1 are still queued (and XLA:CPU may run them side by side).
        raw = {i: self._probe(self.net.state, probe_images(i), until) for i in range(min(depth, len(batches)))
               if i in leads}
        widths = cut = None
        for t, x in enumerate(batches):
            n = len(x)
            ahead = t + depth if t + depth in leads else None  # leads holds no index past the last batch
            lead = t in leads
            if lead:
                probe = self._probe_result(raw.pop(t))
            if shallow or not lead:  # every image runs gated (the probe, if any, read only early layers)
                if lead:
                    keep = self._decide(probe)
                    widths, cut = self.net.widths(keep), self.net.cut_args(keep)
                self._log(Decision(widths, n, 0, used_memory, probe_macs * min(self.probe_images, n) * lead))
                whole = jnp.asarray(x, jnp.float32)
                if ahead is None:
                    yield self.net.program(widths)(self.net.state, whole, cut)
                else:
                    logits, raw[ahead] = self._pipelined_program(widths, until)(self.net.state, whole, cut,
                                                                                probe_images(ahead))
                    yield logits
                continue
            n_probe = min(self.probe_images, n)
            if n_probe == n:  # a batch no larger than the probe: the probe's full-width logits are its answer
                widths, cut = self.net.full, self.net.cut_args({})
                self._log(Decision(self.net.full, n, n_probe, False))
                if ahead is not None:
                    raw[ahead] = self._probe(self.net.state, probe_images(ahead), until)
                yield probe.logits
                continue
            keep = self._decide(probe)
            widths, cut = self.net.widths(keep), self.net.cut_args(keep)
            self._log(Decision(widths, n, n_probe, used_memory))
            rest = jnp.asarray(x[n_probe:], jnp.float32)
            if ahead is None:
                logits = self.net.program(widths)(self.net.state, rest, cut)
            else:
                logits, raw[ahead] = self._pipelined_program(widths)(self.net.state, rest, cut, probe_images(ahead))
            yield jnp.concatenate([probe.logits, logits])

    def _static_keep(self, bl: float, Bg: float) -> dict:
        """The static kept set at budgets ``(bl, Bg)``, computed once per pair (the guardrail changes them)."""
        if (bl, Bg) not in self._static_cache:
            self._static_cache[(bl, Bg)] = self.static_keep(self.static)
        return self._static_cache[(bl, Bg)]

    def _log(self, decision: Decision) -> None:
        if self.log_decisions:
            self.decisions.append(decision)


def stream_classes(policy: ChannelGatePolicy, images: np.ndarray, batch_size: int) -> np.ndarray:
    """int32 ``[N]`` predicted classes of ``images`` through ``policy.stream`` (pipelined decisions)."""
    out = [np.asarray(jnp.argmax(logits, -1)) for logits in policy.stream(images, batch_size)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def predict_batches(forward, images: np.ndarray, batch_size: int) -> np.ndarray:
    """int32 ``[N]`` predicted classes of ``images`` through ``forward`` (``x -> logits``), ``batch_size`` at a time."""
    out = [np.asarray(jnp.argmax(forward(images[i : i + batch_size]), -1)) for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.int32)


def active_fraction(net: GatedNet, decisions: list[Decision], image_shape) -> float:
    """MACs actually computed over all decided images / MACs of the full twin on them (probe images count full)."""
    full = net.macs(net.full, image_shape)
    images = sum(d.n_images for d in decisions)
    if not images:
        return 1.0
    spent = sum(d.n_probe * full + (d.n_images - d.n_probe) * net.macs(d.widths, image_shape) + d.probe_macs
                for d in decisions)
    return spent / (images * full)


__all__ = ["ChannelGatePolicy", "Decision", "Probe", "Reference", "active_fraction", "predict_batches",
           "stream_classes"]
