"""The macro space: S-NAS families, conditional stage choices, its canonical string and typed view."""

import chex
import jax
import numpy as np
import pytest

from jaxnas.spaces import MacroArch, StageArch, macro_space

SPACE = macro_space()

CNN = {
    "family": "cnn",
    "stage1.depth": 2, "stage1.channels": 32, "stage1.kernel": 5, "stage1.activation": "relu",
    "stage1.norm": True, "stage1.skip": True,
    "stage2.depth": 1, "stage2.channels": 64, "stage2.kernel": 3, "stage2.activation": "gelu",
    "stage2.norm": False, "stage2.skip": False,
    "stage3.depth": 0,
    "dropout": 0.1,
}
MLP = {
    "family": "mlp", "stage1.depth": 1, "stage1.units": 256, "stage1.activation": "silu", "stage1.norm": False,
    "stage1.skip": False, "stage2.depth": 0, "dropout": 0.0,
}
MOBILENET = {
    "family": "mobilenet",
    "stage1.depth": 3, "stage1.channels": 24, "stage1.kernel": 7, "stage1.expansion": 6,
    "stage1.activation": "leaky_relu", "stage1.norm": True,
    "stage2.depth": 2, "stage2.channels": 48, "stage2.kernel": 5, "stage2.expansion": 3,
    "stage2.activation": "silu", "stage2.norm": True,
    "stage3.depth": 1, "stage3.channels": 64, "stage3.kernel": 3, "stage3.expansion": 1,
    "stage3.activation": "elu", "stage3.norm": False,
    "dropout": 0.2,
}
RESNET = {
    "family": "resnet", "stage1.depth": 2, "stage1.channels": 16, "stage1.kernel": 3, "stage1.activation": "relu",
    "stage1.norm": True, "stage2.depth": 0, "dropout": 0.0,
}
STRINGS = {
    "cnn": (CNN, "cnn|s1:d2,w32,k5,relu,bn,skip|s2:d1,w64,k3,gelu|drop0.1"),
    "mlp": (MLP, "mlp|s1:d1,w256,silu|drop0.0"),
    "mobilenet": (
        MOBILENET, "mobilenet|s1:d3,w24,k7,e6,leaky_relu,bn|s2:d2,w48,k5,e3,silu,bn|s3:d1,w64,k3,e1,elu|drop0.2"
    ),
    "resnet": (RESNET, "resnet|s1:d2,w16,k3,relu,bn|drop0.0"),
}


@pytest.mark.parametrize("family", list(STRINGS))
def test_canonical_string_reads_like_the_network(family):
    arch, text = STRINGS[family]
    enc = SPACE.encode(arch)
    assert SPACE.to_string(enc) == text
    chex.assert_trees_all_equal(SPACE.from_string(text), enc)
    assert SPACE.decode(enc) == arch


def test_size_is_the_sum_over_families_and_stage_counts():
    # Options of one existing stage: width x kernel x expansion x activation x norm x skip.
    per_stage = {
        "mlp": 4 * 5 * 2 * 2, "cnn": 5 * 3 * 5 * 2 * 2,
        "resnet": 5 * 3 * 5 * 2, "mobilenet": 5 * 3 * 3 * 5 * 2,
    }
    # Stage 1 has 3 depths; stage 2 is absent (depth 0) or 3 depths; stage 3 likewise if stage 2 exists.
    stages = {f: 3 * s * (1 + 3 * s * (1 + 3 * s)) for f, s in per_stage.items()}
    assert SPACE.size() == 3 * sum(stages.values()) == 9_891_658_620


def test_choices_apply_only_to_their_families_and_existing_stages():
    for arch in (CNN, MLP, MOBILENET, RESNET):
        active = set(SPACE.decode(SPACE.encode(arch)))
        assert active == set(arch)
    assert "stage1.skip" not in RESNET and "stage1.expansion" not in CNN and "stage1.kernel" not in MLP


