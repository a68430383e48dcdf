"""Bayesian optimisation (search.strategy=bo): the Gaussian process and expected improvement against closed forms,
the Kriging-believer batch, the search against random search on a synthetic function, the ask / tell protocol, and
a table-mode run that resumes exactly."""

import csv
import json
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import yaml

from jaxnas.search.__main__ import main
from jaxnas.spaces import Choice, Space, is_in, macro_space, nb201_space
from jaxnas.strategies import BayesianOptimization, RandomSearch, gp
from jaxnas.strategies.base import one_hot_choices
from jaxnas.strategies.bo import normal_scores
from jaxnas.tables import Table

SPACE = nb201_space()
TINY = Space("tiny", [Choice("family", ["a", "b"]), Choice("depth", [1, 2, 3]),
                      Choice("kernel", [3, 5], active_if=is_in("family", "b"))])
TABLE_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "nb201_table.yaml")
# One instance: jit caches on the bound methods, so each compiles once for the whole module.
BO = BayesianOptimization(SPACE, batch_size=4, initial=8, candidates=64, fit_steps=5, capacity=48)
ASK, TELL = jax.jit(BO.ask), jax.jit(BO.tell)


@pytest.fixture(scope="module")
def table():
    return Table.load("nb201_analog", SPACE)


def numpy_kernel(a, b, active_a, active_b, lengthscale, signal):
    """float64 [A, B]: the documented kernel by its definition, choice by choice."""
    d = np.where(active_a[:, None] & active_b[None, :], a[:, None] != b[None, :],
                 0.5 * (active_a[:, None] != active_b[None, :]))  # [A, B, n_choices]
    return signal * np.exp(-(d / lengthscale).sum(-1))


def test_gp_posterior_and_likelihood_match_the_closed_form_with_inactive_choices_and_masked_rows():
    train = np.array([[0, 0, 0], [1, 2, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1], [1, 2, 0]], np.int32)
    mask = np.array([True, True, True, True, False, False])  # the last two rows are empty archive slots
    y = np.array([0.3, -1.2, 0.8, 0.1, 7.0, -5.0])
    query = np.array([[1, 2, 0], [0, 2, 0], [1, 1, 1]], np.int32)
    lengthscale, signal, noise = np.array([0.7, 1.5, 3.0]), 1.3, 0.05
    params = gp.GPParams(jnp.log(jnp.asarray(lengthscale, jnp.float32)), jnp.log(jnp.float32(signal)),
                         jnp.log(jnp.float32(noise)))
    x, q = one_hot_choices(TINY, train), one_hot_choices(TINY, query)
    mean, cov = gp.posterior(params, x, jnp.asarray(y, jnp.float32), jnp.asarray(mask), q)

    act_t, act_q = np.asarray(TINY.active_mask(train))[mask], np.asarray(TINY.active_mask(query))
    t, yt = train[mask], y[mask]
    k = numpy_kernel(t, t, act_t, act_t, lengthscale, signal) + noise * np.eye(len(t))
    kq = numpy_kernel(query, t, act_q, act_t, lengthscale, signal)
    kqq = numpy_kernel(query, query, act_q, act_q, lengthscale, signal)
    np.testing.assert_allclose(np.asarray(mean), kq @ np.linalg.solve(k, yt), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cov), kqq - kq @ np.linalg.solve(k, kq.T), rtol=1e-4, atol=1e-6)
    # Query rows 0 and 1 differ in family, and kernel is active in row 0 only: half a mismatch.
    assert float(gp.covariance(params, q[:1], q[1:2])[0, 0]) == pytest.approx(
        signal * math.exp(-1 / 0.7 - 0.5 / 3.0), rel=1e-5)

    nll = gp.negative_log_likelihood(params, x, jnp.asarray(y, jnp.float32), jnp.asarray(mask))
    expected = -scipy.stats.multivariate_normal(np.zeros(len(t)), k).logpdf(yt)
    assert float(nll) == pytest.approx(expected, rel=1e-5)

    # The closed-form gradient (custom VJP through K) against central differences of the float64 likelihood.
    def numpy_nll(theta):
        ls, s, n = np.exp(theta[:3]), np.exp(theta[3]), np.exp(theta[4])
        kk = numpy_kernel(t, t, act_t, act_t, ls, s) + n * np.eye(len(t))
        return -scipy.stats.multivariate_normal(np.zeros(len(t)), kk).logpdf(yt)

    theta = np.concatenate([np.log(lengthscale), [math.log(signal), math.log(noise)]])
    numeric = [(numpy_nll(theta + h) - numpy_nll(theta - h)) / 2e-5 for h in 1e-5 * np.eye(5)]
    grad = jax.grad(gp.negative_log_likelihood)(params, x, jnp.asarray(y, jnp.float32), jnp.asarray(mask))
    got = np.concatenate([np.asarray(grad.log_lengthscale), [float(grad.log_signal), float(grad.log_noise)]])
    np.testing.assert_allclose(got, numeric, rtol=1e-3, atol=1e-4)


