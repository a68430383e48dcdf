"""SeqGate: experiential per-sequence gating of a frozen causal LM's MLP neurons, honestly measured.

- :mod:`~torch_gating.seqgate.policy` — :class:`SeqGatePolicy`: probe, sentinel-ratio decision, memory +
  current evidence → kept blocks under budgets, gated rest; as a ``forward`` for perplexity and as
  prefill / generation workloads for timing.
- :mod:`~torch_gating.seqgate.calibrate` — importance, layer tolerance, experiences, sentinel, threshold,
  memory; validation text only.
- :mod:`~torch_gating.seqgate.experiment` — the experiment: :class:`Settings` (frozen) and the run:
  calibration, guardrail on validation, report on test.
- ``python -m torch_gating.seqgate`` — the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first use (PEP 562), so that ``python -m torch_gating.seqgate`` starts its CLI module, which
# handles Ctrl-C, before torch and transformers are imported (seconds).
_EXPORTS = {
    "Decision": "torch_gating.seqgate.policy",
    "Probe": "torch_gating.seqgate.policy",
    "SeqGatePolicy": "torch_gating.seqgate.policy",
    "layer_key": "torch_gating.seqgate.policy",
    "Settings": "torch_gating.seqgate.experiment",
    "format_report": "torch_gating.seqgate.experiment",
    "run_seqgate": "torch_gating.seqgate.experiment",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from torch_gating.seqgate.experiment import Settings, format_report, run_seqgate
    from torch_gating.seqgate.policy import Decision, Probe, SeqGatePolicy, layer_key


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