def test_crossover_only_mixes_parents_of_the_same_family():
    a, b = SPACE.encode(CNN), SPACE.encode(MOBILENET)
    assert not bool(SPACE.compatible(a, b))
    chex.assert_trees_all_equal(np.asarray(SPACE.crossover(jax.random.key(0), a, b)), a)
    other_cnn = SPACE.from_string("cnn|s1:d1,w16,k7,elu|s2:d3,w48,k5,silu,bn|s3:d2,w24,k3,gelu,skip|drop0.2")
    assert bool(SPACE.compatible(a, other_cnn))
    child = np.asarray(SPACE.crossover(jax.random.key(1), a, other_cnn))
    assert ((child == a) | (child == other_cnn)).all() and SPACE.decode(child)["family"] == "cnn"


def test_family_mutates_at_its_lower_rate():
    pop = np.broadcast_to(SPACE.encode(CNN), (4000, SPACE.n_choices))
    children = np.asarray(SPACE.mutate(jax.random.key(2), pop))
    changed = children != pop
    assert 0.04 < changed[:, SPACE.index("family")].mean() < 0.06  # family_mutation_rate 0.05
    assert 0.085 < changed[:, SPACE.index("stage1.activation")].mean() < 0.115  # mutation_rate 0.1
    # A stage that comes into being is drawn fresh: its widths are not stuck at the first option.
    new_stage3 = changed[:, SPACE.index("stage3.depth")]
    assert len(set(children[new_stage3, SPACE.index("stage3.channels")])) > 1


def test_typed_view_lists_existing_stages():
    view = MacroArch.from_encoding(SPACE, SPACE.encode(CNN))
    assert view == MacroArch(
        family="cnn",
        stages=(StageArch(2, 32, 5, None, "relu", True, True), StageArch(1, 64, 3, None, "gelu", False, False)),
        dropout=0.1,
    )
    mobilenet = MacroArch.from_encoding(SPACE, SPACE.encode(MOBILENET))
    assert [s.expansion for s in mobilenet.stages] == [6, 3, 1] and all(s.skip for s in mobilenet.stages)
    mlp = MacroArch.from_encoding(SPACE, SPACE.encode(MLP))
    assert mlp.stages == (StageArch(1, 256, None, None, "silu", False, False),)


def test_builder_arguments_shape_the_space():
    mlp_only = macro_space(families=("mlp",), max_stages=2, max_depth=2, units=(32, 64))
    assert mlp_only.names == (
        "family", "stage1.depth", "stage1.units", "stage1.activation", "stage1.norm", "stage1.skip",
        "stage2.depth", "stage2.units", "stage2.activation", "stage2.norm", "stage2.skip", "dropout",
    )
    assert mlp_only["stage1.depth"].options == (1, 2) and mlp_only["stage2.depth"].options == (0, 1, 2)
    assert mlp_only.size() == 3 * (2 * 40) * (1 + 2 * 40)
    with pytest.raises(ValueError, match="non-empty subset of"):
        macro_space(families=("mlp", "rnn"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cnn|s1:d2,w32,k5,relu", "expected 'family|s1:...|...|drop<rate>'"),
        ("cnn|s2:d2,w32,k5,relu|drop0.1", "stage 1 must start with 's1:'"),
        ("cnn|s1:d2,w32,k5,tanh|drop0.1", "unknown token 'tanh' in stage 1"),
        ("cnn|s1:d2,w32,relu|drop0.1", "'stage1.kernel' is missing.*allowed: 3, 5, 7"),
        ("resnet|s1:d2,w32,k3,relu,skip|drop0.1", "'stage1.skip' does not apply.*family in \\{mlp, cnn\\}"),
        ("mlp|s1:d2,w32,relu|drop0.1", "'stage1.units' has no option '32'; allowed: 64, 128, 256, 512"),
        ("rnn|s1:d2,w32,relu|drop0.1", "'family' has no option 'rnn'"),
        ("cnn|s1:d2,w32,k5,relu|drop0.5", "'dropout' has no option '0.5'"),
    ],
)
def test_from_string_rejects_malformed_strings_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        SPACE.from_string(text)
