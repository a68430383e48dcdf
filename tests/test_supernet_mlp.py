"""MLP supernet, its standalone twin, and vmapped population evaluation / training (jaxnas.population).

Sizes are tiny and the training tests share one population shape and one optimiser object, so the
epoch program compiles once per shape (P = 4 and P = 1) for the whole file.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnas import population as pop
from jaxnas.data import load_dataset
from jaxnas.spaces import macro_space
from jaxnas.supernet import MLPSupernet

IN_FEATURES, CLASSES = 64, 10  # digits: 8x8x1 images, 10 classes

# Full option lists for the twin tests (apply only); a smaller space keeps the training programs quick to compile.
TWIN_SPACE = macro_space(families=("mlp",), max_stages=3, max_depth=2, units=(8, 16), dropouts=(0.0, 0.5))
TRAIN_SPACE = macro_space(
    families=("mlp",), max_stages=2, max_depth=1, units=(8, 16), activations=("relu", "gelu"), dropouts=(0.0, 0.2)
)
OPTIMIZER = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)  # per-candidate lr: opt state


@functools.lru_cache
def _jitted_apply(supernet):
    """One compiled apply per supernet for the whole file (a fresh jax.jit wrapper would compile again)."""
    return jax.jit(supernet.apply, static_argnames="train")


@jax.jit
def _perturbed(params, key):
    """Supernet params with every leaf randomised, so LayerNorm scales / biases are not the trivial 1 / 0."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def twin_setup():
    supernet = MLPSupernet(TWIN_SPACE, IN_FEATURES, CLASSES)
    params = _perturbed(supernet.init(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (16, 8, 8, 1))
    return supernet, params, x


def _twin_encodings():
    """Hand-picked corner cases (depth-0 stages, norm + skip on, every activation) plus random samples."""
    s = TWIN_SPACE

    def stage(k, depth, units, act, norm, skip):
        p = f"stage{k}."
        return {p + "depth": depth, p + "units": units, p + "activation": act, p + "norm": norm, p + "skip": skip}

    hand = [
        {"family": "mlp", **stage(1, 1, 8, "relu", False, False), "stage2.depth": 0, "dropout": 0.5},
        {"family": "mlp", **stage(1, 2, 16, "gelu", True, True), "stage2.depth": 0, "dropout": 0.0},
        {
            "family": "mlp",
            **stage(1, 2, 8, "elu", True, True),
            **stage(2, 2, 16, "silu", True, True),
            **stage(3, 1, 8, "leaky_relu", False, True),
            "dropout": 0.0,
        },
        {
            "family": "mlp",
            **stage(1, 1, 16, "silu", False, True),
            **stage(2, 2, 8, "relu", True, False),
            "stage3.depth": 0,
            "dropout": 0.5,
        },
    ]
    return [s.encode(a) for a in hand] + list(np.asarray(s.sample(jax.random.key(3), 3)))


@pytest.mark.parametrize("i", range(7))
def test_twin_logits_equal_masked_supernet_logits(twin_setup, i):
    supernet, params, x = twin_setup
    enc = _twin_encodings()[i]
    masked = _jitted_apply(supernet)(params, enc, x, train=False, key=None)
    _, twin = supernet.extract(params, enc)
    chex.assert_shape(masked, (16, CLASSES))
    chex.assert_trees_all_close(twin(x), masked, atol=1e-5, rtol=1e-5)


def test_twin_param_count_equals_analytic_count(twin_setup):
    supernet, params, _ = twin_setup
    for enc in _twin_encodings():
        twin_params, _ = supernet.extract(params, enc)
        assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == supernet.param_count(enc)


def test_param_count_and_macs_by_hand():
    supernet = MLPSupernet(TWIN_SPACE, IN_FEATURES, CLASSES)
    enc = TWIN_SPACE.from_string("mlp|s1:d2,w16,relu,bn,skip|s2:d1,w8,gelu|drop0.0")
    # dense 64->16, 16->16 (both with LayerNorm), 16->8, head 8->10
    assert supernet.macs(enc) == 64 * 16 + 16 * 16 + 16 * 8 + 8 * 10
    assert supernet.param_count(enc) == (64 * 16 + 16 + 32) + (16 * 16 + 16 + 32) + (16 * 8 + 8) + (8 * 10 + 10)


def test_inactive_blocks_are_exactly_the_identity(twin_setup):
    supernet, params, x = twin_setup
    enc = TWIN_SPACE.from_string("mlp|s1:d1,w8,relu,bn,skip|s2:d1,w16,gelu,skip|drop0.0")
    # Blocks 2 of stages 1 and 2 and all of stage 3 are inactive: NaN weights there must not reach the output.
    poisoned = jax.tree.map(lambda a: a, params)
    for k, j in [(0, 1), (1, 1), (2, 0), (2, 1)]:
        poisoned["stages"][k][j] = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params["stages"][k][j])
    apply = _jitted_apply(supernet)
    clean = apply(params, enc, x, train=False, key=None)
    assert np.array_equal(np.asarray(apply(poisoned, enc, x, train=False, key=None)), np.asarray(clean))


