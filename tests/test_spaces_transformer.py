"""The transformer space: per-layer heads constrained to divide the hidden size, and its typed view."""

import chex
import jax
import numpy as np
import pytest

from jaxnas.spaces import TransformerArch, transformer_space

SPACE = transformer_space()
# Hidden sizes where the head constraint bites: 6 takes 1 or 2 heads, 8 any, 12 all but 8.
TIGHT = transformer_space(hidden=(6, 8, 12), heads=(1, 2, 4, 8))
P = 64


def test_size_counts_layers_and_per_layer_choices():
    # Every default hidden size divides by every head count: 4 heads x 3 FFN multipliers per layer.
    per_network = 4 * 2 * 3 * 3  # hidden, norm, activation, position
    assert SPACE.size() == per_network * sum(12**layers for layers in range(1, 7)) == 234_535_392


def test_operators_only_produce_head_counts_that_divide_the_hidden_size():
    keys = jax.random.split(jax.random.key(0), P)
    pop = TIGHT.sample(jax.random.key(1), P)
    mutated = jax.jit(jax.vmap(TIGHT.mutate))(keys, pop, np.ones(P, np.float32))
    crossed = jax.jit(jax.vmap(TIGHT.crossover))(keys, pop, mutated)
    views = [TransformerArch.from_encoding(TIGHT, e) for batch in (pop, mutated, crossed) for e in np.asarray(batch)]
    assert all(arch.hidden % h == 0 for arch in views for h in arch.heads)
    assert {arch.hidden for arch in views} == {6, 8, 12} and {h for a in views for h in a.heads} == {1, 2, 4, 8}


def test_changing_the_hidden_size_repairs_heads_to_the_nearest_that_divides():
    enc = TIGHT.encode({"layers": 1, "hidden": 8, "norm": "rmsnorm", "activation": "swiglu", "position": "rope",
                        "layer1.heads": 8, "layer1.ffn_mult": 2})
    by_hidden = {TIGHT.decode(n)["hidden"]: TIGHT.decode(n) for n in TIGHT.neighbours(enc)
                 if TIGHT.decode(n)["hidden"] != 8}
    assert by_hidden[6]["layer1.heads"] == 2 and by_hidden[12]["layer1.heads"] == 4


def test_typed_view_has_one_entry_per_layer():
    enc = SPACE.encode({"layers": 2, "hidden": 192, "norm": "layernorm", "activation": "gelu", "position": "alibi",
                        "layer1.heads": 4, "layer1.ffn_mult": 4, "layer2.heads": 8, "layer2.ffn_mult": 1})
    assert TransformerArch.from_encoding(SPACE, enc) == TransformerArch(
        layers=2, hidden=192, norm="layernorm", activation="gelu", position="alibi", heads=(4, 8), ffn_mult=(4, 1)
    )
    assert SPACE.to_string(enc) == (
        "layers=2;hidden=192;norm=layernorm;activation=gelu;position=alibi;"
        "layer1.heads=4;layer1.ffn_mult=4;layer2.heads=8;layer2.ffn_mult=1"
    )
    chex.assert_trees_all_equal(SPACE.from_string(SPACE.to_string(enc)), enc)


def test_heads_that_do_not_divide_the_hidden_size_are_rejected_with_the_rule():
    arch = {"layers": 1, "hidden": 6, "norm": "rmsnorm", "activation": "gelu", "position": "learned",
            "layer1.heads": 4, "layer1.ffn_mult": 1}
    with pytest.raises(ValueError, match=r"'layer1.heads' = 4 is not allowed with hidden = 6 \(the hidden size must be "
                                         r"divisible by the heads\); allowed here: 1, 2"):
        TIGHT.encode(arch)
    with pytest.raises(ValueError, match=r"'layer2\.heads' does not apply"):
        TIGHT.encode({**arch, "layer1.heads": 2, "layer2.heads": 1})


def test_builder_rejects_hidden_sizes_no_head_count_divides():
    with pytest.raises(ValueError, match="allow none of its options"):
        transformer_space(hidden=(6, 8), heads=(4, 8))
