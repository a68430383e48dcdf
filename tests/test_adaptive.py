"""Experiential channel gating (`jaxnas.adaptive`): exact smaller programs, budgets, memory, guardrail order.

Twins come from a tiny real search (digits, exported and loaded back) and, for the three conv families, from
their search spaces with fixed architectures and BatchNorm statistics measured on a batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import interop
from jaxnas import load_model
from jaxnas.adaptive import calibrate, experiment, policy as policy_module
from jaxnas.adaptive.exits import EarlyExitNet, calibrate_thresholds, exit_points, policy_accuracy, train_heads
from jaxnas.adaptive.gated import GatedNet
from jaxnas.adaptive.policy import ChannelGatePolicy, Probe
from jaxnas.config import SpaceConfig
from jaxnas.data import load_dataset
from jaxnas.search.__main__ import main as search_main
from jaxnas.search.models import build_space, model_for

TINY_SEARCH = [
    "data.name=digits", "mode=train", "search.strategy=random", "space.max_stages=2", "space.max_depth=2",
    "space.families=[cnn]", "space.channels=[8]", "space.kernels=[3]", "space.activations=[relu]",
    "space.dropouts=[0.0]", "space.batchnorm=[true]", "space.skip=[false]", "search.population=1", "search.budget=1",
    "train.epochs=1", "train.batch_size=64", "train.learning_rate=0.01", "final.top_k=1", "final.epochs=1",
    "final.seeds=1", "final.control=0", "final.baselines=[]", "progress=false",
]
ARCHS = {
    "cnn": "cnn|s1:d2,w8,k3,relu,bn,skip|s2:d2,w16,k3,relu,bn|drop0.0",
    "resnet": "resnet|s1:d2,w8,k3,relu,bn|s2:d1,w16,k3,relu,bn|drop0.0",
    "mobilenet": "mobilenet|s1:d2,w8,k3,e2,relu,bn|s2:d1,w16,k3,e2,relu,bn|drop0.0",
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "run"
    assert search_main([f"output={out}", *TINY_SEARCH]) == 0
    return load_model(out)


def _twin(family: str, images: np.ndarray):
    cfg = SpaceConfig(families=[family], channels=[8, 16], max_stages=2, max_depth=2, kernels=[3], expansions=[2],
                      activations=["relu"], dropouts=[0.0], batchnorm=[True], skip=[False, True])
    space = build_space(cfg)
    enc = space.from_string(ARCHS[family])
    model = model_for(space, cfg, images.shape[1:], 10)
    params = model.init(jax.random.key(1))
    stats = model.statistics(params, enc[None], jnp.asarray(images[None, :64]), shared=True)
    _, twin = model.extract(params, enc, jax.tree.map(lambda a: a[0], stats))
    twin.eval()
    return twin


@pytest.fixture(scope="module")
def twins(digits):
    return {family: _twin(family, digits.train.images) for family in ARCHS}


def _random_keep(net: GatedNet, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: np.sort(rng.choice(w, max(1, w - 1 - rng.integers(0, w // 2)), replace=False))
            for n, w in zip(net.names, net.full)}


def test_full_width_program_equals_the_exported_model_exactly(exported, digits):
    net = GatedNet(exported.twin)
    x = digits.test.images[:50]
    reference = jax.jit(lambda twin, x: twin(x))(exported.twin, x)
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(reference))
    assert net.widths({}) == net.full and "stem" in net.names


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_every_family_full_width_equals_its_twin_and_reduced_width_equals_the_masked_twin(twins, digits, family):
    twin = twins[family]
    net = GatedNet(twin)
    x = digits.test.images[:40]
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(jax.jit(lambda t, x: t(x))(twin, x)))
    expected = {"cnn": {"stem", "s2"}, "resnet": {"stem", "b0.conv1", "b1.conv1", "b2.conv1"},
                "mobilenet": {"stem", "b0.expand", "b1.expand", "b2.expand"}}[family]
    assert expected <= set(net.names)
    for seed in range(2):
        keep = _random_keep(net, seed)
        assert all(w < f for w, f in zip(net.widths(keep), net.full))
        np.testing.assert_allclose(np.asarray(net(x, keep)), np.asarray(net.masked(x, keep)), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(net(x, keep)), np.asarray(net(x)), atol=1e-4)  # channels really left out


def _conv_kernels(jaxpr) -> list[tuple[int, ...]]:
    """Kernel shapes of every convolution in ``jaxpr``, nested programs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn.invars[1].aval.shape)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                found += _conv_kernels(getattr(inner, "jaxpr", inner))
    return found


