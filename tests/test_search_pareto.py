"""jaxnas.search.pareto: objectives, Pareto masks, exact hypervolume, reference, knee and preference choice.

Hypervolumes are checked against independent exact computations: hand sums in 2-D, inclusion-exclusion
over the boxes of small random sets in 3-D and 4-D, and unit-cell counts on integer grids.
"""

import itertools
import time

import numpy as np
import pytest

from jaxnas.search.pareto import (
    Objective,
    choose_by_preference,
    default_reference,
    hypervolume,
    knee_point,
    parse_objective,
    pareto_mask,
    to_minimisation,
)

ACC_PARAMS = [Objective("val_accuracy", "max"), Objective("params", "min")]


def _union_volume_by_inclusion_exclusion(costs, ref):
    """Volume of the union of boxes [c, ref] (minimisation): sum over subsets of their intersections."""
    total = 0.0
    for size in range(1, len(costs) + 1):
        for subset in itertools.combinations(range(len(costs)), size):
            corner = costs[list(subset)].max(axis=0)
            total += (-1) ** (size + 1) * np.prod(np.clip(ref - corner, 0, None))
    return total


def _brute_force_front(costs):
    n = len(costs)
    front = np.zeros(n, dtype=bool)
    for i in range(n):
        if not np.all(np.isfinite(costs[i])):
            continue
        front[i] = not any(
            np.all(np.isfinite(costs[j])) and np.all(costs[j] <= costs[i]) and np.any(costs[j] < costs[i])
            for j in range(n)
        )
    return front


def test_parse_objective_reads_direction_and_defaults_to_max():
    assert parse_objective("params:min") == Objective("params", "min")
    assert parse_objective("val_accuracy") == Objective("val_accuracy", "max")
    assert parse_objective(" latency_ms : MIN ") == Objective("latency_ms", "min")
    assert str(parse_objective("macs:min")) == "macs:min"
    assert parse_objective(str(Objective("f1", "max"))) == Objective("f1", "max")


def test_parse_objective_rejects_a_bad_direction_and_shows_how_to_write_it():
    with pytest.raises(ValueError, match=r"'max' or 'min', got 'minimum'.*'params:min'"):
        parse_objective("params:minimum")
    with pytest.raises(ValueError, match="no metric name"):
        parse_objective(":min")
    with pytest.raises(ValueError, match="direction must be 'max' or 'min'"):
        Objective("params", "down")


def test_to_minimisation_negates_only_max_columns():
    values = np.array([[0.9, 1000.0], [0.5, 10.0]])
    np.testing.assert_array_equal(to_minimisation(values, ACC_PARAMS), [[-0.9, 1000.0], [-0.5, 10.0]])
    from_specs = to_minimisation(values, ["val_accuracy", "params:min"])
    np.testing.assert_array_equal(from_specs, [[-0.9, 1000.0], [-0.5, 10.0]])


def test_values_with_the_wrong_number_of_columns_are_rejected_with_the_objective_names():
    with pytest.raises(ValueError, match=r"\[N, 2\].*'val_accuracy', 'params'.*\(3, 3\)"):
        pareto_mask(np.zeros((3, 3)), ACC_PARAMS)
    with pytest.raises(ValueError, match="more than once"):
        pareto_mask(np.zeros((3, 2)), ["params:min", "params:max"])


def test_pareto_mask_keeps_non_dominated_rows_under_mixed_directions():
    values = np.array(
        [
            [0.90, 100.0],  # front
            [0.80, 50.0],  # front: cheaper
            [0.85, 120.0],  # dominated by row 0
            [0.95, 200.0],  # front: most accurate
            [0.80, 60.0],  # dominated by row 1 (same accuracy, more params)
        ]
    )
    np.testing.assert_array_equal(pareto_mask(values, ACC_PARAMS), [True, True, False, True, False])


def test_pareto_mask_never_puts_nan_or_inf_rows_on_the_front_nor_lets_them_dominate():
    values = np.array(
        [
            [0.9, 100.0],
            [np.nan, 1.0],  # failed evaluation
            [0.99, -np.inf],  # would dominate everything if it counted
            [-np.inf, 5.0],  # infeasible
            [0.8, 200.0],
        ]
    )
    np.testing.assert_array_equal(pareto_mask(values, ACC_PARAMS), [True, False, False, False, False])
    assert pareto_mask(np.empty((0, 2)), ACC_PARAMS).shape == (0,)