def test_masked_units_are_exact_zeros_so_weights_beyond_the_width_change_nothing(twin_setup):
    supernet, params, x = twin_setup
    enc = TWIN_SPACE.from_string("mlp|s1:d2,w8,elu,bn,skip|drop0.0")  # width 8 of 16
    changed = jax.tree.map(lambda a: a, params)
    changed["head"] = {"kernel": params["head"]["kernel"].at[8:].set(1e6), "bias": params["head"]["bias"]}
    block = params["stages"][0][1]["dense"]
    changed["stages"][0][1]["dense"] = {"kernel": block["kernel"].at[8:].set(-1e6), "bias": block["bias"]}
    apply = _jitted_apply(supernet)
    clean = apply(params, enc, x, train=False, key=None)
    assert np.array_equal(np.asarray(apply(changed, enc, x, train=False, key=None)), np.asarray(clean))


def test_apply_rejects_inputs_of_the_wrong_size(twin_setup):
    supernet, params, _ = twin_setup
    with pytest.raises(ValueError, match="in_features=64"):
        supernet.apply(params, _twin_encodings()[0], jnp.ones((2, 5, 5, 1)), train=False, key=None)


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.train.images[:256], ds.train.labels[:256], ds.validation.images[:96], ds.validation.labels[:96]


def test_shared_weight_evaluation_equals_each_candidate_alone(twin_setup, digits):
    supernet, params, _ = twin_setup
    _, _, x, y = digits
    encs = np.stack(_twin_encodings()[:5])
    together = pop.evaluate_shared(supernet.apply, params, encs, x, y, batch_size=40)  # 96 = 2 * 40 + 16
    chex.assert_shape([together["loss"], together["accuracy"]], [(5,), (5,)])
    apply = _jitted_apply(supernet)
    for p, enc in enumerate(encs):
        logits = apply(params, enc, x, train=False, key=None)
        accuracy = np.mean(np.argmax(np.asarray(logits), -1) == y)
        loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
        np.testing.assert_allclose(together["accuracy"][p], accuracy, atol=1e-6)
        np.testing.assert_allclose(together["loss"][p], loss, rtol=1e-5)


def test_predict_and_report_of_one_chosen_candidate(twin_setup, digits):
    supernet, params, _ = twin_setup
    _, _, x, y = digits
    enc = _twin_encodings()[2]
    logits = pop.predict(supernet.apply, params, enc, x, batch_size=40)
    chex.assert_trees_all_close(logits, _jitted_apply(supernet)(params, enc, x, train=False, key=None), atol=1e-6)
    report = pop.classification_report(logits, y, CLASSES)
    chex.assert_shape([report["f1"], report["confusion"]], [(CLASSES,), (CLASSES, CLASSES)])
    assert int(report["confusion"].sum()) == len(y)
    accuracy = pop.evaluate_shared(supernet.apply, params, enc[None], x, y)["accuracy"][0]
    np.testing.assert_allclose(np.trace(np.asarray(report["confusion"])) / len(y), accuracy, atol=1e-6)


