"""Gate-aware fine-tuning (`jaxnas.adaptive.finetune`): only weights train, the input is untouched, and a network
fine-tuned with random channel removals keeps far more accuracy at half width than before; fine-tuned for the
policy's own evidence rule at given widths, the policy at those widths keeps far more (digits, validation)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_adaptive import ARCHS, _twin

from jaxnas.adaptive.finetune import finetune_for_gating, removal_options
from jaxnas.adaptive.gated import reader_norms
from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import ChannelGatePolicy, predict_batches
from jaxnas.data import load_dataset



@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(family: str, images: np.ndarray) -> GatedNet:
    """A gated twin of ``family`` (test_adaptive's: random weights, BatchNorm statistics of 64 images; gates of 8
    and 16 channels)."""
    return GatedNet(_twin(family, images))


def _leaves(state) -> list[np.ndarray]:
    """Every leaf as numpy (an RNG key as its key data)."""
    return [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
            for a in jax.tree.leaves(state)]


def _stats(net: GatedNet) -> list[np.ndarray]:
    return _leaves(nnx.state(nnx.merge(net._graph, net._state), nnx.BatchStat))


@pytest.fixture(scope="module")
def tuned_cnn(digits):
    net = _net("cnn", digits.train.images)
    x = digits.validation.images[:64]
    before = {"logits": np.asarray(net(x)), "masked": np.asarray(net.masked(x, {"s2": np.arange(8)})),
              "state": _leaves(net.state)}
    tuned, info = finetune_for_gating(net, digits.train.images, digits.train.labels, epochs=3, align=4,
                                      learning_rate=3e-3, batch_size=64)
    return net, tuned, info, before


def test_only_the_weights_of_a_new_net_train_and_the_input_stays_unchanged(tuned_cnn, digits):
    net, tuned, info, before = tuned_cnn
    x = digits.validation.images[:64]
    assert isinstance(tuned, GatedNet) and tuned is not net and tuned.names == net.names and tuned.full == net.full
    np.testing.assert_array_equal(np.asarray(net(x)), before["logits"])  # bitwise: the input net is untouched
    np.testing.assert_array_equal(np.asarray(net.masked(x, {"s2": np.arange(8)})), before["masked"])
    for a, b in zip(_leaves(net.state), before["state"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.asarray(tuned(x)), before["logits"])  # the returned net's weights moved
    for a, b in zip(_stats(tuned), _stats(net), strict=True):  # BatchNorm statistics are not trained
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(tuned.state), _leaves(net.state), strict=True)]
    assert sum(changed) > 0 and sum(changed) < len(changed)
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert info["epochs"] == 3 and info["steps"] == 3 * (len(digits.train.labels) // 64)
    assert info["gates_thinned"] == 3 and info["seconds"] > 0


def test_fine_tuning_reduces_the_loss(tuned_cnn):
    _, _, info, _ = tuned_cnn
    assert np.isfinite(info["loss_first_epoch"]) and info["loss_last_epoch"] < info["loss_first_epoch"]
    assert info["kl_first_epoch"] > 0 and info["ce_last_epoch"] < info["ce_first_epoch"]


def test_removal_options_follow_the_policy_grid():
    assert removal_options(16, bl=0.5, align=4, min_keep=0.5) == [0, 4, 8]
    assert removal_options(8, bl=0.5, align=4, min_keep=0.5) == [0, 4]
    assert removal_options(8, bl=0.5, align=8, min_keep=0.5) == [0]  # no chunk fits: the gate keeps all
    assert removal_options(16, bl=0.5, align=4, min_keep=0.8) == [0]
    assert removal_options(20, bl=0.5, align=8, min_keep=0.5) == [0, 4]  # kept counts on the grid: 16


def _half_accuracy(net: GatedNet, x, y, masks: int = 6) -> float:
    """Validation accuracy (points) of the masked net with a random half of every gate's channels removed,
    averaged over ``masks`` random masks (the same masks for every net)."""
    accs = []
    for s in range(masks):
        rng = np.random.default_rng(100 + s)
        keep = {n: np.sort(rng.choice(w, w - w // 2, replace=False)) for n, w in zip(net.names, net.full)}
        accs.append(100 * np.mean(np.asarray(net.masked(x, keep)).argmax(-1) == y))
    return float(np.mean(accs))


def test_gate_aware_fine_tuning_makes_half_width_networks_accurate(digits):
    train, val = digits.train, digits.validation
    net = _net("cnn", train.images)
    base, _ = finetune_for_gating(net, train.images, train.labels, epochs=20, bl=0.0, distill=0.0,
                                  learning_rate=1e-2, batch_size=64)  # plain full-width training: the export
    kwargs = dict(epochs=60, learning_rate=1e-2, batch_size=32, seed=1)
    plain, _ = finetune_for_gating(base, train.images, train.labels, bl=0.0, distill=0.0, **kwargs)
    gated, info = finetune_for_gating(base, train.images, train.labels, bl=0.5, align=4, **kwargs)
    full = {k: 100 * float(np.mean(np.asarray(n(val.images)).argmax(-1) == val.labels))
            for k, n in (("base", base), ("plain", plain), ("gated", gated))}
    half = {k: _half_accuracy(n, val.images, val.labels) for k, n in (("base", base), ("plain", plain),
                                                                       ("gated", gated))}
    print(f"validation accuracy, full width {full}, half of every gate removed {half}; {info}")
    assert full["base"] > 85 and full["gated"] >= full["base"] - 3  # the full network stays accurate
    assert half["gated"] >= half["base"] + 20  # the point: removing half of each gate no longer destroys it
    assert half["gated"] >= half["plain"] + 20  # and it is the gating, not just more training


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_every_family_fine_tunes(digits, family):
    net = _net(family, digits.train.images)
    tuned, info = finetune_for_gating(net, digits.train.images[:256], digits.train.labels[:256], epochs=1, align=4,
                                      batch_size=64)
    assert np.isfinite([info["loss_first_epoch"], info["loss_last_epoch"]]).all() and info["steps"] == 4
    assert info["gates_thinned"] == len(net.names)
    x = digits.validation.images[:16]
    keep = {n: np.arange(w // 2) for n, w in zip(tuned.names, tuned.full)}
    assert tuned(x).shape == tuned(x, keep).shape == tuned.masked(x, keep).shape == (16, 10)
    np.testing.assert_allclose(np.asarray(tuned(x, keep)), np.asarray(tuned.masked(x, keep)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "value"), [
    ("epochs", 0), ("epochs", 1.5), ("bl", -0.1), ("bl", 1.5), ("align", 0), ("min_keep", 0.0), ("min_keep", 1.2),
    ("learning_rate", 0.0), ("batch_size", 0), ("distill", -1.0),
])
def test_bad_arguments_raise_naming_the_argument(tuned_cnn, digits, name, value):
    net = tuned_cnn[0]
    with pytest.raises(ValueError, match=name):
        finetune_for_gating(net, digits.train.images, digits.train.labels, **{name: value})


def test_too_few_images_or_mismatched_labels_raise(tuned_cnn, digits):
    net = tuned_cnn[0]
    with pytest.raises(ValueError, match="batch_size"):
        finetune_for_gating(net, digits.train.images[:10], digits.train.labels[:10], batch_size=64)
    with pytest.raises(ValueError, match="labels"):
        finetune_for_gating(net, digits.train.images[:100], digits.train.labels[:90])
    with pytest.raises(TypeError, match="GatedNet"):
        finetune_for_gating(object(), digits.train.images, digits.train.labels)


def test_reader_norms_sum_the_norms_of_the_weights_reading_each_channel(digits):
    for family in sorted(ARCHS):
        net = _net(family, digits.train.images)
        twin = nnx.merge(net._graph, net._state)
        blocks = list(twin.blocks)
        got = net.reader_norms()
        for gate in net.gates:  # the definition, in float64 numpy
            expected = np.zeros(gate.width)
            for block, conv in gate.consumers:
                kernel = np.asarray(getattr(blocks[block], conv).kernel[...], np.float64)
                expected += np.sqrt((kernel**2).sum(axis=(0, 1, 3)))
            if gate.head:
                expected += np.sqrt((np.asarray(twin.head.kernel[...], np.float64) ** 2).sum(axis=1))
            if not gate.consumers and not gate.head:
                expected += 1.0
            np.testing.assert_allclose(np.asarray(got[gate.name]), expected, rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(reader_norms(twin, net.gates)[gate.name]),
                                          np.asarray(got[gate.name]))


def _policy_accuracy(net: GatedNet, widths: tuple, x, y) -> float:
    """Validation accuracy of the uncalibrated policy forced to ``widths`` (8-image probes, batches of 64)."""
    policy = ChannelGatePolicy(net, bl=0.5, Bg=0.5, align=4, fast_widths={widths: 1.0})
    assert policy.hardware_widths() == widths
    return 100 * float(np.mean(predict_batches(policy.predict, x, 64) == y))


def test_evidence_selection_trains_the_network_for_the_policys_own_choice_at_the_given_widths(digits):
    train, val = digits.train, digits.validation
    net = _net("cnn", train.images)
    base, _ = finetune_for_gating(net, train.images, train.labels, epochs=20, bl=0.0, distill=0.0,
                                  learning_rate=1e-2, batch_size=64)  # plain full-width training: the export
    widths = tuple(w // 2 for w in base.full)
    kwargs = dict(epochs=30, learning_rate=1e-2, batch_size=32, seed=1)
    plain, _ = finetune_for_gating(base, train.images, train.labels, bl=0.0, distill=0.0, **kwargs)
    tuned, info = finetune_for_gating(base, train.images, train.labels, selection="evidence", widths=[widths],
                                      probe_images=8, **kwargs)
    assert info["gates_thinned"] == len(base.names)
    accuracy = {k: _policy_accuracy(n, widths, val.images, val.labels) for k, n in
                (("base", base), ("plain", plain), ("tuned", tuned))}
    full = 100 * float(np.mean(predict_batches(tuned, val.images, 64) == val.labels))
    print(f"validation accuracy of the policy at half width {accuracy}, tuned at full width {full}")
    assert accuracy["tuned"] >= accuracy["plain"] + 20 and accuracy["tuned"] >= accuracy["base"] + 20
    assert full > 85


def test_selection_and_widths_are_checked(tuned_cnn, digits):
    net = tuned_cnn[0]
    x, y = digits.train.images[:128], digits.train.labels[:128]
    with pytest.raises(ValueError, match="selection"):
        finetune_for_gating(net, x, y, selection="largest")
    for widths in ([], [(1,)], [tuple(w + 1 for w in net.full)]):
        with pytest.raises(ValueError, match="widths"):
            finetune_for_gating(net, x, y, widths=widths)
