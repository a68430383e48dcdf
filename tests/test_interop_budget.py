"""interop.budget: per-layer / global budgets with aligned kept counts, as full as the grid allows."""

import itertools
import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interop import BudgetController

jax.config.update("jax_platforms", "cpu")

KINDS = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.as_tensor}
ARRAY_TYPES = {"numpy": np.ndarray, "jax": jax.Array, "torch": torch.Tensor}


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def decimal_floor(fraction, n):
    return math.floor(Fraction(repr(fraction)) * n)


def allowed_removals(units, bl, align, min_keep):
    """Brute force over kept counts: every removal the constraints allow in one layer."""
    floor_keep = min_keep if isinstance(min_keep, int) else math.ceil(Fraction(repr(min_keep)) * units)
    return [
        units - kept
        for kept in range(units + 1)
        if units - kept <= decimal_floor(bl, units)
        and kept >= min(floor_keep, units)
        and (kept % align == 0 or kept == units)
    ]


def bottleneck(scores, removals):
    """The highest score removed (−inf if nothing is removed)."""
    return max((np.sort(x)[r - 1] for x, r in zip(scores, removals) if r > 0), default=-np.inf)


def largest_total(layer_options, cap):
    reachable = {0}
    for options in layer_options:
        reachable = {t + r for t in reachable for r in options if t + r <= cap}
    return max(reachable)


budget_cases = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(0, 200), min_size=1, max_size=5),
        "bl": st.integers(0, 100).map(lambda i: i / 100),
        "Bg": st.integers(0, 100).map(lambda i: i / 100),
        "align": st.sampled_from([1, 2, 8, 16, 64, 128]),
        "min_keep": st.one_of(st.integers(0, 80), st.integers(0, 10).map(lambda i: i / 10)),
        "seed": st.integers(0, 2**32 - 1),
        "levels": st.integers(1, 50),
    }
)


def make_scores(case):
    """Scores on a coarse grid so that ties (within and across layers) are common."""
    rng = np.random.default_rng(case["seed"])
    return {
        f"layer{i}": (rng.integers(0, case["levels"], u) / 4).astype(np.float32) for i, u in enumerate(case["sizes"])
    }


@settings(max_examples=200, deadline=None)
@given(budget_cases)
def test_budgets_hold_the_budget_is_used_fully_and_the_bottleneck_is_minimal(case):
    scores = make_scores(case)
    controller = BudgetController(case["bl"], case["Bg"], case["align"], case["min_keep"])
    kept = controller.select(scores)
    plan = controller.plan(scores)
    total_units = sum(case["sizes"])
    removed_total = 0
    for name, x in scores.items():
        units, idx = x.shape[0], kept[name]
        removed = units - idx.shape[0]
        removed_total += removed
        assert plan.kept[name] == idx.shape[0]
        assert removed in allowed_removals(units, case["bl"], case["align"], case["min_keep"])
        assert np.all(np.diff(idx) > 0) and (idx.size == 0 or (idx[0] >= 0 and idx[-1] < units))
        # Within a layer the removed units are the lowest-scoring ones, ties to the lower index.
        dropped = np.setdiff1d(np.arange(units), idx)
        order = np.argsort(x, kind="stable")
        np.testing.assert_array_equal(np.sort(order[:removed]), dropped)
    assert removed_total <= decimal_floor(case["Bg"], total_units)
    layer_options = [allowed_removals(u, case["bl"], case["align"], case["min_keep"]) for u in case["sizes"]]
    assert removed_total == largest_total(layer_options, decimal_floor(case["Bg"], total_units))
    if math.prod(len(o) for o in layer_options) <= 5000:
        best = min(
            bottleneck(scores.values(), combo)
            for combo in itertools.product(*layer_options)
            if sum(combo) == removed_total
        )
        assert bottleneck(scores.values(), plan.removed.values()) == best
    assert plan.removed_fraction == pytest.approx(removed_total / total_units if total_units else 0.0)
    again = controller.select({k: v.copy() for k, v in scores.items()})
    assert all(np.array_equal(again[k], kept[k]) for k in kept)


@settings(max_examples=100, deadline=None)
@given(budget_cases)
def test_torch_kept_indices_equal_numpy_exactly(case):
    scores = make_scores(case)
    controller = BudgetController(case["bl"], case["Bg"], case["align"], case["min_keep"])
    expected = controller.select(scores)
    got = controller.select({k: torch.from_numpy(v) for k, v in scores.items()})
    for name in scores:
        assert isinstance(got[name], torch.Tensor)
        assert got[name].tolist() == expected[name].tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("align", [1, 64])
def test_kept_indices_are_identical_in_numpy_jax_and_torch(kind, align):
    rng = np.random.default_rng(7)
    scores = {
        "mlp.0": (rng.integers(0, 8, 200) / 8).astype(np.float32),
        "mlp.5": (rng.integers(0, 8, 256) / 8).astype(np.float32),
        "mlp.6": rng.random(100).astype(np.float32),
    }
    controller = BudgetController(bl=0.5, Bg=0.3, align=align)
    expected = controller.select(scores)
    got = controller.select({k: KINDS[kind](v) for k, v in scores.items()})
    for name in scores:
        assert isinstance(got[name], ARRAY_TYPES[kind])
        np.testing.assert_array_equal(host(got[name]), expected[name])
    if kind == "jax":
        chex.assert_rank(list(got.values()), 1)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
    st.integers(0, 2**32 - 1),
    st.integers(0, 100),
)
def test_without_binding_layer_constraints_the_globally_lowest_scoring_units_go(sizes, seed, percent):
    rng = np.random.default_rng(seed)
    flat = rng.permutation(sum(sizes)).astype(np.float32)  # distinct scores
    scores = dict(zip([f"l{i}" for i in range(len(sizes))], np.split(flat, np.cumsum(sizes)[:-1])))
    controller = BudgetController(bl=1.0, Bg=percent / 100, align=1)
    kept = controller.select(scores)
    n_removed = decimal_floor(percent / 100, sum(sizes))
    removed = [s for name, x in scores.items() for i, s in enumerate(x) if i not in set(kept[name].tolist())]
    assert sorted(removed) == list(range(n_removed))


