"""Successive halving (the inner loop of Hyperband) over one generation's candidates (``train.fidelity``).

All candidates are trained for the first rung's epochs; the best ``1 / eta`` of them (by validation accuracy) are
trained again, from scratch, for ``eta`` times as many epochs, and so on until the last rung trains the survivors
for ``train.epochs``. Every candidate keeps the score of the highest rung it reached, so an eliminated candidate is
told its low-fidelity score (the reason it was eliminated) and a survivor its full-fidelity one. Training from
scratch at each rung (instead of continuing) keeps every rung an ordinary population training, so the result does
not depend on which candidates shared a rung, and a resumed run replays a generation exactly.

    rungs(max_epochs, eta, min_epochs)          epochs per rung, e.g. (1, 2, 4) for 4, 2, 1
    successive_halving(n, train, max_epochs, eta, min_epochs) -> HalvingResult
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence


def rungs(max_epochs: int, eta: int = 2, min_epochs: int = 1) -> tuple[int, ...]:
    """Epochs of each rung: ``min_epochs * eta**i`` while below ``max_epochs``, then ``max_epochs`` itself."""
    if eta < 2 or min_epochs < 1 or max_epochs < 1:
        raise ValueError(f"successive halving needs eta >= 2, min_epochs >= 1 and max_epochs >= 1; got eta={eta}, "
                         f"min_epochs={min_epochs}, max_epochs={max_epochs}")
    out, e = [], min_epochs
    while e < max_epochs:
        out.append(e)
        e *= eta
    return (*out, max_epochs)


@dataclasses.dataclass(frozen=True)
class HalvingResult:
    """scores[i]: candidate i's score at the highest rung it reached, epochs[i]: that rung's epochs;
    rounds: (epochs, candidate indices trained) per rung; cost: candidate-epochs trained in all."""

    scores: tuple[float, ...]
    epochs: tuple[int, ...]
    rows: tuple[object, ...]
    rounds: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def cost(self) -> int:
        return sum(e * len(alive) for e, alive in self.rounds)


def successive_halving(
    n: int,
    train: Callable[[Sequence[int], int], Sequence[tuple[float, object]]],
    *,
    max_epochs: int,
    eta: int = 2,
    min_epochs: int = 1,
) -> HalvingResult:
    """Run successive halving over candidates ``0 .. n - 1``.

    ``train(indices, epochs)`` trains those candidates (from scratch) for ``epochs`` and returns one
    ``(score, row)`` per index, in order; a NaN score (failed) is never promoted. After each rung but the last the
    best ``ceil(len / eta)`` (ties: lower index) go on, in index order.
    """
    if n < 1:
        raise ValueError(f"successive halving needs at least one candidate, got {n}")
    scores, epochs, rows = [math.nan] * n, [0] * n, [None] * n
    alive, rounds = list(range(n)), []
    schedule = rungs(max_epochs, eta, min_epochs)
    for r, e in enumerate(schedule):
        results = list(train(alive, e))
        if len(results) != len(alive):
            raise ValueError(f"train returned {len(results)} results for {len(alive)} candidates")
        rounds.append((e, tuple(alive)))
        for i, (score, row) in zip(alive, results):
            scores[i], epochs[i], rows[i] = float(score), e, row
        if r == len(schedule) - 1 or len(alive) == 1:
            break
        ranked = sorted(alive, key=lambda i: (not math.isfinite(scores[i]), -scores[i] if math.isfinite(scores[i])
                                              else 0.0, i))
        alive = sorted(ranked[: math.ceil(len(alive) / eta)])
    return HalvingResult(tuple(scores), tuple(epochs), tuple(rows), tuple(rounds))
