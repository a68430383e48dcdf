"""Conv supernet (cnn / resnet / mobilenet), its standalone twin, BatchNorm recalibration, both conv formulations,
and vmapped population evaluation / training with it (jaxnas.population).

Sizes are tiny (8x8 digits, two stages of at most two blocks, 4 or 8 channels) and every compiled program is
cached for the whole file, because compiling the three families dominates the run time.
"""

import functools

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnas import population as pop
from jaxnas.data import load_dataset
from jaxnas.spaces import macro_space
from jaxnas.supernet import ConvSupernet
from jaxnas.supernet.ops import conv2d, depthwise_conv2d

IMAGE, CLASSES = (8, 8, 1), 10  # digits

TWIN_SPACE = macro_space(
    families=("cnn", "resnet", "mobilenet"),
    max_stages=2,
    max_depth=2,
    channels=(4, 8),
    kernels=(3, 7),
    expansions=(1, 2),
    activations=("relu", "gelu"),
    dropouts=(0.0, 0.5),
)
# Kernels 1 / 3 keep the slices formulation (k * k slices per convolution) quick to compile for training.
TRAIN_SPACE = macro_space(
    families=("cnn",),
    max_stages=2,
    max_depth=1,
    channels=(4, 8),
    kernels=(1, 3),
    activations=("relu",),
    dropouts=(0.0, 0.2),
)
OPTIMIZER = optax.sgd(0.05, momentum=0.9)


@functools.lru_cache
def _jitted(supernet):
    """One compiled apply and recalibration per supernet for the whole file."""
    return jax.jit(supernet.apply, static_argnames="train"), jax.jit(supernet.recalibrate_bn)