def test_pareto_mask_keeps_every_copy_of_a_duplicated_front_row():
    values = np.array([[0.9, 100.0], [0.9, 100.0], [0.8, 100.0], [0.7, 10.0]])
    np.testing.assert_array_equal(pareto_mask(values, ACC_PARAMS), [True, True, False, True])


def test_pareto_mask_matches_brute_force_on_random_sets_with_ties():
    rng = np.random.default_rng(0)
    objectives = ["a", "b:min", "c"]
    for _ in range(20):
        values = rng.integers(0, 5, size=(30, 3)).astype(float)  # small integers: many ties
        values[rng.random(30) < 0.1, 1] = np.nan
        expected = _brute_force_front(to_minimisation(values, objectives))
        np.testing.assert_array_equal(pareto_mask(values, objectives), expected)


def test_hypervolume_2d_equals_the_hand_computed_area():
    # Boxes [0, acc] x [params, 300]: 0.8 x 250 + (0.9 - 0.8) x 200 + (0.95 - 0.9) x 100 = 225.
    values = np.array([[0.9, 100.0], [0.8, 50.0], [0.95, 200.0]])
    assert hypervolume(values, ACC_PARAMS, [0.0, 300.0]) == pytest.approx(225.0)


def test_hypervolume_ignores_dominated_failed_and_beyond_reference_rows():
    front = np.array([[0.9, 100.0], [0.8, 50.0], [0.95, 200.0]])
    extra = np.array(
        [
            [0.85, 150.0],  # dominated
            [0.99, 400.0],  # more params than the reference: contributes nothing
            [-0.1, 10.0],  # accuracy below the reference: contributes nothing
            [np.nan, 1.0],
            [1.0, -np.inf],
            [0.9, 100.0],  # duplicate
        ]
    )
    values = np.concatenate([front, extra])
    assert hypervolume(values, ACC_PARAMS, [0.0, 300.0]) == pytest.approx(225.0)
    assert hypervolume(extra[1:5], ACC_PARAMS, [0.0, 300.0]) == 0.0
    assert hypervolume(np.empty((0, 2)), ACC_PARAMS, [0.0, 300.0]) == 0.0


def test_hypervolume_of_one_objective_is_the_best_distance_to_the_reference():
    assert hypervolume([[0.7], [0.9], [np.nan]], ["val_accuracy"], [0.5]) == pytest.approx(0.4)
    assert hypervolume([[30.0], [20.0]], ["params:min"], [100.0]) == pytest.approx(80.0)


@pytest.mark.parametrize("m", [3, 4])
def test_hypervolume_matches_inclusion_exclusion_on_small_random_sets(m):
    rng = np.random.default_rng(m)
    objectives = [Objective(f"o{k}", "max" if k % 2 == 0 else "min") for k in range(m)]
    for _ in range(15):
        n = int(rng.integers(1, 9))
        values = rng.random((n, m))
        reference = np.where([o.direction == "max" for o in objectives], 0.1, 0.9)
        costs = to_minimisation(values, objectives)
        ref = to_minimisation(reference[None], objectives)[0]
        expected = _union_volume_by_inclusion_exclusion(costs, ref)
        assert hypervolume(values, objectives, reference) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("m", [3, 4])
def test_hypervolume_on_an_integer_grid_equals_the_count_of_dominated_unit_cells(m):
    rng = np.random.default_rng(10 + m)
    side = 6
    points = rng.integers(0, side, size=(25, m)).astype(float)  # minimised, reference at the far corner
    cells = np.stack(np.meshgrid(*[np.arange(side)] * m, indexing="ij"), -1).reshape(-1, m)
    # A unit cell [c, c + 1] is dominated iff some point p has p <= c in every coordinate.
    covered = np.any(np.all(points[None, :, :] <= cells[:, None, :], -1), -1).sum()
    objectives = [Objective(f"o{k}", "min") for k in range(m)]
    assert hypervolume(points, objectives, np.full(m, side)) == pytest.approx(float(covered))


def test_hypervolume_of_a_flat_3d_front_is_its_2d_area_times_the_depth():
    rng = np.random.default_rng(3)
    xy = rng.random((300, 2))
    flat = np.concatenate([xy, np.full((300, 1), 0.25)], axis=1)
    area = hypervolume(xy, ["a:min", "b:min"], [1.0, 1.0])
    assert hypervolume(flat, ["a:min", "b:min", "c:min"], [1.0, 1.0, 1.0]) == pytest.approx(area * 0.75)