def test_gp_fit_raises_the_marginal_likelihood_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    enc = np.asarray(SPACE.sample(jax.random.key(0), 40))
    y = jnp.asarray((enc == 3).sum(-1) + 0.1 * rng.normal(size=40), jnp.float32)  # counts of one op, a little noise
    x, mask = one_hot_choices(SPACE, enc), jnp.ones(40, bool)
    start = gp.init_params(SPACE.n_choices)
    fitted = jax.jit(gp.fit, static_argnums=(4, 5))(start, x, (y - y.mean()) / y.std(), mask, 50, 0.1)
    before = gp.negative_log_likelihood(start, x, (y - y.mean()) / y.std(), mask)
    after = gp.negative_log_likelihood(fitted, x, (y - y.mean()) / y.std(), mask)
    assert float(after) < float(before) - 5
    chex.assert_trees_all_equal(gp.project(fitted), fitted)


@pytest.mark.parametrize(("mean", "std", "best"), [(1.0, 0.5, 0.2), (0.0, 1.0, 0.0), (-1.0, 0.3, 0.5),
                                                   (2.0, 2.0, 1.0), (-3.0, 0.5, 0.0), (0.4, 0.1, 1.2)])
def test_expected_improvement_equals_the_closed_form(mean, std, best):
    z = (mean - best) / std
    expected = (mean - best) * scipy.stats.norm.cdf(z) + std * scipy.stats.norm.pdf(z)
    got = math.exp(float(gp.log_expected_improvement(jnp.float32(mean), jnp.float32(std), jnp.float32(best))))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("z", [-8.0, -19.0, -25.0, -35.0])
def test_log_expected_improvement_stays_accurate_far_below_the_incumbent(z):
    # float64 still holds phi(z) + z Phi(z) down to z = -37; float32 EI would be 0 there (no ranking left).
    expected = math.log(scipy.stats.norm.pdf(z) + z * scipy.stats.norm.cdf(z))
    assert float(gp.log_expected_improvement(jnp.float32(z), jnp.float32(1.0), jnp.float32(0.0))) == pytest.approx(
        expected, rel=1e-5)


def test_normal_scores_are_rank_based_with_ties_failures_last_and_masked_rows_zero():
    fitness = np.array([3.0, -np.inf, 1.0, 3.0, 10.0, 2.0, 99.0], np.float32)
    mask = np.array([True, True, True, True, True, True, False])
    ranks = scipy.stats.rankdata(np.where(np.isinf(fitness), -1e30, fitness)[mask])  # average ranks of ties
    expected = scipy.stats.norm.ppf((ranks - 0.5) / mask.sum())
    got = np.asarray(normal_scores(jnp.asarray(fitness), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask], expected, rtol=1e-5)
    assert got[~mask] == 0.0 and got[1] == got[mask].min()


def test_kriging_believer_spreads_a_batch_away_from_a_perfectly_correlated_twin():
    strategy = BayesianOptimization(SPACE, batch_size=2, candidates=3)
    mean = jnp.array([1.0, 1.0, 0.9])
    cov = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # rows 0 and 1: the same architecture
    picked = strategy._pick_ei(mean, cov, jnp.ones(3, bool), jnp.float32(0.0), jnp.float32(1e-3))
    # Plain top-2 EI would ask both twins; believing the first one's mean leaves its twin nothing to improve.
    assert sorted(np.asarray(picked).tolist()) in ([0, 2], [1, 2])


