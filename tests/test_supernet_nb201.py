"""NAS-Bench-201 supernet: exact standalone twins, analytic sizes against NB201's published numbers, and vmapped
population evaluation / training with it (jaxnas.population).

Sizes are tiny (8x8x3 random images, C = 4, N = 2 cells per stage: N > 1 so the stacked cells and the twin's
per-cell slicing are exercised) and every compiled program is built once for the whole file and reused with
one population shape: compiling the supernet, above all its vmapped gradient, is nearly all of the run time.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnas import population as pop
from jaxnas.spaces import macro_space, nb201_space
from jaxnas.spaces.nb201 import OPS
from jaxnas.supernet import NB201Supernet

SPACE = nb201_space()
IMAGE, CLASSES, BATCH = (8, 8, 3), 10, 16
SUPERNET = NB201Supernet(SPACE, IMAGE, CLASSES, channels=4, cells=2)
CELLS = {
    "all_none": "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "all_skip": "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|",
    "all_conv3x3": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "all_pool": "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    # every op once, a 1x1 conv on a path that never reaches the output (node 1 feeds only none edges)
    "mixed": "|nor_conv_1x1~0|+|skip_connect~0|none~1|+|nor_conv_3x3~0|none~1|avg_pool_3x3~2|",
    "mixed_2": "|nor_conv_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
}
ENCS = np.stack([SPACE.from_string(text) for text in CELLS.values()])


@functools.cache
def _programs():
    """The compiled programs every test shares: population recalibration and eval-mode logits with given
    statistics, both vmapped over encodings (leaves of the statistics [P, ...])."""
    recalibrate = jax.jit(jax.vmap(SUPERNET.recalibrate_bn, in_axes=(None, 0, None)))

    def logits(params, enc, x, stats):
        return SUPERNET.apply(params, enc, x, train=False, bn_stats=stats)

    return recalibrate, jax.jit(jax.vmap(logits, in_axes=(None, 0, None, 0)))


@pytest.fixture(scope="module")
def setup():
    params = SUPERNET.init(jax.random.key(0))
    # Every leaf randomised on the host (no extra compile), so BatchNorm scales / biases are not 1 / 0.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.float32(np.asarray(a) + 0.3 * rng.standard_normal(a.shape)), params)
    x = jax.random.normal(jax.random.key(2), (BATCH, *IMAGE))
    # Recalibration data other than x, so given statistics differ from x's own batch statistics.
    calibration = jax.random.normal(jax.random.key(3), (1, BATCH, *IMAGE)) * 2.0 + 0.5
    stats = _programs()[0](params, ENCS, calibration)
    return params, x, stats


def _row(tree, p):
    return jax.tree.map(lambda a: a[p], tree)


def test_twin_logits_equal_masked_supernet_for_every_op(setup):
    params, x, stats = setup
    masked = _programs()[1](params, ENCS, x, stats)
    chex.assert_shape(masked, (len(ENCS), BATCH, CLASSES))
    for p, (name, enc) in enumerate(zip(CELLS, ENCS, strict=True)):
        twin_params, twin = SUPERNET.extract(params, enc, _row(stats, p))
        chex.assert_trees_all_close(twin(x), masked[p], atol=1e-5, rtol=1e-5, custom_message=name)
        assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == SUPERNET.param_count(enc), name
    # The all-none cell zeroes every stage's cell output, so every image gets the same logits.
    all_none = masked[list(CELLS).index("all_none")]
    np.testing.assert_allclose(all_none, np.broadcast_to(all_none[:1], all_none.shape), atol=1e-6)
    assert float(jnp.std(masked[list(CELLS).index("mixed")], 0).mean()) > 1e-3


def test_twin_holds_weights_only_for_conv_edges(setup):
    params, _, stats = setup
    p = list(CELLS).index("mixed")
    twin_params, twin = SUPERNET.extract(params, ENCS[p], _row(stats, p))
    cell = twin_params["blocks"][0]  # the first cell: conv 1x1 on edge 1<-0, conv 3x3 on edge 3<-0
    kernels = [cell["convs"][n]["conv"]["kernel"] for n in (0, 1)]
    chex.assert_shape(kernels, [(1, 1, 4, 4), (3, 3, 4, 4)])
    assert len(cell["convs"]) == 2 and twin.blocks[0].conv_edges == (0, 3)
    p = list(CELLS).index("all_pool")
    no_convs, _ = SUPERNET.extract(params, ENCS[p], _row(stats, p))
    assert set(no_convs["blocks"]) == {2, 5}  # only the two reductions; the 3 x 2 cells hold no parameters


def test_ops_an_edge_did_not_choose_do_not_reach_the_output(setup):
    params, x, stats = setup
    p = list(CELLS).index("mixed")
    enc = ENCS[p]
    poisoned = jax.tree.map(lambda a: a, params)
    for s in range(3):
        for e, op in enumerate(OPS[i] for i in enc):
            for conv in ("nor_conv_1x1", "nor_conv_3x3"):
                if conv != op:
                    kernel = params["cells"][s][e][conv]["kernel"]
                    poisoned["cells"][s][e][conv] = {"kernel": jnp.full_like(kernel, jnp.nan)}
    # The whole population's shape reuses the compiled program; only row p's cell matches the poisoning.
    clean = _programs()[1](params, ENCS, x, stats)[p]
    assert np.array_equal(np.asarray(_programs()[1](poisoned, ENCS, x, stats)[p]), np.asarray(clean))


def test_avg_pool_ignores_padding_as_nas_bench_201():
    from jaxnas.supernet.nb201 import _avg_pool_3x3

    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    pooled = np.asarray(_avg_pool_3x3(x))[0, :, :, 0]
    assert pooled[0, 0] == np.mean([0, 1, 4, 5])  # corner: 4 real positions, not 9
    assert pooled[1, 1] == np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10])


def test_param_count_and_macs_match_nas_bench_201_at_its_own_size():
    # CIFAR-10 size: C = 16, N = 5. NAS-Bench-201 reports 0.073306 M parameters and 7.78 M FLOPs (multiply-adds)
    # for cells without convolutions, and 1.531546 M parameters for the all-3x3 cell, whose 6 x 5 conv edges per
    # stage carry affine BatchNorms there (2 * c parameters each; ours are affine-free).
    nb201 = NB201Supernet(SPACE, (32, 32, 3), 10)
    smallest = nb201.smallest(ENCS[0])
    assert SPACE.to_string(smallest) == CELLS["all_skip"]
    assert nb201.param_count(smallest) == 73_306 == nb201.param_count(SPACE.from_string(CELLS["all_pool"]))
    assert nb201.macs(smallest) == 7_783_040
    largest = nb201.largest(ENCS[0])
    assert SPACE.to_string(largest) == CELLS["all_conv3x3"]
    assert nb201.param_count(largest) == 1_531_546 - 6 * 5 * 2 * (16 + 32 + 64)
    # By hand, one extra edge: a 1x1 conv adds c^2 parameters and positions * c^2 MACs per cell.
    one_conv = SPACE.from_string("|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    assert nb201.param_count(one_conv) - 73_306 == 5 * (16**2 + 32**2 + 64**2)
    assert nb201.macs(one_conv) - 7_783_040 == 5 * (1024 * 16**2 + 256 * 32**2 + 64 * 64**2)


def test_sandwich_sampler_draws_the_largest_and_smallest_cells():
    sampler = pop.SubnetSampler(SPACE, 4, "sandwich", SUPERNET.largest, SUPERNET.smallest)
    encs = np.asarray(sampler(jax.random.key(0)))
    chex.assert_shape(encs, (4, 6))
    assert SPACE.to_string(encs[0]) == CELLS["all_conv3x3"] and SPACE.to_string(encs[1]) == CELLS["all_skip"]
    assert SUPERNET.param_count(encs[0]) >= max(SUPERNET.param_count(e) for e in encs)


# ------------------------------------------------------------------------------------------------ errors
def test_wrong_space_image_shape_and_missing_statistics_raise_clear_errors(setup):
    params, x, _ = setup
    with pytest.raises(ValueError, match="nb201_space"):
        NB201Supernet(macro_space(families=("cnn",)), IMAGE, CLASSES)
    with pytest.raises(ValueError, match="multiples of 4"):
        NB201Supernet(SPACE, (30, 30, 3), CLASSES)
    with pytest.raises(ValueError, match=r"image_shape=\(4, 4, 3\)"):
        SUPERNET.apply(params, ENCS[0], jnp.ones((2, 4, 4, 3)), train=False)
    with pytest.raises(ValueError, match=r"int32 \[6\]"):
        SUPERNET.apply(params, ENCS, x, train=False)
    with pytest.raises(ValueError, match="recalibrate_bn"):
        SUPERNET.extract(params, ENCS[0])
    with pytest.raises(ValueError, match="holds index 7"):
        SUPERNET.extract(params, np.array([7, 0, 0, 0, 0, 0]), {})


# ------------------------------------------------------------------------------------------------ populations
def test_shared_weight_evaluation_equals_each_candidate_alone(setup):
    params, x, _ = setup
    y = jax.random.randint(jax.random.key(4), (BATCH,), 0, CLASSES)
    # One batch: eval-mode BatchNorm without statistics uses that batch's, which recalibrating on x reproduces.
    together = pop.evaluate_shared(SUPERNET.apply, params, ENCS, x, y, batch_size=BATCH)
    own_stats = _programs()[0](params, ENCS, x[None])
    for p, enc in enumerate(ENCS):
        _, twin = SUPERNET.extract(params, enc, _row(own_stats, p))
        logits = twin(x)
        loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
        np.testing.assert_allclose(together["loss"][p], loss, rtol=1e-5)
        np.testing.assert_allclose(together["accuracy"][p], np.mean(np.argmax(np.asarray(logits), -1) == y))


def test_population_training_gives_finite_losses_independent_of_the_other_candidates(setup):
    params, _, _ = setup
    key = jax.random.key(5)
    train_x = jax.random.normal(key, (64, *IMAGE))
    train_y = jax.random.randint(jax.random.key(6), (64,), 0, CLASSES)
    optimizer = optax.sgd(0.05, momentum=0.9)
    keys = pop.candidate_keys(jax.random.key(7), 5)

    def train(rows):
        return pop.train_population(
            SUPERNET.apply,
            pop.tile_population(params, len(rows)),
            ENCS[rows],
            optimizer,
            train_x,
            train_y,
            train_x[:32],
            train_y[:32],
            epochs=1,
            batch_size=32,
            seed=3,
            keys=keys[np.array(rows)],
        )

    first = train([5, 0, 4])  # mixed_2, all-none, mixed
    assert list(first.status) == ["ok"] * 3
    assert np.all(np.isfinite(first.train_loss)) and first.train_loss.shape == (1, 3)
    # The same candidate (and key) next to other candidates: the same shape, so no new compile.
    second = train([5, 2, 1])
    chex.assert_trees_all_close(_row(second.params, 0), _row(first.params, 0), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(second.train_loss[:, 0], first.train_loss[:, 0], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a[0] - b).max()), first.params, params)
    assert max(jax.tree.leaves(moved)) > 0