def test_a_reduced_program_convolves_only_the_kept_channels(twins, digits):
    net = GatedNet(twins["cnn"])
    keep = {n: np.arange(w // 2) for n, w in zip(net.names, net.full)}
    args = {n: jnp.asarray(k, jnp.int32) for n, k in keep.items()}
    jaxpr = jax.make_jaxpr(net.program(net.widths(keep)))(net.state, digits.test.images[:4], args)
    kernels = _conv_kernels(jaxpr.jaxpr)
    assert len(kernels) == 5  # the stem and the four blocks
    widest = max(max(k[2], k[3]) for k in kernels)
    assert widest == max(net.full) // 2  # no convolution at full width is left in the program
    assert net.macs(net.widths(keep), (8, 8, 1)) < 0.5 * net.macs(net.full, (8, 8, 1))


def _probe(net: GatedNet, evidence: dict, fingerprint=None) -> Probe:
    fp = np.ones(64) / 8 if fingerprint is None else fingerprint
    return Probe(None, evidence, fp, evidence)


@settings(max_examples=40, deadline=None)
@given(bl=st.sampled_from([0.0, 0.10, 0.12, 0.18, 0.5]), Bg=st.sampled_from([0.0, 0.05, 0.06, 0.08, 0.3]),
       align=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**31 - 1))
def test_every_decision_holds_the_budgets(exported, bl, Bg, align, seed):
    net = GatedNet(exported.twin)
    pol = ChannelGatePolicy(net, bl=bl, Bg=Bg, align=align, min_keep=0.5)
    rng = np.random.default_rng(seed)
    evidence = {n: rng.random(w) for n, w in zip(net.names, net.full)}
    memory = interop.ExperienceMemory(dim=64, capacity=4)
    memory.add(rng.standard_normal(64), {"outcome": 1.0}, {n: rng.random(w) for n, w in zip(net.names, net.full)})
    for mem in (None, memory):
        keep = pol.select(_probe(net, evidence, rng.standard_normal(64)), memory=mem)
        removed = {n: w - len(keep[n]) for n, w in zip(net.names, net.full)}
        assert sum(removed.values()) <= math.floor(round(Bg * sum(net.full), 9))
        for n, w in zip(net.names, net.full):
            kept = np.asarray(keep[n])
            assert len(np.unique(kept)) == len(kept) and kept.min(initial=0) >= 0 and kept.max(initial=0) < w
            assert removed[n] <= math.floor(round(bl * w, 9))
            assert removed[n] == 0 or len(kept) % align == 0
            assert len(kept) >= math.ceil(0.5 * w)


def test_the_memory_changes_the_decision(exported):
    net = GatedNet(exported.twin)
    # Two channels may go in all; every channel of the batch looks alike (ties go to the lowest indices), so only
    # the memory can say which two to drop.
    pol = ChannelGatePolicy(net, bl=0.5, Bg=2.5 / sum(net.full), align=1)
    flat = {n: np.ones(w) for n, w in zip(net.names, net.full)}
    stem = net.full[0]
    payload = {n: np.ones(w) for n, w in zip(net.names, net.full)}
    payload["stem"][[stem - 2, stem - 1]] = 0.0  # past batches like this one did without the last stem channels
    memory = interop.ExperienceMemory(dim=64, capacity=2)
    memory.add(np.ones(64), {"outcome": 1.0}, payload)
    without = pol.select(_probe(net, flat))
    with_memory = pol.select(_probe(net, flat), memory=memory)
    dropped = lambda keep: set(range(stem)) - set(np.asarray(keep["stem"]).tolist())  # noqa: E731
    assert dropped(without) == {0, 1}
    assert dropped(with_memory) == {stem - 2, stem - 1}
    assert all(len(with_memory[n]) == w for n, w in zip(net.names[1:], net.full[1:]))


def test_jaxnas_decides_with_the_interop_building_blocks():
    assert policy_module.Fingerprinter is interop.Fingerprinter
    assert policy_module.ExperienceMemory is interop.ExperienceMemory
    assert policy_module.TransversalSelector is interop.TransversalSelector
    assert policy_module.BudgetController is interop.BudgetController


class _GuardedSplit:
    """A test split that fails the test if its images or labels are read before every guardrail ran."""

    def __init__(self, split, log):
        self._split, self._log = split, log

    def __getattr__(self, name):
        if name in ("images", "labels"):
            assert {"calibrated", "exits"} <= set(self._log), f"test split read before the guardrail: {self._log}"
        return getattr(self._split, name)


class _Data:
    def __init__(self, dataset, log):
        self.train, self.validation, self.test = dataset.train, dataset.validation, _GuardedSplit(dataset.test, log)


def test_guardrail_holds_on_validation_before_the_test_split_is_read(exported, digits, monkeypatch):
    log = []
    real_grid, real_guardrail = experiment.calibrate_grid, calibrate.enforce_guardrail
    real_exits = experiment.calibrate_exits

    def guardrail(*args, **kwargs):
        log.append("guardrail")
        return real_guardrail(*args, **kwargs)

    def grid(*args, **kwargs):
        points = real_grid(*args, **kwargs)
        log.append("calibrated")
        return points

    def exits(*args, **kwargs):
        calibrated = real_exits(*args, **kwargs)
        log.append("exits")
        return calibrated

    monkeypatch.setattr(experiment, "calibrate_exits", exits)
    monkeypatch.setattr(experiment, "enforce_guardrail", guardrail)
    monkeypatch.setattr(experiment, "calibrate_grid", grid)
    settings_ = experiment.Settings(bl_grid=(0.18,), Bg_grid=(0.08,), batch_size=32, calibration_batch=32,
                                    probe_images=4, repeats=0, max_drop=0.5, exit_epochs=5)
    report = experiment.run_adaptive(exported, _Data(digits, log), settings_, progress=lambda line: None)
    assert log.count("guardrail") == 3 and log[-2:] == ["calibrated", "exits"]
    for arm in report["grid"][0]["arms"].values():
        assert arm["guardrail_validation"]["accuracy_drop"] <= 0.5 and arm["guardrail_validation"]["holds"]
        assert 0 < arm["active_fraction"] <= 1
    early = report["early_exit"]
    assert early["validation"]["holds"] and early["validation"]["accuracy_drop"] <= 0.5
    assert sum(early["exit_rates"]) == pytest.approx(1.0)
    assert early["avg_macs"] == pytest.approx(float(np.dot(early["exit_rates"], early["segment_macs"])))
    assert early["segment_macs"][-1] >= early["macs_full"] == report["macs_full"]
    assert report["base"]["accuracy"] == pytest.approx(100 * float(np.mean(exported.predict(digits.test.images)
                                                                          == digits.test.labels)))


def test_early_exits_route_images_as_calibrated_and_hold_the_guardrail_on_validation(twins, digits):
    twin = twins["cnn"]
    net = EarlyExitNet(twin, exit_points(twin), [], [])
    assert net.exits == [0, 1, 2]
    net.heads = train_heads(net, digits.train.images, digits.train.labels, epochs=5)
    gated = GatedNet(twin)
    segment_macs = net.segment_macs(gated, (8, 8, 1))
    heads = sum(int(h["w"].size) for h in net.heads)  # every exit head ran for an image reaching the last head
    assert segment_macs == sorted(segment_macs) and segment_macs[-1] == gated.macs(gated.full, (8, 8, 1)) + heads
    x, y = digits.validation.images, digits.validation.labels
    logits = net.all_logits(x)
    np.testing.assert_allclose(logits[-1], np.asarray(jax.jit(lambda t, x: t(x))(twin, x)), rtol=1e-5, atol=1e-5)
    net.thresholds = calibrate_thresholds(logits, y, segment_macs, max_drop=2.0)
    base = calibrate.accuracy(logits[-1].argmax(-1), y)
    acc, where = policy_accuracy(logits, y, net.thresholds)
    assert base - acc <= 2.0
    predicted, routed = net.predict(x)
    np.testing.assert_array_equal(routed, where)  # the batched program exits exactly the calibrated images
    exit_predictions = np.stack([lg.argmax(-1) for lg in logits])[where, np.arange(len(y))]
    np.testing.assert_array_equal(predicted.argmax(-1), exit_predictions)
