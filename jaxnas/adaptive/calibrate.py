"""Calibration of a channel-gating policy, on the validation split only.

1. **Evidence** (:func:`collect_evidence`, once per model): the calibration images (the first half of
   validation) in batches of ``calibration_batch``; per batch, its probe (the first ``probe_images`` images:
   stem fingerprint, channel activity) and each channel's measured importance on that batch - the increase of
   its mean NLL when the channel alone is dropped (`channel_sensitivity`, on the exact masked twin).
2. **Reference** (:func:`reference_of`): the mean importance and activity over the batches - the static
   baseline's channel scores and the scale of the current evidence.
3. **Outcomes** (:func:`outcomes`, per budget pair): gating each batch from its own probe at fractions of ``Bg``
   (:data:`LEVELS`); the outcome is the largest whose accuracy on the batch's other images stayed within
   ``max_drop`` points of the full twin's.
4. **Memory** (:func:`build_memory`): one entry per batch whose decision held the guardrail (outcome > 0) -
   fingerprint, outcome record, importance payload per gate; a batch that broke it teaches nothing to copy.
5. **Guardrail** (:func:`enforce_guardrail`): the whole policy's accuracy drop on the whole validation split (or
   its one-sided upper confidence bound, :func:`drop_bound`); while it exceeds ``max_drop`` the policy is
   tightened - ``Bg`` halved, then ``bl`` halved, alternately - down to never gating (``Bg = 0``), which holds
   by construction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from interop import ExperienceMemory
from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import FINGERPRINT_DIM, ChannelGatePolicy, Reference, predict_batches, stream_classes

LEVELS = (0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchEvidence:
    """One calibration batch: ``images`` / ``labels``, its probe's ``fingerprint`` ``[64]`` and ``activity``
    gate -> ``[C]``, the whole batch's ``activity`` and measured ``importance`` gate -> ``[C]``."""

    images: np.ndarray
    labels: np.ndarray
    fingerprint: np.ndarray
    probe_activity: dict[str, np.ndarray]
    activity: dict[str, np.ndarray]
    importance: dict[str, np.ndarray]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy in points (0-100)."""
    return 100.0 * float(np.mean(predictions == labels)) if len(labels) else 0.0


def drop_bound(full_correct: np.ndarray, correct: np.ndarray, z: float) -> tuple[float, float]:
    """``(accuracy drop, its one-sided upper bound)`` in points of a policy against the full network on the same
    images, from per-image correctness (bool ``[N]`` each): the drop is the mean of the paired differences
    ``d_i = full_i - policy_i``, the bound adds ``z`` standard errors of that mean (``z = 0``: the drop itself).
    Images both get right or both get wrong contribute 0, so the bound is tight when the two rarely disagree."""
    d = np.asarray(full_correct, np.float64) - np.asarray(correct, np.float64)
    if not len(d):
        return 0.0, 0.0
    drop = 100.0 * float(d.sum()) / len(d)  # exact for a whole number of images at the boundary
    se = 100.0 * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return drop, float(drop + z * se)


def _mean_nll(logits: jax.Array, labels: np.ndarray) -> float:
    return float(-jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1).mean())


def channel_sensitivity(net: GatedNet, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """gate -> ``[C]``: mean NLL of ``images`` with the channel alone dropped minus the full twin's (masked form)."""
    base = _mean_nll(net(images), labels)
    out = {}
    for name, width in zip(net.names, net.full):
        out[name] = np.array([
            _mean_nll(net.masked(images, {name: np.delete(np.arange(width), c)}), labels) - base for c in range(width)
        ])
    return out


def collect_evidence(
    policy: ChannelGatePolicy, images: np.ndarray, labels: np.ndarray, *, batch_size: int, sensitivity: bool = True
) -> list[BatchEvidence]:
    """Step 1 of the module docstring over ``images`` (validation), in batches of ``batch_size``.

    ``sensitivity=False`` leaves each batch's importance empty (one masked forward per channel saved) for a caller
    that replaces it (`evidence_rule`)."""
    found = []
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        if len(x) <= policy.probe_images:
            continue
        probe = policy.probe(x[: policy.probe_images], full=True)
        whole = policy.probe(x, full=True)
        found.append(BatchEvidence(x, y, probe.fingerprint, probe.activity, whole.activity,
                                   channel_sensitivity(policy.net, x, y) if sensitivity else {}))
    if not found:
        raise ValueError(f"no calibration batch has more than probe_images={policy.probe_images} images; use more "
                         "validation images or fewer probe images")
    return found


