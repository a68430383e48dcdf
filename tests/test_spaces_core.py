"""The declarative space API: rules, counting, operators under jit/vmap, strings, de-duplication, errors.

Operator properties are checked on a small hand-declared space and on all three concrete spaces.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnas.spaces import Choice, Compatible, Space, at_least, is_in, macro_space, nb201_space, transformer_space

P = 64


def toy_space() -> Space:
    return Space(
        "toy",
        [
            Choice("family", ["mlp", "cnn"], mutation_rate=0.05),
            Choice("depth", [1, 2, 3]),
            Choice("width", [4, 6, 8]),
            Choice("kernel", [3, 5], active_if=is_in("family", "cnn")),
            # Index 0 of an inactive kernel means 3: the chain rule must still keep "stem" inactive for mlp.
            Choice("stem", ["plain", "fancy"], active_if=is_in("kernel", 3)),
            Choice("layer3.act", ["relu", "gelu"], active_if=at_least("depth", 3)),
            Choice("heads", [1, 2, 4], valid_if=Compatible("width", lambda w, h: w % h == 0, "heads divide width")),
        ],
        crossover_requires=("family",),
    )


# Built once: operators are jitted per space object, so every test reuses the same compiles.
SPACES = {
    "toy": toy_space(),
    "macro": macro_space(),
    "nb201": nb201_space(),
    "transformer": transformer_space(hidden=(6, 8, 12), heads=(1, 2, 4, 8)),
}


# mutate / crossover jitted and vmapped over single encodings, as a search strategy calls them.
VMAPPED = {name: (jax.jit(jax.vmap(s.mutate)), jax.jit(jax.vmap(s.crossover))) for name, s in SPACES.items()}


@pytest.fixture(scope="module", params=list(SPACES))
def ops(request):
    space = SPACES[request.param]
    mutate, crossover = VMAPPED[request.param]
    return space, {"sample": space.sample, "mutate": mutate, "crossover": crossover}


def keys(seed: int, n: int = P) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def rates(rate: float) -> np.ndarray:
    """One mutation rate per row; always float32 [P], so the vmapped mutate compiles once."""
    return np.full(P, rate, np.float32)


def all_encodings(space: Space) -> np.ndarray:
    return np.array(list(itertools.product(*(range(c) for c in space.cardinalities))), np.int32)


# ---------------------------------------------------------------- rules and counting
def test_toy_active_mask_follows_rules_and_chains():
    space = SPACES["toy"]
    mlp = space.encode({"family": "mlp", "depth": 3, "width": 8, "layer3.act": "gelu", "heads": 4})
    cnn = space.encode({"family": "cnn", "depth": 1, "width": 6, "kernel": 3, "stem": "fancy", "heads": 2})
    chex.assert_trees_all_equal(
        np.asarray(space.active_mask(np.stack([mlp, cnn]))),
        np.array([[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0, 1]], bool),
    )


def test_size_counts_valid_canonical_architectures_like_brute_force():
    space = SPACES["toy"]
    enc = all_encodings(space)
    valid = np.asarray(space.is_valid(enc))
    assert space.size() == int(valid.sum())
    # Every encoding canonicalises onto exactly one of the valid ones, when its rules are satisfied.
    canon = np.asarray(space.canonicalize(enc))
    assert len({tuple(r) for r in canon[np.asarray(space.is_valid(canon))]}) == space.size()


def test_size_is_exact_for_tiny_concrete_spaces():
    macro = macro_space(max_stages=2, max_depth=2, channels=(16, 32), units=(64,), kernels=(3, 5),
                        expansions=(1, 6), activations=("relu", "gelu"), dropouts=(0.0,))
    transformer = transformer_space(max_layers=2, hidden=(6, 8, 12), heads=(1, 2, 4, 8), ffn_mults=(1, 2),
                                    norms=("layernorm",), activations=("gelu",), positions=("rope",))
    for space in (macro, transformer):
        assert space.size() == int(np.asarray(space.is_valid(all_encodings(space))).sum())
    # 12 (ffn) x 2 allowed heads for hidden 6, 4 for 8, 3 for 12: layers=1 -> 2*(2+4+3), layers=2 -> 4*(4+16+9).
    assert transformer.size() == 2 * 9 + 4 * 29


def test_canonicalize_removes_differences_in_inactive_choices():
    space = SPACES["toy"]
    mlp = space.encode({"family": "mlp", "depth": 1, "width": 4, "heads": 1})
    noisy = mlp.copy()
    noisy[space.index("kernel")] = 1
    noisy[space.index("layer3.act")] = 1
    assert not bool(space.is_valid(noisy))
    chex.assert_trees_all_equal(np.asarray(space.canonicalize(noisy)), mlp)
    assert space.fingerprint(space.canonicalize(noisy)) == space.fingerprint(mlp)


# ---------------------------------------------------------------- operators on every space
def test_sample_mutate_crossover_yield_valid_canonical_encodings(ops):
    space, f = ops
    pop = f["sample"](jax.random.key(0), P)
    chex.assert_shape(pop, (P, space.n_choices))
    chex.assert_type(pop, jnp.int32)
    children = f["mutate"](keys(1), pop, rates(0.3))
    crossed = f["crossover"](keys(2), pop, children)
    for batch in (pop, children, crossed):
        chex.assert_shape(batch, (P, space.n_choices))
        chex.assert_type(batch, jnp.int32)
        assert bool(space.is_valid(batch).all())
        chex.assert_trees_all_equal(space.canonicalize(batch), batch)
    assert (np.asarray(children) != np.asarray(pop)).any(-1).mean() > 0.5


def test_sample_covers_every_option_of_always_active_choices(ops):
    space, f = ops
    chunks = [f["sample"](k, P) for k in keys(3, 8)]
    pop = np.concatenate(chunks)
    always = np.all([np.asarray(space.active_mask(c)).all(0) for c in chunks], 0)
    for i in np.flatnonzero(always):
        assert set(pop[:, i]) == set(range(space.cardinalities[i])), space.names[i]


def test_mutate_at_rate_one_changes_every_active_choice_that_has_another_option(ops):
    space, f = ops
    pop = f["sample"](jax.random.key(4), P)
    children = np.asarray(f["mutate"](keys(5), pop, rates(1.0)))
    pop = np.asarray(pop)
    assert (children != pop).any(-1).all()
    # Every choice active before and after changed (in these spaces each has another allowed option).
    both = np.asarray(space.active_mask(pop)) & np.asarray(space.active_mask(children))
    assert ((children != pop) | ~both | (space.cardinalities == 1)).all()


def test_mutate_at_rate_zero_is_the_identity(ops):
    _, f = ops
    pop = f["sample"](jax.random.key(6), P)
    chex.assert_trees_all_equal(f["mutate"](keys(7), pop, rates(0.0)), pop)


def test_crossover_children_take_values_from_their_parents(ops):
    space, f = ops
    a = f["sample"](jax.random.key(8), P)
    b = f["mutate"](keys(9), a, rates(0.5))  # related parents, as in a search
    child = np.asarray(f["crossover"](keys(10), a, b))
    a, b = np.asarray(a), np.asarray(b)
    from_parents = (child == a) | (child == b)
    if space.name == "transformer":
        # Heads inherited next to another parent's hidden size may be repaired to the nearest that divides it.
        from_parents |= np.array(["heads" in n for n in space.names])
    assert from_parents.all()
    assert ((child != a).any(-1) & (child != b).any(-1)).any()  # it really mixes


def test_canonical_strings_round_trip(ops):
    space, f = ops
    pop = np.asarray(f["sample"](jax.random.key(11), P))
    for enc in pop:
        text = space.to_string(enc)
        chex.assert_trees_all_equal(space.from_string(text), enc)
        chex.assert_trees_all_equal(space.encode(space.decode(enc)), enc)
        assert space.to_string(space.from_string(text)) == text


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_decode_encode_round_trip_for_random_samples(seed):
    for space in (SPACES["toy"], SPACES["macro"]):
        pop = space.sample(jax.random.key(seed), P)
        for enc, active in zip(np.asarray(pop)[:8], np.asarray(space.active_mask(pop))[:8], strict=True):
            arch = space.decode(enc)
            assert set(arch) == {n for n, a in zip(space.names, active, strict=True) if a}
            chex.assert_trees_all_equal(space.encode(arch), enc)
            assert space.fingerprint(space.from_string(space.to_string(enc))) == space.fingerprint(enc)


def test_unique_matches_a_python_set_of_canonical_encodings(ops):
    space, f = ops
    pop = np.asarray(f["sample"](jax.random.key(12), P))
    rng = np.random.default_rng(0)
    pop = pop[rng.integers(0, 20, size=P)]  # many repeats
    # Odd rows get random values in their inactive choices: the same architectures, non-canonical encodings.
    noise = rng.integers(0, space.cardinalities, size=pop.shape).astype(np.int32)
    noisy = np.where(np.asarray(space.active_mask(pop)) | (np.arange(P) % 2 == 0)[:, None], pop, noise)
    seen, expected = set(), []
    for i, row in enumerate(np.asarray(space.canonicalize(noisy))):
        if tuple(row) not in seen:
            seen.add(tuple(row))
            expected.append(i)
    chex.assert_trees_all_equal(space.unique(noisy), np.array(expected, np.int32))
    first = space.first_occurrence(noisy)
    chex.assert_trees_all_equal(np.flatnonzero(np.asarray(first)), np.array(expected))


def test_neighbours_are_distinct_valid_single_changes(ops):
    space, f = ops
    enc = np.asarray(f["sample"](jax.random.key(13), P))[0]
    near = space.neighbours(enc)
    chex.assert_rank(near, 2)
    space.validate(near)
    assert len({tuple(r) for r in near}) == len(near)
    active = np.isin(space.names, list(space.decode(enc)))
    first_change = np.argmax(near != enc, -1)
    assert (near != enc).any(-1).all() and active[first_change].all()


# ---------------------------------------------------------------- per-choice mutation rates
def test_mutate_respects_declared_per_choice_rates():
    space = SPACES["toy"]
    enc = space.encode({"family": "cnn", "depth": 2, "width": 8, "kernel": 5, "heads": 2})
    pop = np.broadcast_to(enc, (4000, space.n_choices))
    changed = np.asarray(space.mutate(jax.random.key(14), pop)) != pop
    assert 0.04 < changed[:, space.index("family")].mean() < 0.06  # declared 0.05
    still_cnn = ~changed[:, space.index("family")]  # a switch to mlp retires the kernel
    for name in ("depth", "width", "kernel"):
        assert 0.085 < changed[still_cnn, space.index(name)].mean() < 0.115, name  # the space's default 0.1


def test_mutate_accepts_a_rate_per_choice():
    space = SPACES["nb201"]
    pop = np.random.default_rng(1).integers(0, 5, size=(4000, 6)).astype(np.int32)  # every cell is valid
    rate = np.array([0.0, 0.5, 1.0, 0.0, 0.2, 0.0], np.float32)
    changed = (np.asarray(space.mutate(jax.random.key(16), pop, rate)) != pop).mean(0)
    np.testing.assert_allclose(changed, rate, atol=0.04)


def test_crossover_of_incompatible_parents_returns_parent_a():
    space = SPACES["toy"]
    mlp = space.encode({"family": "mlp", "depth": 3, "width": 6, "layer3.act": "gelu", "heads": 2})
    cnn = space.encode({"family": "cnn", "depth": 1, "width": 8, "kernel": 5, "heads": 4})
    a, b = np.broadcast_to(mlp, (P, 7)), np.broadcast_to(cnn, (P, 7))
    assert not np.asarray(space.compatible(a, b)).any()
    chex.assert_trees_all_equal(np.asarray(VMAPPED["toy"][1](keys(17), a, b)), np.asarray(a))


# ---------------------------------------------------------------- values, strings and errors
def test_value_gives_numeric_options_under_jit():
    space = SPACES["toy"]
    pop = space.sample(jax.random.key(18), P)
    width = jax.jit(lambda e: space.value(e, "width"))(pop)
    chex.assert_trees_all_equal(np.asarray(width), np.array([4, 6, 8])[np.asarray(pop)[:, space.index("width")]])
    with pytest.raises(TypeError, match="family"):
        space.value(pop, "family")


def test_default_string_format_is_name_value_pairs():
    space = SPACES["toy"]
    arch = {"family": "cnn", "depth": 3, "width": 8, "kernel": 3, "stem": "fancy", "layer3.act": "relu", "heads": 4}
    enc = space.encode(arch)
    assert space.to_string(enc) == "family=cnn;depth=3;width=8;kernel=3;stem=fancy;layer3.act=relu;heads=4"
    with pytest.raises(ValueError, match="name=value"):
        space.from_string("family=cnn;depth")
    with pytest.raises(ValueError, match="'width' has no option '7'; allowed: 4, 6, 8"):
        space.from_string("family=mlp;depth=1;width=7;heads=1")


def test_fingerprint_is_sha1_of_space_and_canonical_string():
    space = SPACES["toy"]
    enc = space.encode({"family": "mlp", "depth": 1, "width": 4, "heads": 1})
    # sha1(b"toy:family=mlp;depth=1;width=4;heads=1"), written out so the format cannot drift silently.
    assert space.fingerprint(enc) == "d3586434cd2a33a8b0edfb3c23efcf8151d53c43"


SMALL_MLP = {"family": "mlp", "depth": 1, "width": 4, "heads": 1}


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({**SMALL_MLP, "widht": 4}, "no choice 'widht' .*did you mean 'width'"),
        ({**SMALL_MLP, "family": "rnn"}, "'family' has no option 'rnn'; allowed: mlp, cnn"),
        ({**SMALL_MLP, "family": "cnn"}, "'kernel' is missing.*allowed: 3, 5"),
        ({**SMALL_MLP, "kernel": 3}, r"'kernel' does not apply.*family in \{cnn\}"),
        ({**SMALL_MLP, "width": 6, "heads": 4}, "'heads' = 4 is not allowed with width = 6.*allowed here: 1, 2"),
        ({**SMALL_MLP, "depth": True}, "'depth' has no option True"),
    ],
)
def test_encode_rejects_bad_architectures_naming_the_choice(arch, message):
    with pytest.raises(ValueError, match=message):
        SPACES["toy"].encode(arch)


def test_validate_names_the_bad_choice_and_its_allowed_values():
    space = SPACES["toy"]
    good = space.encode({"family": "mlp", "depth": 1, "width": 4, "heads": 1})
    space.validate(good)
    with pytest.raises(ValueError, match=r"'width' holds index 5, but its options are 0..2 \(4, 6, 8\)"):
        space.validate(np.where(np.arange(7) == 2, 5, good))
    with pytest.raises(ValueError, match=r"'kernel' does not apply.*canonicalize"):
        space.validate(np.where(np.arange(7) == 3, 1, good))
    with pytest.raises(ValueError, match=r"row 1: .*'depth' holds index -1"):
        space.validate(np.stack([good, np.where(np.arange(7) == 1, -1, good)]))
    with pytest.raises(ValueError, match=r"shape \[..., 7\].*got shape \(3,\)"):
        space.validate(good[:3])
    with pytest.raises(ValueError, match="must be integers"):
        space.validate(good.astype(float))


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ([Choice("a", [1]), Choice("a", [2])], "declares choices \\['a'\\] more than once"),
        ([Choice("b", [1], active_if=is_in("a", 1)), Choice("a", [1])], "'a', which is declared later"),
        ([Choice("a", [1, 2]), Choice("b", [1], active_if=is_in("aa", 1))], "unknown choice 'aa'"),
        ([Choice("a", ["x", "y"]), Choice("b", [1], active_if=is_in("a", "z"))], "'a' has no option 'z'"),
        ([Choice("a", [3]), Choice("b", [2], valid_if=Compatible("a", lambda a, b: a % b == 0, "b | a"))], "none of"),
    ],
)
def test_bad_declarations_are_rejected_with_the_reason(choices, message):
    with pytest.raises(ValueError, match=message):
        Space("bad", choices)
