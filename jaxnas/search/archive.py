"""The run's bookkeeping: one `Archive` the loop writes every generation and checkpoints (as JSON, next to the
strategy state); history.csv, generations.csv, pareto.json and summary.json are rendered from it.

Rows (`Archive.candidates`, one per asked architecture) stay dicts: their metric columns depend on the run's
objectives and mode (the history's columns). Their ``status`` is a `jaxnas.status.Status`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Archive:
    """What a run has done so far.

    Attributes:
      config: the resolved config as JSON (what a resume must agree with, `runfolder.config_changes`); empty in
        checkpoints written before it was recorded.
      generation: generations done (the index of the next one).
      candidates: the history rows of every asked architecture (repeats as status cached).
      generations: one generations.csv row per generation.
      evaluations: architectures evaluated (the budget's unit; a table lookup is one query).
      cache_hits: repeats answered from earlier rows.
      infeasible: rows that violated a constraint (cheap or trained metric).
      filtered: rows dropped by the zero-cost pre-filter (search.prefilter).
      reference: the hypervolume reference point, fixed at the first feasible generation (multi-objective).
      seconds: time spent in generations (search only, summed over resumes).
      stopped: why the search stopped before its budget (space exhausted, stalled), or None.
      stalled: generations in a row without a new evaluation.
    """

    config: dict = dataclasses.field(default_factory=dict)
    generation: int = 0
    candidates: list[dict] = dataclasses.field(default_factory=list)
    generations: list[dict] = dataclasses.field(default_factory=list)
    evaluations: int = 0
    cache_hits: int = 0
    infeasible: int = 0
    filtered: int = 0
    reference: list[float] | None = None
    seconds: float = 0.0
    stopped: str | None = None
    stalled: int = 0

    def to_dict(self) -> dict:
        """A plain dict (for the checkpoint's JSON)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Archive:
        """The archive a checkpoint stored; keys it lacks (checkpoints of older runs) take their defaults.
        ValueError for a key this version does not know (a checkpoint of a newer jaxnas)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"the archive has keys this jaxnas does not know ({', '.join(unknown)}); resume it with "
                             "the jaxnas version that started the run")
        return cls(**{k: v for k, v in data.items() if k in known})
