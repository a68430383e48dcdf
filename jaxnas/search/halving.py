"""Successive halving and Hyperband over one generation's candidates (``train.fidelity``).

All candidates are trained for the first rung's epochs; the best ``1 / eta`` of them (by validation accuracy) are
trained again, from scratch, for ``eta`` times as many epochs, and so on until the last rung trains the survivors
for ``train.epochs``. Every candidate keeps the score of the highest rung it reached, so an eliminated candidate is
told its low-fidelity score (the reason it was eliminated) and a survivor its full-fidelity one. Training from
scratch at each rung (instead of continuing) keeps every rung an ordinary population training, so the result does
not depend on which candidates shared a rung, and a resumed run replays a generation exactly.

Hyperband (Li et al., JMLR 2018) hedges over how aggressive the halving is: the generation is split into
brackets, the most aggressive starting many candidates at the first rung, the most conservative training a few at
full fidelity only, each bracket one successive halving; bracket ``s`` gets a share of the candidates proportional
to Hyperband's ``n_s = ceil((s_max + 1) / (s + 1) * eta**s)``.

    rungs(max_epochs, eta, min_epochs)          epochs per rung, e.g. (1, 2, 4) for 4, 2, 1
    successive_halving(n, train, max_epochs, eta, min_epochs) -> HalvingResult
    brackets(n, max_epochs, eta, min_epochs)    [(first rung's epochs, candidate count)], most aggressive first
    hyperband(n, train, max_epochs, eta, min_epochs) -> HalvingResult
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
    best ``ceil(len / eta)`` (ties: lower index) go on, in index order; a lone survivor skips to the last rung (there
    is nothing left to compare), so every run trains its best candidate for ``max_epochs``.
    """
    if n < 1:
        raise ValueError(f"successive halving needs at least one candidate, got {n}")
    scores, epochs, rows = [math.nan] * n, [0] * n, [None] * n
    alive, rounds = list(range(n)), []
    schedule = rungs(max_epochs, eta, min_epochs)
    last = len(schedule) - 1
    r = last if n == 1 else 0  # a lone candidate (at the start or left after a cut) goes straight to full fidelity
    while True:
        e = schedule[r]
        results = list(train(alive, e))
        if len(results) != len(alive):
            raise ValueError(f"train returned {len(results)} results for {len(alive)} candidates")
        rounds.append((e, tuple(alive)))
        for i, (score, row) in zip(alive, results):
            scores[i], epochs[i], rows[i] = float(score), e, row
        if r == last:
            break
        ranked = sorted(alive, key=lambda i: (not math.isfinite(scores[i]), -scores[i] if math.isfinite(scores[i])
                                              else 0.0, i))
        alive = sorted(ranked[: math.ceil(len(alive) / eta)])
        r = last if len(alive) == 1 else r + 1
    return HalvingResult(tuple(scores), tuple(epochs), tuple(rows), tuple(rounds))


def brackets(n: int, max_epochs: int, eta: int = 2, min_epochs: int = 1) -> list[tuple[int, int]]:
    """Hyperband's brackets for ``n`` candidates: ``(first rung's epochs, candidates)`` per bracket, most aggressive
    (lowest first rung) first. Bracket ``s`` (``s`` halvings) gets a share proportional to ``n_s`` (largest
    remainder, so the counts add up to ``n``); brackets that would get no candidate are dropped."""
    schedule = rungs(max_epochs, eta, min_epochs)
    s_max = len(schedule) - 1
    weights = [math.ceil((s_max + 1) / (s + 1) * eta**s) for s in range(s_max, -1, -1)]
    exact = [n * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return [(schedule[s_max - s], c) for s, c in zip(range(s_max, -1, -1), counts) if c > 0]


def hyperband(
    n: int,
    train: Callable[[Sequence[int], int], Sequence[tuple[float, object]]],
    *,
    max_epochs: int,
    eta: int = 2,
    min_epochs: int = 1,
) -> HalvingResult:
    """Hyperband over candidates ``0 .. n - 1``: consecutive blocks of candidates form the `brackets`, each run as
    `successive_halving` from its own first rung; ``train`` as there (it sees the global indices)."""
    if n < 1:
        raise ValueError(f"hyperband needs at least one candidate, got {n}")
    scores, epochs, rows, rounds = [math.nan] * n, [0] * n, [None] * n, []
    start = 0
    for first, count in brackets(n, max_epochs, eta, min_epochs):
        block = list(range(start, start + count))
        done = successive_halving(count, lambda idx, e, block=block: train([block[i] for i in idx], e),
                                  max_epochs=max_epochs, eta=eta, min_epochs=first)
        for i, g in enumerate(block):
            scores[g], epochs[g], rows[g] = done.scores[i], done.epochs[i], done.rows[i]
        rounds += [(e, tuple(block[i] for i in alive)) for e, alive in done.rounds]
        start += count
    return HalvingResult(tuple(scores), tuple(epochs), tuple(rows), tuple(rounds))
