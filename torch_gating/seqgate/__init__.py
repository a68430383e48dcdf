"""SeqGate: experiential per-sequence gating of a frozen causal LM's MLP neurons, honestly measured.

- :mod:`~torch_gating.seqgate.policy` — :class:`SeqGatePolicy`: probe, sentinel-ratio decision, memory +
  current evidence → kept blocks under budgets, gated rest; as a ``forward`` for perplexity and as
  prefill / generation workloads for timing.
- :mod:`~torch_gating.seqgate.calibrate` — importance, layer tolerance, experiences, sentinel, threshold,
  memory; validation text only.
- :mod:`~torch_gating.seqgate.report` — the run: calibration, guardrail on validation, report on test.
- ``python -m torch_gating.seqgate`` — the CLI.
"""

from torch_gating.seqgate.policy import Decision, Probe, SeqGatePolicy, layer_key
from torch_gating.seqgate.report import Settings, format_report, run_seqgate

__all__ = ["Decision", "Probe", "SeqGatePolicy", "Settings", "format_report", "layer_key", "run_seqgate"]
