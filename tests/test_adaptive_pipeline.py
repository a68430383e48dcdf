"""Channel gating's pipelined decisions and hardware-aware widths (`ChannelGatePolicy.stream`, ``fast_widths``,
`GatedNet.latencies`, `jaxnas.adaptive.experiment.measure_widths`): correctness only, never timings."""

import itertools
import math

import jax
import numpy as np
import pytest
from test_adaptive import _conv_kernels, _twin

import interop
from jaxnas.adaptive import experiment
from jaxnas.adaptive.gated import GatedNet, gate_depth
from jaxnas.adaptive.policy import ChannelGatePolicy, active_fraction, predict_batches, stream_classes
from jaxnas.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def net(digits):
    return GatedNet(_twin("cnn", digits.train.images))


def _memory(net: GatedNet, seed: int = 0) -> interop.ExperienceMemory:
    rng = np.random.default_rng(seed)
    memory = interop.ExperienceMemory(dim=64, capacity=8)
    for _ in range(4):
        memory.add(rng.standard_normal(64), {"outcome": 1.0}, {n: rng.random(w) for n, w in zip(net.names, net.full)})
    return memory


def _decided(policy: ChannelGatePolicy, run) -> tuple[list, list]:
    policy.decisions, policy.log_decisions = [], True
    outputs = [np.asarray(v) for v in run()]
    policy.log_decisions = False
    return outputs, list(policy.decisions)


# the last batch: whole; smaller than the probe; exactly the probe
@pytest.mark.parametrize("n_images", [200, 100 + 3, 2 * 50 + 4])
def test_stream_decides_and_predicts_exactly_as_predict_does(net, digits, n_images):
    images = digits.test.images[:n_images]
    policy = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4, memory=_memory(net))
    expected, expected_decisions = _decided(policy, lambda: [policy.predict(images[i : i + 50])
                                                             for i in range(0, len(images), 50)])
    got, decisions = _decided(policy, lambda: policy.stream(images, 50))
    assert decisions == expected_decisions
    assert any(d.widths != net.full for d in decisions)  # the stream really gates
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stream_classes(policy, images, 50), predict_batches(policy.predict, images, 50))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_stream_probes_inside_the_program_depth_batches_before(net, digits, depth):
    policy = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4)
    images = digits.test.images[:250]
    expected = list(policy.stream(images, 50, depth=1))  # compiles the pipelined programs (probe program inside)
    calls, real = [], policy._probe
    policy._probe = lambda state, x, depth=None: calls.append(len(x)) or real(state, x, depth)
    pipelined, fused = policy._pipelined_program, []
    policy._pipelined_program = lambda widths, depth=None: fused.append(widths) or pipelined(widths, depth)
    got = list(policy.stream(images, 50, depth=depth))
    assert len(got) == 5 and all(np.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))
    assert calls == [4] * depth  # the first depth batches are probed on their own
    assert len(fused) == 5 - depth  # batch t carries the probe of batch t + depth
    with pytest.raises(ValueError, match="depth"):
        list(policy.stream(images, 50, depth=0))