def evidence_rule(net: GatedNet, evidence: list[BatchEvidence]) -> list[BatchEvidence]:
    """``evidence`` with each batch's importance replaced by the policy's uncalibrated evidence of the whole batch
    (mean |activation| x reader norm, `ChannelGatePolicy.current_evidence` without a reference): the rule a
    gate-aware fine-tuned network was trained to be gated by (`jaxnas.adaptive.finetune`, ``selection="evidence"``)."""
    norms = jax.device_get(net.reader_norms())
    return [dataclasses.replace(e, importance={n: e.activity[n] * norms[n] for n in net.names}) for e in evidence]


def reference_of(evidence: list[BatchEvidence]) -> Reference:
    """Mean importance and activity per gate and channel over the calibration batches."""
    names = list(evidence[0].importance)
    mean = lambda key: {n: np.mean([getattr(e, key)[n] for e in evidence], axis=0) for n in names}  # noqa: E731
    return Reference(mean("importance"), mean("activity"))


def outcomes(policy: ChannelGatePolicy, evidence: list[BatchEvidence], *, max_drop: float) -> list[tuple[float, float]]:
    """Per calibration batch ``(outcome, accuracy drop there)`` at ``policy``'s budgets (no memory consulted)."""
    found = []
    n_probe = policy.probe_images
    for e in evidence:
        current = policy.current_evidence(e.probe_activity)
        rest, rest_y = jnp.asarray(e.images[n_probe:]), e.labels[n_probe:]
        base = accuracy(np.asarray(jnp.argmax(policy.net(rest), -1)), rest_y)
        outcome, drop = 0.0, 0.0
        for level in LEVELS:
            keep = policy.keep(policy.selector.scores(current), level * policy.Bg)
            gated = accuracy(np.asarray(jnp.argmax(policy.net(rest, keep), -1)), rest_y)
            if base - gated > max_drop:
                break
            outcome, drop = level, base - gated
        found.append((outcome, drop))
    return found


def build_memory(evidence: list[BatchEvidence], results: list[tuple[float, float]]) -> ExperienceMemory:
    """An :class:`ExperienceMemory` of the batches whose decision held the guardrail (outcome > 0)."""
    memory = ExperienceMemory(dim=FINGERPRINT_DIM, capacity=max(1, len(evidence)))
    for e, (outcome, drop) in zip(evidence, results):
        if outcome > 0:
            memory.add(e.fingerprint, {"outcome": outcome, "accuracy_drop": drop}, e.importance)
    return memory


def enforce_guardrail(
    policy: ChannelGatePolicy, images: np.ndarray, labels: np.ndarray, *, batch_size: int, max_drop: float,
    max_tightening: int = 6, z: float = 0.0,
) -> list[dict]:
    """Tighten ``policy`` in place until its accuracy drop on ``images`` (validation) against ``policy.net`` at full
    width is <= ``max_drop`` points - with ``z > 0``, the drop's upper confidence bound (:func:`drop_bound`).

    Returns every step tried, ``{"bl", "Bg", "accuracy_full", "accuracy", "accuracy_drop", "drop_bound",
    "holds"}``; the last is the final policy. After ``max_tightening`` steps the policy never gates (``Bg = 0``).
    """
    full_predictions = predict_batches(policy.net, images, batch_size)
    full_correct = np.asarray(full_predictions) == labels
    base = accuracy(full_predictions, labels)
    steps = []
    for step in range(max_tightening + 1):
        if step == max_tightening:
            policy.Bg = 0.0
        predictions = stream_classes(policy, images, batch_size)  # as the policy runs (groups of batches too)
        drop, bound = drop_bound(full_correct, predictions == labels, z)
        holds = bound <= max_drop + 1e-9
        steps.append(dict(bl=policy.bl, Bg=policy.Bg, accuracy_full=base, accuracy=accuracy(predictions, labels),
                          accuracy_drop=drop, drop_bound=bound, holds=holds))
        if holds or policy.never_gates:
            break
        if step % 2 == 0:
            policy.Bg /= 2
        else:
            policy.bl /= 2
    return steps


__all__ = ["BatchEvidence", "LEVELS", "accuracy", "build_memory", "channel_sensitivity", "collect_evidence",
           "drop_bound", "enforce_guardrail", "evidence_rule", "outcomes", "reference_of"]
