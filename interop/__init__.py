"""Framework-neutral ExNAS building blocks over the Python array API (numpy, jax and torch arrays alike).

- :class:`Fingerprinter` — activations → ``[dim]`` context fingerprints (seeded random projection).
- :class:`ExperienceMemory` / :class:`Retrieval` — past runs' fingerprints and outcomes, top-K retrieval.
- :class:`TransversalSelector` — per-unit scores over chosen layers from current and memory evidence.
- :class:`BudgetController` / :class:`BudgetPlan` — scores → kept units under per-layer / global budgets.

Every function takes and returns arrays of the caller's framework, on the caller's device; importing
``interop`` imports neither jax nor torch.
"""

from interop.budget import BudgetController, BudgetPlan
from interop.fingerprint import Fingerprinter
from interop.memory import ExperienceMemory, Retrieval
from interop.selector import TransversalSelector

__all__ = ["BudgetController", "BudgetPlan", "ExperienceMemory", "Fingerprinter", "Retrieval", "TransversalSelector"]