@pytest.mark.parametrize("shallow", [False, True])
@pytest.mark.parametrize("every, depth", [(2, 1), (3, 2), (3, 4)])
def test_grouped_decisions_probe_only_each_groups_first_batch_and_run_the_rest_at_its_widths(net, digits, shallow,
                                                                                           every, depth):
    images = digits.test.images[:7 * 40 + 13]  # 8 batches of 40, the last one 13 images
    fast = {tuple(f // 2 if i == 1 else f for i, f in enumerate(net.full)): 1.0} if shallow else None
    options = dict(bl=0.5, Bg=0.3, align=2, probe_images=4, memory=_memory(net), fast_widths=fast)
    single = ChannelGatePolicy(net, **options)
    grouped = ChannelGatePolicy(net, **options, decide_every=every)
    assert grouped.shallow == shallow
    calls, decide = [], grouped._decide
    grouped._decide = lambda probe: calls.append(1) or decide(probe)
    got, decisions = _decided(grouped, lambda: grouped.stream(images, 40, depth=depth))
    batches = [images[i : i + 40] for i in range(0, len(images), 40)]
    assert len(got) == len(batches) == 8 and len(calls) == len(range(0, 8, every))
    for t, (x, logits, d) in enumerate(zip(batches, got, decisions)):
        lead = t - t % every
        expected = single.predict(batches[lead])  # the group's first batch: decided as predict decides it
        keep = single.select(single.probe(batches[lead][:4]), memory=single.memory)
        assert d.widths == net.widths(keep) != net.full and d.n_images == len(x)
        if t == lead:
            np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-5, atol=1e-5)
        else:  # a follower: no probe, every image at the first batch's kept channels
            assert d.n_probe == 0 and d.probe_macs == 0
            np.testing.assert_allclose(logits, np.asarray(net(x, keep)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decide_every"):
        ChannelGatePolicy(net, decide_every=0)


@pytest.mark.parametrize("cut", [0, 1, 2])  # the stem, stage 1's stream, stage 2's stream
def test_a_shallow_probe_reads_only_up_to_the_deepest_cut_gate_and_every_image_runs_gated(net, digits, cut):
    images = digits.test.images[:150]
    widths = tuple(f // 2 if i == cut else f for i, f in enumerate(net.full))
    policy = ChannelGatePolicy(net, bl=0.5, Bg=0.5, align=2, probe_images=4, fast_widths={widths: 1.0})
    assert policy.shallow and policy.hardware_widths() == widths
    depth = policy.probe_depth()
    assert depth == gate_depth(net.gates[cut]) and (cut > 0 or depth == -1)
    raw = policy._probe(net.state, images[:4], depth)
    assert raw[0] is None  # no logits: the probe stopped early
    kernels = _conv_kernels(jax.make_jaxpr(policy._probe_program(depth))(net.state, images[:4]).jaxpr)
    assert len(kernels) == depth + 2  # the stem and the blocks up to the gate (one convolution each in a cnn)
    expected, decisions = _decided(policy, lambda: [policy.predict(images[i : i + 50]) for i in range(0, 150, 50)])
    got, streamed = _decided(policy, lambda: policy.stream(images, 50, depth=1))
    assert streamed == decisions and all(d.widths == widths and d.n_probe == 0 for d in decisions)
    for g, e, start in zip(got, expected, range(0, 150, 50)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
        keep = policy.select(policy.probe(images[start : start + 4]))
        np.testing.assert_allclose(e, np.asarray(net(images[start : start + 50], keep)), rtol=1e-6, atol=1e-6)
    layers = net.layer_macs(net.full, (8, 8, 1))
    assert decisions[0].probe_macs == 4 * sum(layers[: depth + 2])
    fraction = active_fraction(net, decisions, (8, 8, 1))
    assert fraction == pytest.approx((150 * net.macs(widths, (8, 8, 1)) + 3 * decisions[0].probe_macs)
                                     / (150 * net.macs(net.full, (8, 8, 1))))


def _brute_force_widths(net: GatedNet, bl: float, Bg: float, align: int, min_keep: float) -> set:
    found = set()
    for widths in itertools.product(*[range(1, w + 1) for w in net.full]):
        removed = [f - w for w, f in zip(widths, net.full)]
        if sum(removed) > math.floor(round(Bg * sum(net.full), 9)):
            continue
        if all(r == 0 or (r <= math.floor(round(bl * f, 9)) and w % align == 0 and w >= math.ceil(min_keep * f))
               for w, f, r in zip(widths, net.full, removed)):
            found.add(widths)
    return found


@pytest.mark.parametrize("bl, Bg, align", [(0.5, 0.3, 2), (0.5, 0.5, 4), (0.25, 0.1, 1), (0.1, 0.05, 2)])
def test_reachable_widths_are_exactly_the_width_tuples_the_budgets_allow(net, bl, Bg, align):
    policy = ChannelGatePolicy(net, bl=bl, Bg=Bg, align=align, min_keep=0.5)
    reachable = policy.reachable_widths()
    assert reachable[0] == net.full and len(set(reachable)) == len(reachable)
    assert set(reachable) == _brute_force_widths(net, bl, Bg, align, 0.5)
    rng = np.random.default_rng(0)
    for _ in range(20):  # and every decision lands on one of them
        probe = policy.probe(np.asarray(rng.random((4, 8, 8, 1)), np.float32))
        assert net.widths(policy.select(probe)) in set(reachable)


def test_fast_widths_choose_the_fastest_reachable_program_and_the_scores_the_channels(net, digits):
    images = digits.test.images[:150]
    free = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4)
    expected, decided = _decided(free, lambda: free.stream(images, 50))
    chosen = {d.widths for d in decided} - {net.full}
    assert len(chosen) == 1
    # No width measured fast: the policy never gates and runs the plain network, no probe.
    slow = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4, fast_widths={})
    assert slow.never_gates and slow.hardware_widths() == net.full
    out, decisions = _decided(slow, lambda: slow.stream(images, 50))
    assert all(d.widths == net.full and d.n_probe == 0 for d in decisions)
    np.testing.assert_array_equal(np.concatenate(out), np.concatenate([np.asarray(net(images[i : i + 50]))
                                                                       for i in range(0, 150, 50)]))
    # The controller's own widths measured fastest: the same widths and the same kept channels (the probe images
    # now run gated too: a shallow probe gives no logits).
    reachable = free.reachable_widths()
    timings = {w: 2.0 for w in reachable[1:]} | {next(iter(chosen)): 1.0}
    same = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4, fast_widths=timings)
    got, decisions = _decided(same, lambda: same.stream(images, 50))
    assert [d.widths for d in decisions] == [d.widths for d in decided]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g[4:], e[4:], rtol=1e-5, atol=1e-5)
    # Another reachable tuple measured fastest: every batch runs at it, an unreachable faster one is ignored.
    other = next(w for w in reachable[1:] if w not in chosen)
    beyond = tuple(1 for _ in net.full)
    hw = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, probe_images=4,
                           fast_widths={w: 2.0 for w in reachable[1:]} | {other: 1.0, beyond: 0.1})
    assert hw.hardware_widths() == other and not hw.never_gates and hw.shallow
    _, decisions = _decided(hw, lambda: hw.stream(images, 50))
    assert all(d.widths == other and d.n_probe == 0 and d.probe_macs > 0 for d in decisions)
    probe = hw.probe(images[:4])
    keep = hw.select(probe)
    scores = hw.selector.scores(probe.evidence)
    for name, k, full in zip(net.names, other, net.full):
        if k < full:  # each gate keeps its k highest-scoring channels
            kept = np.asarray(keep[name])
            assert len(kept) == k and np.asarray(scores[name])[kept].min() >= np.delete(
                np.asarray(scores[name]), kept).max()
    static = ChannelGatePolicy(net, bl=0.5, Bg=0.3, align=2, fast_widths={other: 1.0},
                               static={n: np.arange(w, dtype=float) for n, w in zip(net.names, net.full)})
    keep = static._static_keep(0.5, 0.3)
    assert net.widths(keep) == other
    assert all(np.array_equal(keep[n], np.arange(f - k, f)) for n, k, f in zip(net.names, other, net.full) if k < f)


