"""Adaptive inference for the conv networks a search exports (``python -m jaxnas.adaptive --model <run>/model``).

- `gated`: `GatedNet` - the exported twin computed at fewer channels (one jitted program per kept-width tuple,
  weights cut to the kept channels), exact at full width, equal to the masked twin at reduced widths.
- `policy`: `ChannelGatePolicy` - per batch: probe, stem fingerprint (`interop.Fingerprinter`), experiential memory
  (`interop.ExperienceMemory`), channel scores over the gates (`interop.TransversalSelector`), kept channels under
  budgets (`interop.BudgetController`), the rest of the batch on the smaller program.
- `calibrate`: validation-only calibration (measured channel importance, outcomes, memory) and the guardrail.
- `experiment`: BASE / STATIC / CURRENT / EXPERIENCE over the budget grid, reported on test with interleaved timing.
"""

from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import ChannelGatePolicy

__all__ = ["ChannelGatePolicy", "GatedNet"]