def test_classification_report_by_hand():
    report = pop.classification_report(jnp.array([0, 0, 1, 2, 2, 2]), jnp.array([0, 1, 1, 2, 2, 0]), 3)
    np.testing.assert_array_equal(report["confusion"], [[1, 0, 1], [1, 1, 0], [0, 0, 2]])
    np.testing.assert_allclose(report["precision"], [1 / 2, 1, 2 / 3])
    np.testing.assert_allclose(report["recall"], [1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(report["f1"], [1 / 2, 2 / 3, 4 / 5])
    np.testing.assert_allclose(report["macro_f1"], (1 / 2 + 2 / 3 + 4 / 5) / 3)
    logits = jax.nn.one_hot(jnp.array([0, 0, 1, 2, 2, 2]), 3)
    np.testing.assert_array_equal(
        pop.classification_report(logits, jnp.array([0, 1, 1, 2, 2, 0]), 3)["confusion"], report["confusion"]
    )


# ------------------------------------------------------------------------------------------------ training
P = 4


@pytest.fixture(scope="module")
def train_setup(digits):
    supernet = MLPSupernet(TRAIN_SPACE, IN_FEATURES, CLASSES)
    encs = TRAIN_SPACE.sample(jax.random.key(7), P)
    params = pop.init_population(supernet.init, jax.random.key(8), P)
    keys = pop.candidate_keys(jax.random.key(9), P)
    return supernet, encs, params, keys


def _train(
    train_setup, digits, *, params=None, encs=None, keys=None, opt_state=None, epochs=2, val=None, patience=None,
    monitor="accuracy",
):
    supernet, encs0, params0, keys0 = train_setup
    tx, ty, vx, vy = digits
    vx, vy = val or (vx, vy)
    return pop.train_population(
        supernet.apply,
        params0 if params is None else params,
        encs0 if encs is None else encs,
        OPTIMIZER,
        tx,
        ty,
        vx,
        vy,
        epochs=epochs,
        batch_size=64,
        seed=3,
        patience=patience,
        keys=keys0 if keys is None else keys,
        opt_state=opt_state,
        monitor=monitor,
    )


@pytest.fixture(scope="module")
def trained(train_setup, digits):
    return _train(train_setup, digits)


def _row(tree, p):
    return jax.tree.map(lambda a: a[p : p + 1], tree)


def test_population_training_equals_training_each_candidate_alone(train_setup, digits, trained):
    _, encs, params, keys = train_setup
    assert list(trained.status) == ["ok"] * P
    chex.assert_shape([trained.history, trained.train_loss], [(2, P), (2, P)])
    for p in range(P):
        alone = _train(train_setup, digits, params=_row(params, p), encs=encs[p : p + 1], keys=keys[p : p + 1])
        chex.assert_trees_all_close(alone.params, _row(trained.params, p), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(alone.history[:, 0], trained.history[:, p], atol=1e-6)
    assert (trained.train_loss[-1] < trained.train_loss[0]).all()  # and they did learn


def test_diverging_candidate_is_marked_failed_and_the_others_are_unaffected(train_setup, digits, trained):
    _, _, params, _ = train_setup
    opt_state = jax.vmap(OPTIMIZER.init)(params)
    opt_state.hyperparams["learning_rate"] = opt_state.hyperparams["learning_rate"].at[1].set(1e30)
    result = _train(train_setup, digits, opt_state=opt_state)
    assert list(result.status) == ["ok", "failed", "ok", "ok"]
    # Frozen at its last finite weights (the weights after the huge first step), never NaN.
    assert all(np.isfinite(np.asarray(leaf[1])).all() for leaf in jax.tree.leaves(result.params))
    for p in (0, 2, 3):
        chex.assert_trees_all_close(_row(result.params, p), _row(trained.params, p), atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(result.history[:, p], trained.history[:, p])


def test_candidate_with_nan_weights_is_failed_and_keeps_its_weights(train_setup, digits, trained):
    _, _, params, _ = train_setup
    poisoned = jax.tree.map(lambda a: a.at[2].set(jnp.nan), params)
    result = _train(train_setup, digits, params=poisoned)
    assert list(result.status) == ["ok", "ok", "failed", "ok"]
    chex.assert_trees_all_equal(_row(result.params, 2), _row(poisoned, 2))
    chex.assert_trees_all_close(_row(result.params, 0), _row(trained.params, 0), atol=1e-6, rtol=1e-6)


def test_early_stopping_freezes_a_candidate_at_its_stop_epoch(train_setup, digits):
    tx, _, vx, _ = digits
    # Random validation labels: accuracy wanders, so candidates stop early.
    noise = (vx, np.random.default_rng(0).integers(0, CLASSES, len(vx)).astype(np.int32))
    result = _train(train_setup, digits, epochs=5, val=noise, patience=1)
    stopped = np.flatnonzero(result.status == "early_stopped")
    assert len(stopped), f"no candidate stopped early: history {result.history}"
    for p in stopped:
        stop_epoch = result.best_epoch[p] + 1  # patience 1: the first epoch without improvement
        shorter = _train(train_setup, digits, epochs=int(stop_epoch) + 1, val=noise, patience=1)
        chex.assert_trees_all_equal(_row(result.params, p), _row(shorter.params, p))


def test_monitoring_the_validation_loss_changes_the_history_not_the_training(train_setup, digits, trained):
    """monitor="loss" (what language-model runs use): the history is the negated validation loss after each epoch
    and the best epoch its argmax; without patience the weights are those of the default run."""
    supernet, encs, _, _ = train_setup
    _, _, vx, vy = digits
    result = _train(train_setup, digits, monitor="loss")
    chex.assert_trees_all_equal(result.params, trained.params)
    after = pop.evaluate_population(supernet.apply, result.params, encs, vx, vy)
    np.testing.assert_allclose(result.history[-1], -np.asarray(after["loss"]), rtol=1e-5)
    np.testing.assert_array_equal(result.best_epoch, np.argmax(result.history, axis=0))
    assert np.all(result.history < 0)
    with pytest.raises(ValueError, match="monitor must be 'accuracy' or 'loss'"):
        _train(train_setup, digits, monitor="ppl")


def test_warm_start_tiles_supernet_weights(train_setup):
    supernet, *_ = train_setup
    weights = supernet.init(jax.random.key(0))
    tiled = pop.tile_population(weights, 3)
    chex.assert_trees_all_equal(_row(tiled, 2), jax.tree.map(lambda a: a[None], weights))


def test_train_population_rejects_mismatched_population_axes(train_setup, digits):
    supernet, encs, params, _ = train_setup
    with pytest.raises(ValueError, match="population axis P = 3"):
        pop.train_population(supernet.apply, params, encs[:3], OPTIMIZER, *digits, epochs=1, batch_size=64)


# ------------------------------------------------------------------------------------------------ devices
def test_sharded_population_equals_unsharded_with_padding(train_setup, digits, trained):
    supernet, encs, params, keys = train_setup
    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("population",))  # explicit axes by default: shard_population handles them
    # P = 3 on 4 devices: padded with a copy of the last candidate, which is then ignored.
    (s_encs, s_params, s_keys), n = pop.shard_population((encs[:3], _row3(params), keys[:3]), mesh)
    assert n == 3 and s_encs.shape[0] == 4 and len(s_encs.sharding.device_set) == 4
    _, _, vx, vy = digits
    np.testing.assert_allclose(
        pop.evaluate_population(supernet.apply, s_params, s_encs, vx, vy)["loss"][:n],
        pop.evaluate_population(supernet.apply, params, encs, vx, vy)["loss"][:n],
        rtol=1e-6,
    )
    result = _train(train_setup, digits, params=s_params, encs=s_encs, keys=s_keys)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[:n], result.params), _row3(trained.params), atol=1e-6)
    np.testing.assert_allclose(result.history[:, :n], trained.history[:, :n], atol=1e-6)
    assert pop.population_mesh().devices.size == 4


def _row3(tree):
    return jax.tree.map(lambda a: a[:3], tree)


# ------------------------------------------------------------------------------------------------ supernet
def test_sandwich_sampler_draws_largest_smallest_and_valid_random_subnets(train_setup):
    supernet, *_ = train_setup
    sampler = pop.SubnetSampler(TRAIN_SPACE, 4, "sandwich", supernet.largest, supernet.smallest)
    encs = np.asarray(sampler(jax.random.key(0)))
    assert np.asarray(TRAIN_SPACE.is_valid(encs)).all()
    assert supernet.param_count(encs[0]) == max(supernet.param_count(e) for e in encs)
    largest, smallest = TRAIN_SPACE.to_string(encs[0]), TRAIN_SPACE.to_string(encs[1])
    assert largest.startswith("mlp|s1:d1,w16,") and "|s2:d1,w16," in largest
    assert smallest.startswith("mlp|s1:d1,w8,") and "|s2:" not in smallest


def test_supernet_training_improves_both_ends_of_the_sandwich(train_setup, digits):
    supernet, encs, _, _ = train_setup
    tx, ty, vx, vy = digits
    sampler = pop.SubnetSampler(TRAIN_SPACE, 3, "sandwich", supernet.largest, supernet.smallest)
    params = supernet.init(jax.random.key(0))
    ends = jnp.concatenate([supernet.largest(encs[:1]), supernet.smallest(encs[:1])])
    before = pop.evaluate_shared(supernet.apply, params, ends, vx, vy)["loss"]
    trained, _, losses = pop.train_supernet(
        supernet.apply, params, optax.adam(1e-2), sampler, tx, ty, epochs=3, batch_size=64, seed=0
    )
    chex.assert_shape(losses, (3, 4, 3))
    after = pop.evaluate_shared(supernet.apply, trained, ends, vx, vy)["loss"]
    assert (np.asarray(after) < np.asarray(before) - 0.3).all(), (before, after)


def test_shift_augmentation_translates_each_image_by_at_most_shift_pixels():
    images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
    shifted = np.asarray(pop.shifted(jax.random.key(1), images, 2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i in range(16):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[i, dy : dy + 8, dx : dx + 8], shifted[i])]
        assert found, f"image {i} is not a translation of its input by at most 2 pixels"
        offsets.add(found[0])
    assert len(offsets) > 1  # each image draws its own offset


def test_augmented_population_training_equals_each_candidate_alone(train_setup, digits):
    supernet, encs, params, keys = train_setup
    tx, ty, vx, vy = digits
    images = (tx.reshape(-1, 8, 8, 1), vx.reshape(-1, 8, 8, 1)) if tx.ndim == 2 else (tx, vx)

    def run(p, e, k):
        return pop.train_population(supernet.apply, p, e, OPTIMIZER, images[0], ty, images[1], vy, epochs=1,
                                    batch_size=32, keys=k, shift=1)

    together = run(params, encs, keys)
    alone = run(_row(params, 2), encs[2:3], keys[2:3])
    chex.assert_trees_all_close(alone.params, _row(together.params, 2), atol=1e-5, rtol=1e-5)
    plain = pop.train_population(supernet.apply, params, encs, OPTIMIZER, images[0], ty, images[1], vy, epochs=1,
                                 batch_size=32, keys=keys)
    assert not np.allclose(np.asarray(jax.tree.leaves(plain.params)[0]), np.asarray(jax.tree.leaves(together.params)[0]))