def test_latencies_time_every_distinct_width_tuple_once(net, digits):
    half = tuple(max(1, w // 2) for w in net.full)
    lat = net.latencies([net.full, half, net.full], digits.test.images[:16], rounds=2)
    assert list(lat) == [net.full, half] and all(v > 0 and math.isfinite(v) for v in lat.values())


def test_measure_widths_covers_every_reachable_tuple_and_fast_widths_reads_the_table(net, digits):
    settings = experiment.Settings(bl_grid=(0.25, 0.5), Bg_grid=(0.1, 0.3), align=4, batch_size=24, probe_images=4,
                                   latency_rounds=1, repeats=0, exit_epochs=0)
    lat = experiment.measure_widths(net, digits.validation.images, settings)
    expected = {net.full}
    for bl, Bg in itertools.product(settings.bl_grid, settings.Bg_grid):
        expected |= set(ChannelGatePolicy(net, bl=bl, Bg=Bg, align=4, min_keep=0.5).reachable_widths())
    assert set(lat) == expected and len(lat) > 1
    assert experiment.measure_widths(net, digits.validation.images,
                                     experiment.Settings(latency_rounds=0, repeats=0)) == {}
    table = {(4, 4): 10.0, (2, 4): 9.8, (4, 2): 9.0, (2, 2): 5.0}
    assert experiment.fast_widths(table, (4, 4), 0.03) == {(4, 2): 9.0, (2, 2): 5.0}
    assert set(experiment.fast_widths(table, (4, 4), 0.0)) == {(2, 4), (4, 2), (2, 2)}
    assert experiment.fast_widths({}, (4, 4), 0.03) is None
    with pytest.raises(ValueError, match="min_speedup"):
        experiment.Settings(min_speedup=1.5)


class _Splits:
    def __init__(self, digits):
        self.train, self.validation, self.test = digits.train, digits.validation, digits.test


def test_a_fine_tuned_network_is_gated_only_if_it_is_no_worse_on_validation(net, digits, monkeypatch):
    data = _Splits(digits)
    settings = experiment.Settings(finetune_epochs=1, repeats=0, exit_epochs=0, batch_size=50, probe_images=4)
    predictions = predict_batches(net, digits.validation.images, 50)
    no_tuning = experiment.Settings(repeats=0, finetune_epochs=0)
    assert experiment.finetune_gates(net, data, no_tuning, predictions, None) == (net, None)
    assert experiment.finetune_gates(net, data, settings, predictions, {}) == (net, None)  # nothing fast to train

    seen = {}

    def fake(candidate, images, labels, **kwargs):
        seen.update(kwargs, images=len(images))
        return seen["result"], {"epochs": 1}

    monkeypatch.setattr(experiment, "finetune_for_gating", fake)
    seen["result"] = candidate = GatedNet(_twin("cnn", digits.train.images))
    fast = {tuple(w // 2 for w in net.full): 1.0}
    labels = digits.validation.labels
    # The exported network got every validation image wrong: the candidate is no worse, and is gated.
    gating, summary = experiment.finetune_gates(net, data, settings, (labels + 1) % 10, fast)
    assert gating is candidate and summary["used"] and summary["validation_drop_full_width"] <= 0
    assert seen["selection"] == "evidence" and seen["widths"] == sorted(fast) and seen["probe_images"] == 4
    assert seen["images"] == len(digits.train.images)  # trained on the train split only
    # The exported network got every validation image right: the candidate is worse, and the export is gated.
    gating, summary = experiment.finetune_gates(net, data, settings, labels, fast)
    assert gating is net and not summary["used"] and summary["validation_drop_full_width"] > 0
