"""The one vocabulary of a candidate's status, from population training to a search's history.csv.

`Status` members are strings (``Status.OK == "ok"``), so they go into CSV / JSON as they are and rows read back
from those files compare equal to them.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    OK = "ok"                          # trained / scored
    EARLY_STOPPED = "early_stopped"    # trained, stopped by patience (its best weights kept)
    FAILED = "failed"                  # loss, gradients or update not finite
    INFEASIBLE = "infeasible"          # a constraint does not hold (cheap ones: never trained)
    FILTERED = "filtered"              # ranked out by the zero-cost pre-filter (search.prefilter): never trained
    CACHED = "cached"                  # a repeat of an architecture seen before: its first row's results
    NOT_EVALUATED = "not_evaluated"    # asked beyond the budget (not in history.csv)


EVALUATED = (Status.OK, Status.EARLY_STOPPED)  # rows with results a search can rank
TOLD_WORST = (Status.INFEASIBLE, Status.FILTERED)  # told -inf (single objective) / violating (multi-objective)
REUSED = (*EVALUATED, Status.INFEASIBLE, Status.FAILED, Status.FILTERED)  # what a repeat of the architecture reuses