def hidden_target_search(strategy, asks, seeds):
    """int [S]: per seed, the queries until the architecture equal to a hidden random target was asked (fitness:
    number of edges equal to the target; the optimum is unique), or asks * P + 1 when it never was."""

    def search(key):
        k_target, k_init, k_loop = jax.random.split(key, 3)
        target = SPACE.sample(k_target, 1)[0]

        def step(state, k):
            enc, state = strategy.ask(k, state)
            fitness = jnp.sum(enc == target, -1).astype(jnp.float32)
            return strategy.tell(state, enc, fitness), fitness

        _, fitness = jax.lax.scan(step, strategy.init(k_init), jax.random.split(k_loop, asks))
        hit = fitness.reshape(-1) == SPACE.n_choices
        return jnp.where(hit.any(), jnp.argmax(hit) + 1, hit.shape[0] + 1)

    return np.asarray(jax.jit(jax.vmap(search))(jax.vmap(jax.random.key)(jnp.arange(seeds))))


def test_bo_finds_a_hidden_target_in_fewer_queries_than_random_search():
    asks, seeds = 12, 10
    bo = BayesianOptimization(SPACE, batch_size=4, initial=8, candidates=128, fit_steps=5, capacity=32)
    bo_queries = hidden_target_search(bo, asks, seeds)
    random_queries = hidden_target_search(RandomSearch(SPACE, batch_size=4), asks, seeds)
    # Random search hits one cell of 15,625 within 48 queries with probability 0.3%; BO reads the edges off its GP
    # (median 25 queries over these seeds).
    assert np.median(random_queries) == 49
    assert np.median(bo_queries) <= 32, bo_queries


def run(table, key, asks, state=None):
    """(state, asked encodings [asks, P, n]): ``asks`` rounds of jitted ask, table lookup, jitted tell."""
    if state is None:
        key, k_init = jax.random.split(key)
        state = BO.init(k_init)
    history = []
    for _ in range(asks):
        key, k_ask = jax.random.split(key)
        enc, state = ASK(k_ask, state)
        state = TELL(state, enc, jnp.asarray(table.lookup(np.asarray(enc), "baseline_acc"), jnp.float32))
        history.append(np.asarray(enc))
    return state, np.stack(history)


def test_bo_protocol_valid_distinct_asks_array_state_deterministic_resumable_one_compile(table):
    state, history = run(table, jax.random.key(0), 6)
    assert history.shape == (6, 4, SPACE.n_choices) and history.dtype == np.int32
    assert np.asarray(SPACE.is_valid(history)).all()
    rows = history.reshape(-1, SPACE.n_choices)
    assert len(SPACE.unique(rows)) == len(rows)  # never asks a told architecture again, nor one twice
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    state_again, history_again = run(table, jax.random.key(0), 6)
    np.testing.assert_array_equal(history, history_again)
    chex.assert_trees_all_equal(state, state_again)
    saved = [np.array(leaf) for leaf in leaves]
    restored = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(leaf) for leaf in saved])
    _, continued = run(table, jax.random.key(1), 3, state=state)
    _, resumed = run(table, jax.random.key(1), 3, state=restored)
    np.testing.assert_array_equal(continued, resumed)
    assert ASK._cache_size() == 1 and TELL._cache_size() == 1
    metrics = BO.metrics(state)
    assert set(metrics) == {"spearman", "spearman_mean", "noise_share"}
    assert all(jnp.shape(v) == () for v in metrics.values()) and np.isfinite(float(metrics["spearman_mean"]))


def test_bo_logs_the_spearman_of_its_gp_mean_on_the_told_batch(table):
    state, _ = run(table, jax.random.key(3), 3)
    enc, state = ASK(jax.random.key(9), state)
    fitness = jnp.asarray(table.lookup(np.asarray(enc), "baseline_acc"), jnp.float32)
    predicted = np.asarray(jax.jit(BO.predict)(state, enc)[0])
    after = TELL(state, enc, fitness)
    assert float(after.spearman) == pytest.approx(scipy.stats.spearmanr(predicted, np.asarray(fitness)).statistic,
                                                  abs=1e-5)


