"""interop.memory: top-K retrieval, recency decay, eviction, payload evidence and exact save/load."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from interop import ExperienceMemory

jax.config.update("jax_platforms", "cpu")

KINDS = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.as_tensor}
ARRAY_TYPES = {"numpy": np.ndarray, "jax": jax.Array, "torch": torch.Tensor}
MODULES = {"numpy": np, "jax": jnp, "torch": torch}


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


class ReferenceMemory:
    """Brute force: entries in a Python list, the documented eviction rule, a full sort per query."""

    def __init__(self, capacity, half_life):
        self.capacity, self.half_life, self.entries, self.clock = capacity, half_life, [], 0.0

    def add(self, fp, record, timestamp=None):
        t = self.clock if timestamp is None else float(timestamp)
        entry = (unit(fp), t, record)
        if len(self.entries) < self.capacity:
            self.entries.append(entry)
            slot = len(self.entries) - 1
        else:
            slot = min(range(self.capacity), key=lambda i: (self.entries[i][1], i))
            self.entries[slot] = entry
        self.clock = max(self.clock, t + 1)
        return slot

    def query(self, q, k):
        newest = max(t for _, t, _ in self.entries)
        scored = []
        for i, (f, t, _) in enumerate(self.entries):
            decay = 1.0 if self.half_life is None else 0.5 ** ((newest - t) / self.half_life)
            scored.append((-(f @ unit(q)) * decay, i))
        return [(i, -s, self.entries[i][2]) for s, i in sorted(scored)[:k]]


def fill(memory, reference, rng, n, kind="numpy", dim=8):
    for i in range(n):
        fp = rng.standard_normal(dim).astype(np.float32)
        timestamp = None if i % 3 else float(rng.integers(0, 50))
        payload = {"scores": KINDS[kind](np.full(5, i, np.float32))}
        slot = memory.add(KINDS[kind](fp), {"run": i}, payload, timestamp=timestamp)
        if reference is not None:
            assert slot == reference.add(fp, {"run": i}, timestamp)


@pytest.mark.parametrize("half_life", [None, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_equals_brute_force_reference_including_recency_and_eviction(seed, half_life):
    rng = np.random.default_rng(seed)
    memory, reference = ExperienceMemory(dim=8, capacity=24, half_life=half_life), ReferenceMemory(24, half_life)
    fill(memory, reference, rng, 40)
    for _ in range(5):
        q = rng.standard_normal(8).astype(np.float32)
        got = memory.query(q, k=16)
        expected = reference.query(q, 16)
        assert host(got.indices).tolist() == [i for i, _, _ in expected]
        np.testing.assert_allclose(host(got.scores), [s for _, s, _ in expected], atol=1e-5)
        assert got.records == [r for _, _, r in expected]


def test_equal_scores_rank_the_lower_slot_first():
    memory = ExperienceMemory(dim=4, capacity=8)
    same = np.array([1.0, 2.0, 0.0, 0.0], np.float32)
    memory.add(np.array([0.0, 0.0, 1.0, 0.0], np.float32), {"id": "other"})
    for i in range(3):
        memory.add(same, {"id": i})
    got = memory.query(same, k=3)
    assert host(got.indices).tolist() == [1, 2, 3]
    assert [r["id"] for r in got.records] == [0, 1, 2]


def test_full_memory_replaces_the_oldest_timestamp_and_the_lowest_slot_on_ties():
    memory = ExperienceMemory(dim=2, capacity=3)
    fp = np.array([1.0, 0.0], np.float32)
    assert [memory.add(fp, {}, timestamp=t) for t in (5.0, 1.0, 1.0)] == [0, 1, 2]
    assert memory.add(fp, {}) == 1  # oldest is t=1, in slots 1 and 2: the lower slot goes
    assert memory.add(fp, {}) == 2  # then the other t=1
    assert memory.add(fp, {}) == 0  # then t=5
    np.testing.assert_array_equal(memory.timestamps, [8.0, 6.0, 7.0])
    assert len(memory) == 3


def test_default_timestamps_follow_a_logical_clock_past_the_largest_timestamp():
    memory = ExperienceMemory(dim=2, capacity=8)
    fp = np.array([1.0, 0.0], np.float32)
    memory.add(fp, {})
    memory.add(fp, {})
    memory.add(fp, {}, timestamp=10.0)
    memory.add(fp, {}, timestamp=3.0)
    memory.add(fp, {})
    np.testing.assert_array_equal(memory.timestamps, [0.0, 1.0, 10.0, 3.0, 11.0])


def test_recency_decay_halves_the_score_per_half_life():
    memory = ExperienceMemory(dim=2, capacity=4, half_life=2.0)
    fp = np.array([0.6, 0.8], np.float32)
    memory.add(fp, {"age": 4}, timestamp=0.0)
    memory.add(fp, {"age": 2}, timestamp=2.0)
    memory.add(fp, {"age": 0}, timestamp=4.0)
    got = memory.query(fp)
    assert [r["age"] for r in got.records] == [0, 2, 4]
    np.testing.assert_allclose(host(got.similarity), [1.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(host(got.scores), [1.0, 0.5, 0.25], atol=1e-6)


def test_weights_are_positive_scores_normalised_and_uniform_when_none_is_positive():
    memory = ExperienceMemory(dim=2, capacity=4)
    for v in ([1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]):
        memory.add(np.array(v, np.float32), {})
    got = memory.query(np.array([1.0, 0.0], np.float32))
    np.testing.assert_allclose(host(got.scores), [1.0, 0.6, -1.0], atol=1e-6)
    np.testing.assert_allclose(host(got.weights), [1 / 1.6, 0.6 / 1.6, 0.0], atol=1e-6)
    dissimilar = memory.query(np.array([0.0, -1.0], np.float32), k=2)
    assert (host(dissimilar.scores) <= 0).all()
    np.testing.assert_allclose(host(dissimilar.weights), [0.5, 0.5])


@pytest.mark.parametrize("kind", KINDS)
def test_payload_evidence_is_the_weighted_mean_of_retrieved_payloads(kind):
    rng = np.random.default_rng(3)
    memory = ExperienceMemory(dim=8, capacity=32)
    fill(memory, None, rng, 20, kind=kind)
    got = memory.query(KINDS[kind](rng.standard_normal(8).astype(np.float32)), k=5)
    evidence = memory.payload_evidence("scores", got)
    assert isinstance(evidence, ARRAY_TYPES[kind])
    runs = np.array([r["run"] for r in got.records], np.float64)
    np.testing.assert_allclose(host(evidence), np.full(5, host(got.weights) @ runs), rtol=1e-5)


def test_retrieval_is_identical_in_numpy_jax_and_torch():
    results = {}
    for kind in KINDS:
        rng = np.random.default_rng(4)
        memory = ExperienceMemory(dim=8, capacity=16, half_life=10.0)
        fill(memory, None, rng, 25, kind=kind)
        got = memory.query(KINDS[kind](rng.standard_normal(8).astype(np.float32)), k=6)
        assert all(isinstance(a, ARRAY_TYPES[kind]) for a in (got.indices, got.similarity, got.scores, got.weights))
        results[kind] = got
    for kind in ("jax", "torch"):
        assert host(results[kind].indices).tolist() == host(results["numpy"].indices).tolist()
        assert results[kind].records == results["numpy"].records
        for field in ("similarity", "scores", "weights"):
            got, expected = getattr(results[kind], field), getattr(results["numpy"], field)
            np.testing.assert_allclose(host(got), host(expected), atol=1e-6)
    chex.assert_shape([results["jax"].similarity, results["jax"].weights], (6,))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_memory_gives_an_empty_retrieval_of_the_query_kind(kind):
    got = ExperienceMemory(dim=4).query(KINDS[kind](np.ones(4, np.float32)))
    assert len(got) == 0 and got.records == []
    assert isinstance(got.weights, ARRAY_TYPES[kind]) and tuple(got.indices.shape) == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip_exactly_and_continue_identically(kind, tmp_path):
    rng = np.random.default_rng(5)
    memory = ExperienceMemory(dim=8, capacity=12, half_life=3.0)
    fill(memory, None, rng, 17, kind=kind)
    memory.save(tmp_path / "mem")
    loaded = ExperienceMemory.load(tmp_path / "mem", xp=MODULES[kind])

    assert isinstance(loaded.fingerprints, ARRAY_TYPES[kind])
    for a, b in ((memory.fingerprints, loaded.fingerprints), (memory.payload("scores"), loaded.payload("scores"))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(host(a), host(b))
    np.testing.assert_array_equal(memory.timestamps, loaded.timestamps)
    assert (len(loaded), loaded.half_life, loaded.capacity) == (len(memory), memory.half_life, memory.capacity)

    for _ in range(4):
        fp = KINDS[kind](rng.standard_normal(8).astype(np.float32))
        assert memory.add(fp, {"more": 1}, {"scores": KINDS[kind](np.ones(5, np.float32))}) == loaded.add(
            fp, {"more": 1}, {"scores": KINDS[kind](np.ones(5, np.float32))}
        )
        q = KINDS[kind](rng.standard_normal(8).astype(np.float32))
        a, b = memory.query(q, k=7), loaded.query(q, k=7)
        assert a.records == b.records
        for field in ("indices", "similarity", "scores", "weights"):
            np.testing.assert_array_equal(host(getattr(a, field)), host(getattr(b, field)))
    np.testing.assert_array_equal(memory.timestamps, loaded.timestamps)


def test_saved_files_are_npz_without_pickles_and_json(tmp_path):
    memory = ExperienceMemory(dim=2, capacity=4)
    memory.add(np.array([1.0, 0.0], np.float32), {"ppl": 12.5, "layers": ["a", "b"]})
    memory.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["records"] == [{"ppl": 12.5, "layers": ["a", "b"]}]
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["fingerprints", "timestamps"]


def test_empty_memory_round_trips_and_then_takes_its_kind_from_the_first_add(tmp_path):
    ExperienceMemory(dim=4, capacity=5, half_life=1.0).save(tmp_path / "empty")
    loaded = ExperienceMemory.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.fingerprints is None and loaded.half_life == 1.0
    loaded.add(torch.ones(4), {})
    assert isinstance(loaded.fingerprints, torch.Tensor)


def test_missing_or_corrupt_files_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        ExperienceMemory.load(tmp_path / "nothere")
    memory = ExperienceMemory(dim=2, capacity=4)
    memory.add(np.array([1.0, 0.0], np.float32), {})
    memory.save(tmp_path / "m")

    npz = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "m.npz").write_bytes(npz[: len(npz) // 2])
    with pytest.raises(ValueError, match="m.npz does not match"):
        ExperienceMemory.load(tmp_path / "m")

    (tmp_path / "m.npz").write_bytes(npz)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="m.json is not valid JSON"):
        ExperienceMemory.load(tmp_path / "m")

    (tmp_path / "m.npz").unlink()
    with pytest.raises(FileNotFoundError, match="m.npz not found"):
        ExperienceMemory.load(tmp_path / "m")


def test_mismatching_payload_shapes_or_names_are_rejected_and_leave_the_memory_unchanged():
    memory = ExperienceMemory(dim=2, capacity=4)
    fp = np.array([1.0, 0.0], np.float32)
    memory.add(fp, {}, {"a": np.zeros(3), "b": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"payload 'a' has shape \(4,\), expected \(3,\)"):
        memory.add(fp, {}, {"a": np.zeros(4), "b": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="payload names"):
        memory.add(fp, {}, {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="payload names"):
        memory.add(fp, {})
    assert len(memory) == 1


def test_invalid_fingerprints_records_and_mixed_frameworks_are_rejected():
    memory = ExperienceMemory(dim=2, capacity=4)
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(1, 2\)"):
        memory.add(np.ones((1, 2), np.float32), {})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        memory.add(np.ones(2, np.float32), {"scores": np.ones(3)})
    memory.add(torch.ones(2), {})
    with pytest.raises(TypeError, match="stores array_api_compat.torch arrays"):
        memory.query(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="half_life"):
        ExperienceMemory(half_life=0.0)


def test_evidence_from_a_retrieval_older_than_the_last_add_is_refused():
    memory = ExperienceMemory(dim=2, capacity=2)
    fp = np.array([1.0, 0.0], np.float32)
    memory.add(fp, {}, {"s": np.zeros(3)})
    stale = memory.query(fp)
    memory.add(fp, {}, {"s": np.ones(3)})
    with pytest.raises(ValueError, match="changed since"):
        memory.payload_evidence("s", stale)
    with pytest.raises(KeyError, match="no payload named 'x'"):
        memory.payload_evidence("x", memory.query(fp))


def test_torch_fingerprints_with_gradients_are_stored_without_their_graph():
    memory = ExperienceMemory(dim=2, capacity=2)
    memory.add(torch.ones(2, requires_grad=True) * 2, {}, {"s": torch.ones(3, requires_grad=True)})
    assert not memory.fingerprints.requires_grad and not memory.payload("s").requires_grad