@jax.jit
def _perturbed(params, key):
    """Supernet params with every leaf randomised, so BatchNorm scales / biases and conv biases are not 1 / 0
    (one flat draw: one random op per leaf would take XLA:CPU a minute to compile)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + 0.3 * jax.random.normal(key, flat.shape))


@pytest.fixture(scope="module")
def twin_setup():
    # The twin tests check masks, not the formulation (a test below proves slices == lax): lax compiles faster.
    supernet = ConvSupernet(TWIN_SPACE, IMAGE, CLASSES, formulation="lax")
    params = _perturbed(supernet.init(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (8, *IMAGE))
    batches = jax.random.normal(jax.random.key(3), (2, 16, *IMAGE))  # recalibration batches
    return supernet, params, x, batches


TWIN_ARCHS = [
    # depth-0 second stage, kernel 7, norm on, dropout (inactive in eval)
    "cnn|s1:d2,w8,k7,relu,bn,skip|drop0.5",
    "cnn|s1:d1,w4,k3,gelu|s2:d2,w8,k7,relu,bn,skip|drop0.0",
    "cnn|s1:d2,w4,k3,gelu,bn|s2:d1,w4,k3,gelu|drop0.0",
    "resnet|s1:d2,w4,k7,relu,bn|drop0.0",
    "resnet|s1:d1,w8,k3,gelu|s2:d2,w4,k7,relu,bn|drop0.5",
    "mobilenet|s1:d2,w4,k3,e2,gelu,bn|drop0.0",
    "mobilenet|s1:d1,w8,k7,e1,relu|s2:d2,w8,k3,e2,gelu,bn|drop0.0",
    "mobilenet|s1:d2,w8,k7,e2,relu,bn|s2:d1,w4,k7,e1,relu,bn|drop0.5",
]


def _recalibrated(twin_setup, enc):
    supernet, params, _, batches = twin_setup
    return _jitted(supernet)[1](params, enc, batches)


@pytest.mark.parametrize("text", TWIN_ARCHS)
def test_twin_logits_and_param_count_equal_the_masked_supernet(twin_setup, text):
    supernet, params, x, _ = twin_setup
    enc = TWIN_SPACE.from_string(text)
    stats = _recalibrated(twin_setup, enc)
    masked = _jitted(supernet)[0](params, enc, x, train=False, bn_stats=stats)
    twin_params, twin = supernet.extract(params, enc, stats)
    chex.assert_shape(masked, (8, CLASSES))
    chex.assert_trees_all_close(twin(x), masked, atol=1e-5, rtol=1e-5)
    assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == supernet.param_count(enc)


def test_random_encodings_have_exact_twins(twin_setup):
    supernet, params, x, _ = twin_setup
    for enc in np.asarray(TWIN_SPACE.sample(jax.random.key(5), 4)):
        stats = _recalibrated(twin_setup, enc)
        twin_params, twin = supernet.extract(params, enc, stats)
        masked = _jitted(supernet)[0](params, enc, x, train=False, bn_stats=stats)
        chex.assert_trees_all_close(twin(x), masked, atol=1e-5, rtol=1e-5)
        assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == supernet.param_count(enc)


def test_param_count_and_macs_by_hand():
    supernet = ConvSupernet(TWIN_SPACE, IMAGE, CLASSES)  # stem: 3x3, 1 -> 4 channels
    stem_macs, stem_params = 64 * 9 * 1 * 4, 9 * 4 + 4
    head = (8 * 10, 8 * 10 + 10)
    cnn = TWIN_SPACE.from_string("cnn|s1:d1,w4,k3,relu,bn|s2:d1,w8,k7,relu|drop0.0")
    # 3x3 4->4 at 8x8 (with BatchNorm), then 7x7 4->8 at 4x4 (stride 2)
    assert supernet.macs(cnn) == stem_macs + 64 * 9 * 4 * 4 + 16 * 49 * 4 * 8 + head[0]
    assert supernet.param_count(cnn) == stem_params + (9 * 16 + 4 + 8) + (49 * 32 + 8) + head[1]
    resnet = TWIN_SPACE.from_string("resnet|s1:d1,w8,k3,relu|drop0.0")
    # conv1 3x3 4->8, conv2 3x3 8->8, projection shortcut 1x1 4->8, all at 8x8
    assert supernet.macs(resnet) == stem_macs + 64 * (9 * 4 * 8 + 9 * 8 * 8 + 4 * 8) + head[0]
    mobilenet = TWIN_SPACE.from_string("mobilenet|s1:d1,w4,k3,e1,relu|s2:d1,w8,k3,e2,relu|drop0.0")
    # stage 1: expand 4->4, depthwise 3x3 on 4, project 4->4 at 8x8; stage 2: expand 4->8 at 8x8 (before the
    # stride), depthwise 3x3 stride 2 on 8 and project 8->8 at 4x4
    stage1 = 64 * (4 * 4 + 9 * 4 + 4 * 4)
    stage2 = 64 * 4 * 8 + 16 * (9 * 8 + 8 * 8)
    assert supernet.macs(mobilenet) == stem_macs + stage1 + stage2 + head[0]


def test_stride_two_stem_twin_equals_the_supernet_and_quarters_the_positions():
    supernet = ConvSupernet(TWIN_SPACE, IMAGE, CLASSES, formulation="lax", stem_stride=2)
    params = _perturbed(supernet.init(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (8, *IMAGE))
    enc = TWIN_SPACE.from_string("resnet|s1:d1,w4,k3,relu,bn|s2:d1,w8,k7,relu,bn|drop0.0")
    stats = jax.jit(supernet.recalibrate_bn)(params, enc, jax.random.normal(jax.random.key(3), (2, 16, *IMAGE)))
    _, twin = supernet.extract(params, enc, stats)
    chex.assert_trees_all_close(twin(x), supernet.apply(params, enc, x, train=False, bn_stats=stats), atol=1e-5)
    # stem 3x3 1->4 at 4x4; stage 1 at 4x4: conv1 4->4, conv2 4->4, shortcut 1x1; stage 2 at 2x2: 7x7 4->8,
    # 7x7 8->8, shortcut 1x1 4->8; head 8->10
    stage1 = 16 * (9 * 4 * 4 + 9 * 4 * 4 + 4 * 4)
    stage2 = 4 * (49 * 4 * 8 + 49 * 8 * 8 + 4 * 8)
    assert supernet.macs(enc) == 16 * 9 * 4 + stage1 + stage2 + 80
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        ConvSupernet(TWIN_SPACE, IMAGE, CLASSES, stem_stride=3)


def test_inactive_blocks_are_exactly_the_identity(twin_setup):
    supernet, params, x, _ = twin_setup
    apply = _jitted(supernet)[0]
    for text in ("resnet|s1:d1,w8,k3,relu,bn|drop0.0", "mobilenet|s1:d1,w4,k7,e2,gelu|drop0.0"):
        enc = TWIN_SPACE.from_string(text)
        family = text.split("|")[0]
        stats = _recalibrated(twin_setup, enc)
        # Block 2 of stage 1 and all of stage 2 are inactive: NaN weights there must not reach the output.
        poisoned = jax.tree.map(lambda a: a, params)
        for k, j in [(0, 1), (1, 0), (1, 1)]:
            poisoned[family]["stages"][k][j] = jax.tree.map(
                lambda a: jnp.full_like(a, jnp.nan), params[family]["stages"][k][j]
            )
        clean = apply(params, enc, x, train=False, bn_stats=stats)
        assert np.array_equal(np.asarray(apply(poisoned, enc, x, train=False, bn_stats=stats)), np.asarray(clean))


def test_weights_beyond_the_width_and_kernel_change_nothing(twin_setup):
    supernet, params, x, _ = twin_setup
    apply = _jitted(supernet)[0]
    enc = TWIN_SPACE.from_string("cnn|s1:d2,w4,k3,relu,bn,skip|drop0.0")  # width 4 of 8, kernel 3 of 7
    stats = _recalibrated(twin_setup, enc)
    changed = jax.tree.map(lambda a: a, params)
    block = params["cnn"]["stages"][0][1]["conv"]
    kernel = block["kernel"].at[:, :, 4:].set(1e6).at[:, :, :, 4:].set(-1e6).at[0].set(1e6).at[:, 6].set(-1e6)
    changed["cnn"]["stages"][0][1]["conv"] = {"kernel": kernel, "bias": block["bias"].at[4:].set(1e6)}
    for k, head in params["cnn"]["head"].items():  # rows beyond the width of every head; the other heads entirely
        kernel = head["kernel"].at[4:].set(1e6) if k == 0 else head["kernel"] + 1e6
        changed["cnn"]["head"] = {**changed["cnn"]["head"], k: {"kernel": kernel, "bias": head["bias"] + (k > 0) * 1e6}}
    clean = apply(params, enc, x, train=False, bn_stats=stats)
    assert np.array_equal(np.asarray(apply(changed, enc, x, train=False, bn_stats=stats)), np.asarray(clean))


def test_extract_without_statistics_of_a_normed_subnet_says_how_to_get_them(twin_setup):
    supernet, params, _, _ = twin_setup
    with pytest.raises(ValueError, match="recalibrate_bn"):
        supernet.extract(params, TWIN_SPACE.from_string(TWIN_ARCHS[0]))


def test_apply_rejects_images_of_the_wrong_shape(twin_setup):
    supernet, params, _, _ = twin_setup
    with pytest.raises(ValueError, match=r"image_shape=\(5, 5, 1\)"):
        supernet.apply(params, TWIN_SPACE.from_string(TWIN_ARCHS[0]), jnp.ones((2, 5, 5, 1)), train=False)


# ------------------------------------------------------------------------------------------------ formulations
@pytest.mark.parametrize("k, stride", [(1, 2), (3, 1), (7, 2)])
def test_slices_convolutions_equal_lax_convolutions(k, stride):
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 3))  # odd height: ceil(7 / 2) rows
    kernel = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    conv, depthwise_conv = (jax.jit(op, static_argnums=(2, 3)) for op in (conv2d, depthwise_conv2d))
    chex.assert_trees_all_close(conv(x, kernel, stride, "slices"), conv(x, kernel, stride, "lax"), atol=1e-5)
    p = (k - 1) // 2  # both formulations run a 1 x 1 kernel as a matmul: against XLA's convolution itself
    reference = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(p, p), (p, p)],
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    chex.assert_trees_all_close(conv(x, kernel, stride, "slices"), reference, atol=1e-5)
    depthwise = jax.random.normal(jax.random.key(2), (k, k, 1, 3))
    out = depthwise_conv(x, depthwise, stride, "slices")
    chex.assert_shape(out, (2, -(-7 // stride), 8 // stride, 3))
    chex.assert_trees_all_close(out, depthwise_conv(x, depthwise, stride, "lax"), atol=1e-5)


@pytest.mark.parametrize("n, size, k, stride", [(11, 7, 3, 1), (9, 8, 5, 2), (3, 9, 3, 3), (16, 6, 7, 2), (2, 5, 1, 2)])
def test_depthwise_gradients_by_hand_equal_the_lax_convolutions(n, size, k, stride):
    # The slices formulation's hand-written VJP (kernel gradient over chunks of examples, a batch that does not
    # divide into chunks included; input gradient as one correlation of the spread output gradient) against
    # autodiff of XLA's grouped convolution, alone and under vmap (the masked population programs).
    x = jax.random.normal(jax.random.key(0), (n, size, size + 1, 3))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, 3))

    def gradients(formulation):
        def loss(x, kernel):
            return jnp.sum(jnp.sin(depthwise_conv2d(x, kernel, stride, formulation)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    chex.assert_trees_all_close(gradients("slices")(x, kernel), gradients("lax")(x, kernel), atol=1e-4, rtol=1e-5)
    batched = jax.vmap(gradients("slices"))(jnp.stack([x, -x]), jnp.stack([kernel, 2 * kernel]))
    chex.assert_trees_all_close(
        jax.tree.map(lambda leaf: leaf[1], batched), gradients("lax")(-x, 2 * kernel), atol=1e-4, rtol=1e-5)


def test_supernet_in_slices_and_lax_formulations_gives_equal_logits(train_setup):
    slices, encs, _, _ = train_setup
    lax_supernet = ConvSupernet(TRAIN_SPACE, IMAGE, CLASSES, formulation="lax")
    params = _perturbed(slices.init(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (8, *IMAGE))
    for enc in encs:
        chex.assert_trees_all_close(
            _jitted(slices)[0](params, enc, x, train=False),
            _jitted(lax_supernet)[0](params, enc, x, train=False),
            atol=1e-5,
            rtol=1e-5,
        )


# ------------------------------------------------------------------------------------------------ populations
P = 4


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.train.images[:128], ds.train.labels[:128], ds.validation.images[:64], ds.validation.labels[:64]


@pytest.fixture(scope="module")
def train_setup():
    supernet = ConvSupernet(TRAIN_SPACE, IMAGE, CLASSES, formulation="slices")
    encs = np.asarray(TRAIN_SPACE.sample(jax.random.key(7), P))
    params = pop.init_population(supernet.init, jax.random.key(8), P)
    keys = pop.candidate_keys(jax.random.key(9), P)
    return supernet, encs, params, keys


def test_vmapped_recalibration_equals_recalibrating_each_subnet(twin_setup):
    supernet, params, _, batches = twin_setup
    encs = np.stack([TWIN_SPACE.from_string(t) for t in TWIN_ARCHS[:3]])
    together = jax.jit(jax.vmap(supernet.recalibrate_bn, in_axes=(None, 0, None)))(params, encs, batches)
    for p, enc in enumerate(encs):
        alone = _recalibrated(twin_setup, enc)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[p], together), alone, atol=1e-5, rtol=1e-5)


def test_shared_weight_evaluation_equals_each_candidate_alone(train_setup, digits):
    supernet, encs, params_P, _ = train_setup
    params = jax.tree.map(lambda a: a[0], params_P)
    _, _, x, y = digits
    # Batches of 32 (dividing 64): eval-mode BatchNorm without given statistics uses each batch's own.
    together = pop.evaluate_shared(supernet.apply, params, encs, x, y, batch_size=32)
    apply = _jitted(supernet)[0]
    for p, enc in enumerate(encs):
        logits = jnp.concatenate([apply(params, enc, x[i : i + 32], train=False) for i in (0, 32)])
        np.testing.assert_allclose(together["accuracy"][p], np.mean(np.argmax(np.asarray(logits), -1) == y), atol=1e-6)
        loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
        np.testing.assert_allclose(together["loss"][p], loss, rtol=1e-5)


def test_recalibrated_population_evaluation_uses_each_candidates_statistics(train_setup, digits):
    supernet, encs, params_P, _ = train_setup
    tx, _, x, y = digits
    batches = jnp.asarray(tx[:96]).reshape(3, 32, *IMAGE)
    stats = jax.jit(jax.vmap(supernet.recalibrate_bn, in_axes=(0, 0, None)))(params_P, encs, batches)
    together = pop.evaluate_population(
        supernet.apply_recalibrated, {"params": params_P, "bn_stats": stats}, encs, x, y, batch_size=48
    )
    for p, enc in enumerate(encs):
        params = jax.tree.map(lambda a: a[p], params_P)
        _, twin = supernet.extract(params, enc, jax.tree.map(lambda a: a[p], stats))
        loss = np.mean(np.asarray(optax.softmax_cross_entropy_with_integer_labels(twin(jnp.asarray(x)), y)))
        np.testing.assert_allclose(together["loss"][p], loss, rtol=1e-5)


def _train(train_setup, digits, *, params=None, encs=None, keys=None):
    supernet, encs0, params0, keys0 = train_setup
    return pop.train_population(
        supernet.apply,
        params0 if params is None else params,
        encs0 if encs is None else encs,
        OPTIMIZER,
        *digits,
        epochs=1,
        batch_size=32,
        seed=3,
        keys=keys0 if keys is None else keys,
    )


def _row(tree, p):
    return jax.tree.map(lambda a: a[p : p + 1], tree)


def test_population_training_equals_training_each_candidate_alone(train_setup, digits):
    _, encs, params, keys = train_setup
    trained = _train(train_setup, digits)
    assert list(trained.status) == ["ok"] * P
    for p in range(P):
        alone = _train(train_setup, digits, params=_row(params, p), encs=encs[p : p + 1], keys=keys[p : p + 1])
        chex.assert_trees_all_close(alone.params, _row(trained.params, p), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(alone.train_loss[:, 0], trained.train_loss[:, p], rtol=1e-5)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), trained.params, params))


def test_sandwich_ends_are_the_largest_and_smallest_subnets(train_setup):
    supernet, encs, _, _ = train_setup
    largest, smallest = supernet.largest(encs[:1])[0], supernet.smallest(encs[:1])[0]
    text = TRAIN_SPACE.to_string(largest)
    assert text.startswith("cnn|s1:d1,w8,k3,") and "|s2:d1,w8,k3," in text
    text = TRAIN_SPACE.to_string(smallest)
    assert text.startswith("cnn|s1:d1,w4,k1,") and "|s2:" not in text
    counts = [supernet.param_count(e) for e in encs]
    assert supernet.param_count(smallest) <= min(counts) and supernet.param_count(largest) >= max(counts)
