"""interop.selector: wcur·norm(current) + wmem·norm(memory) over non-consecutive layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interop import BudgetController, ExperienceMemory, TransversalSelector

jax.config.update("jax_platforms", "cpu")

KINDS = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.as_tensor}
ARRAY_TYPES = {"numpy": np.ndarray, "jax": jax.Array, "torch": torch.Tensor}


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_scores_are_weighted_sums_of_rank_normalised_evidence():
    selector = TransversalSelector(["a"], wcur=0.8, wmem=0.2)
    out = selector.scores({"a": np.array([3.0, 1.0, 1.0, 2.0])}, {"a": np.array([0.0, 0.0, 0.0, 1.0])})
    # current ranks: 3, 0.5, 0.5, 2 (of 3); memory ranks: 1, 1, 1, 3 (of 3)
    expected = 0.8 * np.array([3, 0.5, 0.5, 2]) / 3 + 0.2 * np.array([1, 1, 1, 3]) / 3
    np.testing.assert_allclose(out["a"], expected)


def test_memory_evidence_changes_the_scores_and_their_order():
    current = {"a": np.array([0.1, 0.2, 0.3, 0.4])}
    memory = {"a": np.array([0.4, 0.3, 0.2, 0.1])}
    selector = TransversalSelector(["a"], wcur=0.4, wmem=0.6)
    alone, informed = selector.scores(current)["a"], selector.scores(current, memory)["a"]
    assert np.argsort(alone).tolist() == [0, 1, 2, 3]
    assert np.argsort(informed).tolist() == [3, 2, 1, 0]


def test_a_layer_without_memory_uses_current_evidence_at_full_weight():
    selector = TransversalSelector(["a", "b"], wcur=0.8, wmem=0.2)
    current = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([1.0, 2.0, 3.0])}
    out = selector.scores(current, {"a": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(out["a"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out["b"], out["a"])
    np.testing.assert_allclose(selector.scores(current)["a"], [0.0, 0.5, 1.0])


def test_only_the_selected_non_consecutive_layers_are_scored_in_their_order():
    rng = np.random.default_rng(0)
    current = {f"blk.{i}": rng.random(8) for i in range(12)}
    out = TransversalSelector(["blk.9", "blk.2", "blk.5"]).scores(current)
    assert list(out) == ["blk.9", "blk.2", "blk.5"]
    np.testing.assert_allclose(out["blk.2"], np.argsort(np.argsort(current["blk.2"])) / 7)


def test_a_selected_layer_missing_from_current_evidence_raises_naming_it():
    with pytest.raises(KeyError, match=r"selected layer\(s\) \['blk.7'\]"):
        TransversalSelector(["blk.3", "blk.7"]).scores({"blk.3": np.ones(4)})


def test_mean_and_none_normalisations():
    x = {"a": np.array([1.0, -3.0, 0.0, 4.0])}
    np.testing.assert_allclose(TransversalSelector(["a"], normalize="mean").scores(x)["a"], x["a"] / 2.0)
    np.testing.assert_allclose(TransversalSelector(["a"], normalize="none").scores(x)["a"], x["a"])
    zeros = TransversalSelector(["a"], normalize="mean").scores({"a": np.zeros(3)})["a"]
    np.testing.assert_array_equal(zeros, np.zeros(3))


def test_rank_normalisation_of_all_tied_and_one_unit_layers_is_one_half():
    selector = TransversalSelector(["a", "b", "c"], wcur=1.0, wmem=0.0)
    out = selector.scores({"a": np.full(5, 7.0), "b": np.array([2.0]), "c": np.zeros(0)})
    np.testing.assert_array_equal(out["a"], np.full(5, 0.5))
    np.testing.assert_array_equal(out["b"], [0.5])
    assert out["c"].shape == (0,)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=30))
def test_rank_normalisation_is_the_average_rank_over_u_minus_one(values):
    x = np.array(values, np.float64)
    out = TransversalSelector(["a"], wcur=1.0, wmem=0.0).scores({"a": x})["a"]
    expected = [(sum(v < u for v in values) + (sum(v == u for v in values) - 1) / 2) for u in values]
    np.testing.assert_allclose(out, np.array(expected) / (len(values) - 1))


@pytest.mark.parametrize("normalize", ["rank", "mean", "none"])
def test_scores_are_identical_in_numpy_jax_and_torch(normalize):
    rng = np.random.default_rng(1)
    current = {"a": rng.random(16).astype(np.float32), "b": rng.integers(0, 4, 9).astype(np.float32)}
    memory = {"a": rng.random(16).astype(np.float32)}
    selector = TransversalSelector(["a", "b"], normalize=normalize)
    reference = selector.scores(current, memory)
    for kind in ("jax", "torch"):
        convert = KINDS[kind]
        out = selector.scores({k: convert(v) for k, v in current.items()}, {k: convert(v) for k, v in memory.items()})
        for name in ("a", "b"):
            assert isinstance(out[name], ARRAY_TYPES[kind])
            np.testing.assert_allclose(host(out[name]), reference[name], rtol=1e-6)


def test_invalid_arguments_are_rejected_with_what_is_expected():
    with pytest.raises(ValueError, match="wmem must be a finite number ≥ 0"):
        TransversalSelector(["a"], wmem=-0.1)
    with pytest.raises(ValueError, match="both 0"):
        TransversalSelector(["a"], wcur=0, wmem=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        TransversalSelector(["a"], normalize="zscore")
    with pytest.raises(ValueError, match="unique"):
        TransversalSelector(["a", "a"])
    with pytest.raises(TypeError, match="sequence of layer names"):
        TransversalSelector("a")
    with pytest.raises(ValueError, match=r"memory evidence of layer 'a' has shape \(3,\)"):
        TransversalSelector(["a"]).scores({"a": np.ones(4)}, {"a": np.ones(3)})


def test_memory_evidence_from_the_experience_memory_changes_which_units_are_removed():
    """The published ExNAS code's memory could not change the selection; ours must."""
    current = {"mlp.1": torch.linspace(0, 1, 128), "mlp.4": torch.linspace(0, 1, 128)}
    past_scores = torch.linspace(1, 0, 128)  # a past run found the opposite units important
    memory = ExperienceMemory(dim=4, capacity=8)
    fp = torch.tensor([1.0, 0.0, 0.0, 0.0])
    memory.add(fp, {"dppl": 0.004}, {"mlp.1": past_scores, "mlp.4": current["mlp.4"]})
    retrieval = memory.query(fp)
    evidence = {name: memory.payload_evidence(name, retrieval) for name in current}
    selector = TransversalSelector(["mlp.1", "mlp.4"], wcur=0.2, wmem=0.8)
    budget = BudgetController(bl=0.5, Bg=0.5, align=64)

    without = budget.select(selector.scores(current))
    with_memory = budget.select(selector.scores(current, evidence))
    assert without["mlp.1"].tolist() == list(range(64, 128))
    assert with_memory["mlp.1"].tolist() == list(range(0, 64))
    assert isinstance(with_memory["mlp.1"], torch.Tensor)