def test_hypervolume_of_a_few_hundred_points_in_4d_takes_seconds_at_most():
    rng = np.random.default_rng(4)
    # Points on the unit sphere's positive orthant: all mutually non-dominated, the hardest case.
    points = np.abs(rng.normal(size=(150, 4)))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    objectives = [f"o{k}:min" for k in range(4)]
    start = time.perf_counter()
    volume = hypervolume(points, objectives, np.ones(4))
    assert time.perf_counter() - start < 10.0
    # Between the volume of the best single box and that of the whole reference box.
    single_best = np.prod(1 - points, axis=1).max()
    assert single_best < volume < 1.0


def test_hypervolume_rejects_a_reference_of_the_wrong_length_or_non_finite():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        hypervolume([[0.9, 10.0]], ACC_PARAMS, [0.0])
    with pytest.raises(ValueError, match="must be finite"):
        hypervolume([[0.9, 10.0]], ACC_PARAMS, [0.0, np.nan])


def test_default_reference_is_zero_for_accuracy_and_one_point_one_times_the_worst_cost():
    values = np.array([[0.9, 100.0], [0.5, 2000.0], [np.nan, 1e9], [0.7, np.inf]])
    reference = default_reference(values, ACC_PARAMS)
    # The NaN row's params still count: each column uses its own finite values.
    np.testing.assert_allclose(reference, [0.0, 1.1e9])
    assert not np.signbit(reference[0])
    np.testing.assert_array_equal(default_reference(values.copy(), ACC_PARAMS), reference)


def test_default_reference_of_a_negative_max_objective_lies_beyond_its_worst_value():
    values = np.array([[-2.0, 3.0], [-1.0, 5.0]])  # e.g. a negated loss, maximised
    np.testing.assert_allclose(default_reference(values, ["neg_loss", "latency_ms:min"]), [-2.2, 5.5])
    # Every row then lies strictly inside the reference and counts towards the hypervolume.
    assert hypervolume(values, ["neg_loss", "latency_ms:min"], [-2.2, 5.5]) > hypervolume(
        values[:1], ["neg_loss", "latency_ms:min"], [-2.2, 5.5]
    )


def test_default_reference_without_any_finite_value_says_to_pass_one():
    with pytest.raises(ValueError, match="'params'.*pass a reference"):
        default_reference([[0.9, np.nan], [0.8, np.nan]], ACC_PARAMS)


def test_knee_point_is_the_front_point_farthest_inside_the_line_between_the_extremes():
    values = np.array(
        [
            [0.50, 1_000.0],  # extreme: smallest
            [np.nan, 10.0],  # failed
            [0.90, 2_000.0],  # the knee: nearly the best accuracy for little more than the smallest size
            [0.92, 10_000.0],
            [0.93, 100_000.0],  # extreme: most accurate
            [0.80, 50_000.0],  # dominated
        ]
    )
    assert knee_point(values, ACC_PARAMS) == 2


def test_knee_point_with_more_objectives_is_the_front_point_closest_to_the_ideal():
    objectives = ["acc", "params:min", "latency:min"]
    values = np.array([[1.0, 10.0, 10.0], [0.0, 0.0, 10.0], [0.9, 1.0, 1.0], [0.0, 10.0, 0.0]])
    assert knee_point(values, objectives) == 2


def test_knee_point_of_a_single_point_front_and_of_no_front():
    assert knee_point([[np.nan, 1.0], [0.9, 10.0], [0.8, 20.0]], ACC_PARAMS) == 1
    with pytest.raises(ValueError, match="no Pareto front"):
        knee_point([[np.nan, 1.0]], ACC_PARAMS)


def test_choose_by_preference_minimises_params_among_rows_meeting_the_accuracy_floor():
    values = np.array(
        [
            [0.99, 900.0],
            [0.96, 100.0],  # cheapest, but below the floor
            [0.97, 300.0],  # qualifies
            [0.98, 300.0],  # same params, more accurate: wins the tie
            [np.nan, 50.0],  # failed
        ]
    )
    assert choose_by_preference(values, ACC_PARAMS, "params", {"val_accuracy": 0.97}) == 3
    assert choose_by_preference(values, ACC_PARAMS, "params", {"val_accuracy": 0.995}) is None
    # A bound on a min objective is a ceiling; optimising a max objective takes its largest value.
    assert choose_by_preference(values, ACC_PARAMS, "val_accuracy", {"params": 500.0}) == 3
    assert choose_by_preference(values, ACC_PARAMS, "params", {}) == 1


def test_choose_by_preference_rejects_names_that_are_not_objectives():
    with pytest.raises(ValueError, match=r"\['accuracy'\] not among the objectives"):
        choose_by_preference([[0.9, 1.0]], ACC_PARAMS, "params", {"accuracy": 0.9})
