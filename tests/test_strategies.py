"""Search strategies: the ask / tell protocol over pytree states, each algorithm's defining behaviour, and a
loose statistical check that each one finds good NAS-Bench-201 cells."""

import importlib.util
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxnas.spaces import macro_space, nb201_space
from jaxnas.strategies import (
    NSGA2,
    GeneticAlgorithm,
    LocalSearch,
    PredictorGuided,
    RandomSearch,
    RegularizedEvolution,
    constrained_dominates,
    crowding_distance,
    deduplicated,
    non_dominated_ranks,
    option_entropy,
    progressive,
    spearman,
    with_constraints,
)
from jaxnas.strategies.nsga2 import survivors
from jaxnas.tables import Table

SPACE = nb201_space()
CONV3 = SPACE["1<-0"].index_of("nor_conv_3x3")


@pytest.fixture(scope="module")
def table():
    return Table.load("nb201_analog", SPACE)


def few_convs(enc):
    """A cheap constraint, like params <= budget: at most two 3x3 convolutions in the cell. bool [P]."""
    return jnp.sum(enc == CONV3, -1) <= 2


# One instance per strategy: jit caches on the bound methods, so each compiles once for the whole module.
STRATEGIES = {
    "random": RandomSearch(SPACE, batch_size=4),
    "re": RegularizedEvolution(SPACE, population_size=10, sample_size=3, batch_size=2),
    "ga": GeneticAlgorithm(SPACE, population_size=10, elites=2),
    "nsga2": NSGA2(SPACE, n_objectives=1, population_size=8),
    "local_first": LocalSearch(SPACE, batch_size=2),
    "local_best": LocalSearch(SPACE, batch_size=4, mode="best"),
    "predictor": PredictorGuided(SPACE, batch_size=8, initial=16, candidates=64, train_steps=30, capacity=256),
    "predictor_gp": PredictorGuided(SPACE, batch_size=8, initial=16, candidates=64, capacity=128, surrogate="gp"),
    "dedup_re": deduplicated(RegularizedEvolution(SPACE, population_size=10, sample_size=3, batch_size=2),
                             capacity=256),
    "constrained_ga": with_constraints(GeneticAlgorithm(SPACE, population_size=10, elites=2), few_convs),
    "progressive_re": progressive(RegularizedEvolution(SPACE, population_size=10, sample_size=3, batch_size=2),
                                  [["2<-0", "3<-0", "3<-1"]], generations_per_level=10),
}
JITTED = {name: (jax.jit(s.ask), jax.jit(s.tell)) for name, s in STRATEGIES.items()}


def tell_shape(strategy, fitness):
    return fitness[:, None] if isinstance(strategy, NSGA2) else fitness


def run(name, table, key, asks, column="baseline_acc", state=None):
    """(state, asked encodings [asks, P, n]): ``asks`` rounds of jitted ask, table lookup, jitted tell."""
    strategy = STRATEGIES[name]
    ask, tell = JITTED[name]
    if state is None:
        key, k_init = jax.random.split(key)
        state = strategy.init(k_init)
    history = []
    for _ in range(asks):
        key, k_ask = jax.random.split(key)
        enc, state = ask(k_ask, state)
        fitness = jnp.asarray(table.lookup(np.asarray(enc), column), jnp.float32)
        state = tell(state, enc, tell_shape(strategy, fitness))
        history.append(np.asarray(enc))
    return state, np.stack(history)