def test_docstring_worked_example():
    low = np.linspace(0.0, 0.30, 64)
    scores = {
        "mlp.2": np.concatenate([low, np.linspace(0.31, 1.0, 192)]),
        "mlp.9": np.concatenate([low / 3, np.linspace(0.31, 1.0, 192)]),
    }
    plan = BudgetController(bl=0.25, Bg=0.125, align=64).plan(scores)
    assert plan.kept == {"mlp.2": 256, "mlp.9": 192}
    assert plan.removed_fraction == 0.125
    kept = BudgetController(bl=0.25, Bg=0.125, align=64).select(scores)
    np.testing.assert_array_equal(kept["mlp.9"], np.arange(64, 256))
    assert BudgetController(bl=0.2, Bg=0.125, align=64).plan(scores).kept == {"mlp.2": 256, "mlp.9": 256}


def test_the_global_budget_is_reached_even_when_the_cheapest_chunk_would_strand_it():
    # a: chunks of 64; b and c: U = 114, so their first chunk is 114 mod 64 = 50 units.
    # Global cap floor(0.281 · 356) = 100: a greedy taking a's cheapest chunk (64) stops at 64;
    # b + c reach 100.
    scores = {"a": np.zeros(128), "b": np.linspace(0.5, 1, 114), "c": np.linspace(0.5, 1, 114)}
    plan = BudgetController(bl=0.5, Bg=0.281, align=64).plan(scores)
    assert plan.removed == {"a": 0, "b": 50, "c": 50}


def test_the_most_important_removed_unit_is_as_unimportant_as_the_budget_allows():
    # Global cap floor(0.256 · 392) = 100, reachable as a + b (50 + 50) or as c alone (36 + 64).
    # Greedy by key would take a's cheap chunk first and then need b (key 0.95); c's chunks have
    # keys 0.3 and 0.5, so removing c alone loses less important units.
    scores = {
        "a": np.concatenate([np.full(50, 0.1), np.full(64, 1.0)]),
        "b": np.concatenate([np.full(50, 0.95), np.full(64, 1.0)]),
        "c": np.concatenate([np.full(36, 0.3), np.full(64, 0.5), np.full(64, 1.0)]),
    }
    plan = BudgetController(bl=0.7, Bg=0.256, align=64).plan(scores)
    assert plan.removed == {"a": 0, "b": 0, "c": 100}


def test_equal_chunk_keys_go_to_the_earlier_layer_then_lower_units():
    scores = {"first": np.zeros(8), "second": np.zeros(8)}
    kept = BudgetController(bl=0.5, Bg=0.25, align=2).select(scores)
    assert kept["first"].tolist() == [4, 5, 6, 7] and kept["second"].tolist() == list(range(8))


def test_budgets_are_read_as_the_decimals_written():
    assert BudgetController(bl=0.29).layer_cap(100) == 29
    assert BudgetController(Bg=0.07).global_cap(100) == 7
    assert BudgetController(bl=1.0, min_keep=0.3).layer_cap(10) == 7
    assert BudgetController(bl=1.0, min_keep=4).layer_cap(10) == 6


def test_integer_scores_empty_layers_and_no_layers():
    controller = BudgetController(bl=0.5, Bg=0.5, align=1)
    kept = controller.select({"a": torch.tensor([3, 1, 2, 0]), "empty": torch.zeros(0)})
    assert kept["a"].tolist() == [0, 2] and kept["empty"].tolist() == []
    assert controller.select({}) == {}
    assert controller.plan({}).removed_fraction == 0.0


def test_plan_summaries():
    plan = BudgetController(bl=0.5, Bg=0.5, align=4).plan({"a": np.arange(16.0), "b": np.arange(8.0) + 100})
    assert plan.kept == {"a": 8, "b": 4}
    assert plan.removed == {"a": 8, "b": 4}
    assert plan.layer_removed_fraction == {"a": 0.5, "b": 0.5}
    assert plan.removed_fraction == 0.5


def test_invalid_arguments_and_scores_are_rejected_with_what_is_expected():
    with pytest.raises(ValueError, match=r"bl .* must be a number in \[0, 1\], got 1.5"):
        BudgetController(bl=1.5)
    with pytest.raises(ValueError, match=r"Bg .* must be a number in \[0, 1\], got -0.1"):
        BudgetController(Bg=-0.1)
    with pytest.raises(ValueError, match="align must be an int ≥ 1"):
        BudgetController(align=0)
    with pytest.raises(ValueError, match="min_keep as a unit count must be ≥ 0"):
        BudgetController(min_keep=-1)
    with pytest.raises(ValueError, match=r"min_keep as a float .* in \[0, 1\]"):
        BudgetController(min_keep=1.5)
    with pytest.raises(ValueError, match="contain NaN"):
        BudgetController().select({"a": np.array([0.0, np.nan])})
    with pytest.raises(ValueError, match=r"must be \[U\]"):
        BudgetController().select({"a": np.zeros((2, 2))})
    with pytest.raises(TypeError, match="one framework"):
        BudgetController().select({"a": np.zeros(2), "b": torch.zeros(2)})