def test_bo_ranks_failures_worst_and_keeps_the_best_candidates_when_full():
    strategy = BayesianOptimization(SPACE, batch_size=2, initial=2, candidates=8, fit_steps=3, capacity=4)
    tell = jax.jit(strategy.tell)
    state = strategy.init(jax.random.key(0))
    rows = [jnp.full((2, 6), i, jnp.int32).at[1, 5].set(4) for i in range(3)]
    state = tell(state, rows[0], jnp.array([5.0, jnp.nan]))
    failed = np.isneginf(np.asarray(state.fitness)) & (np.arange(4) < 2)
    y = np.asarray(normal_scores(state.fitness, jnp.arange(4) < 2))
    assert failed.sum() == 1 and y[failed][0] < y[~failed][0]  # a failure is fitted, as the worst
    state = tell(state, rows[1], jnp.array([1.0, 7.0]))
    state = tell(state, rows[2], jnp.array([6.0, 2.0]))
    # Six told into four rows: the failed one and then the worst (1.0) made room.
    np.testing.assert_array_equal(np.asarray(state.fitness), [7.0, 6.0, 5.0, 2.0])
    state = tell(state, jnp.array([[4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 4, 0]], jnp.int32), jnp.array([-jnp.inf, 3.0]))
    np.testing.assert_array_equal(np.asarray(state.fitness), [7.0, 6.0, 5.0, 3.0])
    assert int(state.told) == 8
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.gp))


def test_bo_with_thompson_sampling_on_a_space_with_rules_and_failures_asks_valid_new_encodings():
    # The proposals (mutants, samples) are those of EI too; the NB201 protocol test covers EI's picks.
    space = macro_space(max_stages=2, channels=(16, 32), units=(64, 128))
    strategy = BayesianOptimization(space, batch_size=3, initial=6, candidates=24, fit_steps=3, capacity=24,
                                    acquisition="thompson")
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    state, key, told = strategy.init(jax.random.key(0)), jax.random.key(1), set()
    for step in range(6):
        enc, state = ask(jax.random.fold_in(key, step), state)
        assert np.asarray(space.is_valid(enc)).all()
        rows = {tuple(r) for r in np.asarray(enc)}
        assert len(rows) == 3 and not rows & told
        told |= rows
        fitness = jax.random.normal(jax.random.fold_in(key, 100 + step), (3,))
        state = tell(state, enc, fitness.at[0].set(jnp.nan))  # a failed candidate per batch
    assert np.isfinite(float(strategy.metrics(state)["noise_share"]))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"initial": 1}, "initial"), ({"candidates": 2, "batch_size": 4}, "candidates"),
     ({"random_fraction": 1.5}, "random_fraction"), ({"learning_rate": 0.0}, "learning_rate"),
     ({"acquisition": "ucb"}, "acquisition"), ({"capacity": 4}, "capacity"), ({"fit_steps": 0}, "fit_steps")],
)
def test_bad_hyper_parameters_are_rejected_with_the_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        BayesianOptimization(SPACE, **kwargs)


def _outputs(out: Path) -> dict:
    return {name: (out / name).read_text() for name in ("history.csv", "generations.csv", "best.json", "pareto.json")}


def test_table_run_with_bo_spends_its_budget_and_a_resumed_run_ends_like_the_uninterrupted_one(tmp_path):
    args = ["--config", TABLE_CONFIG, "search.strategy=bo", "search.budget=24", "search.population=6",
            "progress=false"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main([*args, f"output={whole}"]) == 0
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["queries"] == 24
    # Interrupted after its second-to-last checkpoint: the last one is unreadable, the run resumes from the one
    # before and must end exactly as the run left alone.
    assert main([*args, f"output={broken}"]) == 0
    latest = max((p for p in (broken / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for f in (latest / "archive").rglob("*"):
        if f.is_file():
            f.write_text("{ not json")
    with pytest.warns(UserWarning, match=f"checkpoint step {latest.name}"):
        assert main(["--resume", str(broken)]) == 0
    assert _outputs(broken) == _outputs(whole)


def test_table_run_with_the_predictor_on_a_gp_surrogate_logs_its_rank_correlation(tmp_path):
    out = tmp_path / "gp"
    assert main(["--config", TABLE_CONFIG, "search.strategy=predictor", "search.surrogate=gp", "search.budget=30",
                 "search.population=6", "progress=false", f"output={out}"]) == 0
    assert json.loads((out / "summary.json").read_text())["queries"] == 30
    assert yaml.safe_load((out / "config.yaml").read_text())["search"]["surrogate"] == "gp"
    with open(out / "generations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # generations.csv carries the strategy's diagnostics: the surrogate's Spearman on each told batch (NaN until
    # it is fitted), and the deduplicating wrapper's counts.
    assert {"strategy_spearman", "strategy_spearman_mean", "strategy_duplicates_replaced"} <= set(rows[0])
    assert math.isnan(float(rows[0]["strategy_spearman"])) and np.isfinite(float(rows[-1]["strategy_spearman"]))
    assert -1 <= float(rows[-1]["strategy_spearman_mean"]) <= 1