def expected_best_of_random(values, n):
    """E[max of n uniform draws with replacement] from ``values``: the mean random search converges to."""
    v = np.sort(values)
    k = np.arange(1, len(v) + 1) / len(v)
    return float(np.sum(v * (k**n - (k - 1 / len(v)) ** n)))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_protocol_valid_asks_array_state_deterministic_and_resumable(name, table):
    strategy = STRATEGIES[name]
    ask, _ = JITTED[name]
    state, history = run(name, table, jax.random.key(0), 6)
    # Asked encodings are valid canonical cells of the right shape.
    assert history.shape == (6, strategy.batch_size, SPACE.n_choices) and history.dtype == np.int32
    assert np.asarray(SPACE.is_valid(history)).all()
    # The state is a pytree of arrays only (what Orbax saves).
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    # Same key, same search.
    state_again, history_again = run(name, table, jax.random.key(0), 6)
    np.testing.assert_array_equal(history, history_again)
    chex.assert_trees_all_equal(state, state_again)
    # Leaves saved to numpy and restored: the resumed search asks exactly what the uninterrupted one asks.
    saved = [np.array(leaf) for leaf in leaves]
    restored = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(leaf) for leaf in saved])
    _, continued = run(name, table, jax.random.key(1), 3, state=state)
    _, resumed = run(name, table, jax.random.key(1), 3, state=restored)
    np.testing.assert_array_equal(continued, resumed)
    metrics = strategy.metrics(state)
    assert all(jnp.shape(v) == () for v in metrics.values())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_finds_good_cells_on_nb201(name, table):
    """Mean over 5 seeds of the best baseline_acc within 200 distinct queries beats random search at 50."""
    random_at_50 = expected_best_of_random(table.column("baseline_acc"), 50)
    best = []
    for seed in range(5):
        _, history = run(name, table, jax.random.key(100 + seed), 200 // STRATEGIES[name].batch_size + 40)
        rows = history.reshape(-1, SPACE.n_choices)
        distinct = rows[np.sort(SPACE.unique(rows))][:200]
        best.append(table.lookup(distinct, "baseline_acc").max())
    assert np.mean(best) > random_at_50 + 0.2, (np.mean(best), random_at_50)


def test_genetic_algorithm_on_a_space_with_rules_asks_valid_canonical_encodings():
    space = macro_space(max_stages=2, channels=(16, 32), units=(64, 128))
    strategy = GeneticAlgorithm(space, population_size=6, elites=1)
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    state, key = strategy.init(jax.random.key(0)), jax.random.key(1)
    for step in range(8):
        enc, state = ask(jax.random.fold_in(key, step), state)
        assert np.asarray(space.is_valid(enc)).all()
        fitness = jax.random.normal(jax.random.fold_in(key, 100 + step), (enc.shape[0],))
        state = tell(state, enc, fitness.at[0].set(jnp.nan))  # a failed candidate is allowed
    assert float(state.entropy) > 0


def test_regularized_evolution_removes_the_oldest_member_not_the_worst():
    strategy = RegularizedEvolution(SPACE, population_size=3, sample_size=2, batch_size=1)
    tell = jax.jit(strategy.tell)
    state = strategy.init(jax.random.key(0))
    members = np.array([[1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2], [3, 3, 3, 3, 3, 3]], np.int32)
    for row, fitness in zip(members, [90.0, 10.0, 50.0], strict=True):
        state = tell(state, row[None], jnp.array([fitness]))
    child = np.array([[4, 4, 4, 4, 4, 4]], np.int32)
    state = tell(state, child, jnp.array([1.0]))
    population = {tuple(r) for r in np.asarray(state.population)}
    # The fittest member was the oldest: aging removes it anyway; the much worse ones stay.
    assert population == {(2,) * 6, (3,) * 6, (4,) * 6}
    enc, _ = jax.jit(strategy.ask)(jax.random.key(1), state)
    assert (np.asarray(enc) != np.asarray(state.population)).any(-1).all()  # a child differs from every member


def test_regularized_evolution_published_mutation_changes_exactly_one_choice():
    strategy = RegularizedEvolution(SPACE, population_size=4, sample_size=2, batch_size=4, mutation="one")
    state = strategy.init(jax.random.key(0))
    parent = np.full((4, 6), 2, np.int32)
    state = jax.jit(strategy.tell)(state, parent, jnp.zeros(4))
    enc, _ = jax.jit(strategy.ask)(jax.random.key(3), state)
    assert ((np.asarray(enc) != 2).sum(-1) == 1).all()


def test_genetic_algorithm_elitism_keeps_the_best_and_entropy_matches_hand_computation():
    strategy = GeneticAlgorithm(SPACE, population_size=4, elites=2)
    state = strategy.init(jax.random.key(0))
    first = np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    tell = jax.jit(strategy.tell)
    state = tell(state, first, jnp.array([5.0, 7.0]))
    second = np.array([[2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 2, 3]], np.int32)
    state = tell(state, second, jnp.array([1.0, jnp.nan]))
    population = np.asarray(state.population)
    assert {tuple(r) for r in population} == {(0,) * 6, (1,) * 6, (2,) * 6, (2, 2, 2, 2, 2, 3)}
    assert float(state.fitness.max()) == 7.0
    # Choices 0-4 hold three options with shares 1/4, 1/4, 1/2; choice 5 four options of 1/4 each.
    h_three = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    expected = (5 * h_three + math.log(4)) / 6
    assert float(state.entropy) == pytest.approx(expected, rel=1e-6)
    assert float(strategy.metrics(state)["diversity"]) == pytest.approx(expected, rel=1e-6)
    assert float(option_entropy(SPACE, jnp.zeros((5, 6), jnp.int32))) == 0.0


def test_local_search_asks_one_choice_neighbours_and_restarts_at_a_local_optimum(table):
    strategy = STRATEGIES["local_first"]
    ask, tell = JITTED["local_first"]
    state, _ = run("local_first", table, jax.random.key(5), 4)
    for step in range(60):
        current, restarting = np.asarray(state.current), bool(state.restart)
        enc, state = ask(jax.random.key(1000 + step), state)
        if not restarting and int(state.position) <= int(state.n_valid):
            assert ((np.asarray(enc) != current).sum(-1) == 1).all()  # neighbours of the current cell
        # A constant fitness: nothing improves, so every neighbourhood ends in a restart.
        state = tell(state, enc, jnp.zeros(strategy.batch_size))
    assert int(strategy.metrics(state)["restarts"]) >= 2


def brute_force_ranks(objectives, violation):
    k = len(objectives)
    dominates = np.zeros((k, k), bool)
    for i in range(k):
        for j in range(k):
            fi, fj = violation[i] <= 0, violation[j] <= 0
            if fi and not fj:
                dominates[i, j] = True
            elif not fi and not fj:
                dominates[i, j] = violation[i] < violation[j]
            elif fi and fj:
                dominates[i, j] = np.all(objectives[i] >= objectives[j]) and np.any(objectives[i] > objectives[j])
    ranks, remaining, front = np.zeros(k, int), set(range(k)), 0
    while remaining:
        current = {j for j in remaining if not any(dominates[i, j] for i in remaining)}
        for j in current:
            ranks[j] = front
        remaining -= current
        front += 1
    return dominates, ranks


def brute_force_crowding(objectives, ranks):
    distance = np.zeros(len(objectives))
    for front in set(ranks):
        members = np.flatnonzero(ranks == front)
        for m in range(objectives.shape[1]):
            order = members[np.argsort(objectives[members, m], kind="stable")]
            values = objectives[order, m]
            span = values[-1] - values[0]
            distance[order[0]] = distance[order[-1]] = np.inf
            for a in range(1, len(order) - 1):
                distance[order[a]] += (values[a + 1] - values[a - 1]) / span if span > 0 else 0.0
    return distance


@pytest.mark.parametrize("seed", range(4))
def test_non_dominated_sort_and_crowding_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    objectives = rng.random((30, 2)).astype(np.float32)
    violation = np.where(rng.random(30) < 0.3, rng.integers(1, 4, 30), 0).astype(np.float32)
    dominates, ranks = brute_force_ranks(objectives, violation)
    np.testing.assert_array_equal(np.asarray(constrained_dominates(objectives, violation)), dominates)
    got = np.asarray(jax.jit(non_dominated_ranks)(dominates))
    np.testing.assert_array_equal(got, ranks)
    np.testing.assert_allclose(np.asarray(crowding_distance(objectives, got)), brute_force_crowding(objectives, ranks),
                               rtol=1e-5)


def test_constraint_domination_orders_feasible_then_smaller_violation():
    objectives = np.array([[0.1, 0.1], [9.0, 9.0], [8.0, 8.0], [0.5, 0.2], [0.2, 0.5]], np.float32)
    violation = np.array([0.0, 2.0, 1.0, 0.0, 0.0], np.float32)
    ranks = np.asarray(non_dominated_ranks(constrained_dominates(objectives, violation)))
    # Feasible front {3, 4}, then feasible 0 (dominated), then the infeasible by violation: 2 (1.0), 1 (2.0).
    np.testing.assert_array_equal(ranks, [1, 3, 2, 0, 0])
    assert set(np.asarray(survivors(objectives, violation, 3)).tolist()) == {0, 3, 4}


def test_nsga2_keeps_a_non_dominated_feasible_front_and_puts_failures_last():
    strategy = NSGA2(SPACE, n_objectives=2, population_size=4)
    state = strategy.init(jax.random.key(0))
    enc = jnp.array([[0] * 6, [1] * 6, [2] * 6, [3] * 6], jnp.int32)
    fitness = jnp.array([[1.0, 1.0], [2.0, 0.0], [jnp.nan, 5.0], [0.0, 2.0]])
    state = jax.jit(strategy.tell)(state, enc, fitness, violation=jnp.array([0.0, 0.0, 0.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(state.rank[:2]), [0, 0])
    assert np.isinf(np.asarray(state.crowding[:2])).all()
    # Rank 1 is the infeasible-but-run candidate; the failed one (NaN) ranks below it.
    np.testing.assert_array_equal(np.asarray(state.violation[2:]) > 0, [True, True])
    assert float(state.violation[3]) > float(state.violation[2]) == 3.0


def test_dedup_never_asks_an_evaluated_encoding_while_alternatives_exist():
    strategy = deduplicated(RegularizedEvolution(SPACE, population_size=4, sample_size=2, batch_size=4),
                            capacity=64)
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    state = strategy.init(jax.random.key(0))
    told = set()
    for step in range(12):
        enc, state = ask(jax.random.key(step), state)
        rows = [tuple(r) for r in np.asarray(enc)]
        assert not told & set(rows) and len(set(rows)) == len(rows)
        told |= set(rows)
        # A flat fitness keeps the population on a plateau, where repeats would be most likely.
        state = tell(state, enc, jnp.zeros(4))
    assert int(strategy.metrics(state)["duplicates_asked"]) == 0


def test_constraint_wrapper_never_asks_infeasible_and_tells_inner_minus_inf():
    inner = RandomSearch(SPACE, batch_size=16)
    strategy = with_constraints(inner, few_convs)
    ask = jax.jit(strategy.ask)
    state = strategy.init(jax.random.key(0))
    for step in range(5):
        enc, state = ask(jax.random.key(step), state)
        assert np.asarray(few_convs(enc)).all()
    assert int(strategy.metrics(state)["infeasible_asked"]) == 0
    # Told infeasible rows reach an inner GA as -inf and can never be its best.
    ga = with_constraints(GeneticAlgorithm(SPACE, population_size=3, elites=1), few_convs)
    state = ga.init(jax.random.key(0))
    rows = jnp.array([[3, 3, 3, 3, 3, 3], [1, 1, 1, 1, 1, 1]], jnp.int32)
    state = jax.jit(ga.tell)(state, rows, jnp.array([99.0, 1.0]))
    told_fitness = dict(zip(map(tuple, np.asarray(state.inner.population)), np.asarray(state.inner.fitness)))
    assert np.isneginf(told_fitness[(3,) * 6]) and told_fitness[(1,) * 6] == 1.0


def test_progressive_holds_locked_choices_at_base_until_their_level_opens():
    skips = ["2<-0", "3<-0", "3<-1"]
    strategy = progressive(RandomSearch(SPACE, batch_size=32), [skips], generations_per_level=2,
                           base={"3<-0": "skip_connect"})
    locked = [SPACE.index(n) for n in skips]
    ask = jax.jit(strategy.ask)
    state = strategy.init(jax.random.key(0))
    for step in range(4):
        enc, state = ask(jax.random.key(step), state)
        held = np.asarray(enc)[:, locked]
        if step < 2:
            assert (held == [0, 1, 0]).all() and int(strategy.metrics(state)["level"]) == 0
        else:
            assert len({tuple(r) for r in held}) > 1 and int(strategy.metrics(state)["level"]) == 1
        state = strategy.tell(state, enc, jnp.zeros(32))
    with pytest.raises(ValueError, match="not a choice"):
        progressive(RandomSearch(SPACE), [["3<-9"]], generations_per_level=1)


@pytest.mark.parametrize("seed", range(3))
def test_spearman_matches_scipy_with_ties_and_masks(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, 40).astype(np.float32), rng.normal(size=40).astype(np.float32)
    y[:5] = y[5]  # ties on both sides
    mask = rng.random(40) < 0.7
    expected = scipy.stats.spearmanr(x[mask], y[mask]).statistic
    assert float(spearman(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["predictor", "predictor_gp"])
def test_predictor_logs_the_spearman_of_its_predictions_on_told_candidates(table, name):
    strategy = STRATEGIES[name]
    state, _ = run(name, table, jax.random.key(3), 3)
    enc, state_asked = JITTED[name][0](jax.random.key(9), state)
    fitness = jnp.asarray(table.lookup(np.asarray(enc), "baseline_acc"), jnp.float32)
    predicted = np.asarray(strategy.predict(state_asked, enc)[0])
    after = JITTED[name][1](state_asked, enc, fitness)
    expected = scipy.stats.spearmanr(predicted, np.asarray(fitness)).statistic
    assert float(after.spearman) == pytest.approx(expected, abs=1e-5)
    assert np.isfinite(float(strategy.metrics(after)["spearman_mean"]))


def test_predictor_gp_surrogate_is_the_gaussian_process_posterior_of_the_standardised_archive(table):
    """surrogate=gp: predictions are jaxnas.strategies.gp's posterior given the told rows, standardised; the
    fitted hyper-parameters moved from their start."""
    from jaxnas.strategies import gp
    from jaxnas.strategies.base import one_hot_choices

    strategy = STRATEGIES["predictor_gp"]
    state, _ = run("predictor_gp", table, jax.random.key(4), 3)  # 24 told: past initial, so fitted
    told = int(state.told)
    fitness = np.asarray(state.fitness)[:told]
    target = (fitness - fitness.mean()) / (fitness.std() + 1e-6)
    query = SPACE.sample(jax.random.key(5), 7)
    mean, cov = gp.posterior(state.params, one_hot_choices(SPACE, state.archive[:told]), jnp.asarray(target),
                             jnp.ones(told, bool), one_hot_choices(SPACE, query))
    got_mean, got_std = strategy.predict(state, query)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_std, np.sqrt(np.maximum(np.diag(cov), 0)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(state.params.log_lengthscale), np.log(2.0))
    with pytest.raises(ValueError, match="surrogate must be mlp or gp, got 'rf'"):
        PredictorGuided(SPACE, surrogate="rf")


def test_bad_hyper_parameters_are_rejected_with_the_name():
    with pytest.raises(ValueError, match="sample_size"):
        RegularizedEvolution(SPACE, population_size=3, sample_size=5)
    with pytest.raises(ValueError, match="elites"):
        GeneticAlgorithm(SPACE, population_size=4, elites=4)
    with pytest.raises(ValueError, match=r"fitness must have shape \[4, 2\]"):
        strategy = NSGA2(SPACE, n_objectives=2, population_size=4)
        strategy.tell(strategy.init(jax.random.key(0)), jnp.zeros((4, 6), jnp.int32), jnp.zeros(4))


def test_benchmark_quick_runs_and_prints_its_table(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "strategies.py"
    spec = importlib.util.spec_from_file_location("benchmark_strategies", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--only", "random", "RE (published)", "TPE (Optuna)"])
    out = capsys.readouterr().out
    for name in ("random", "RE (published)", "TPE (Optuna)", "oracle", "50 queries"):
        assert name in out
    assert set(results) == {"random", "RE (published)", "TPE (Optuna)"}
    assert all(values[50].shape == (3,) and (values[50] <= 90.53 + 1e-3).all() for values in results.values())
