"""Zero-cost proxies against values computed by hand (numpy) on a tiny linear network (grad_norm, snip, synflow)
and a tiny MLP supernet (naswot), and on real supernets: masked weights take no part (the proxy of a subnet does
not depend on weights outside it)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.search import proxies
from jaxnas.search.models import SearchModel
from jaxnas.spaces import macro_space


def _linear(params, enc, x, *, train, key=None):
    """logits = x @ W * enc[0] + b: enc scales the weights, so two candidates differ."""
    return x @ (params["w"] * enc[0].astype(jnp.float32)) + params["b"]


def _by_hand(params, scale, x, y):
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = x @ (w * scale) + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(w.shape[1])[y]) / len(y)  # dL/dlogits of the mean cross-entropy
    gw, gb = scale * x.T @ delta, delta.sum(0)
    norm = np.sqrt((gw**2).sum() + (gb**2).sum())
    sensitivity = np.abs(w * gw).sum() + np.abs(b * gb).sum()
    return norm, sensitivity


def test_proxies_equal_hand_computed_values_on_a_linear_network():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    encs = np.array([[1], [2], [3]], np.int32)
    norms = proxies.score("grad_norm", _linear, params, encs, x, y, chunk=2)
    sens = proxies.score("snip", _linear, params, encs, x, y)
    for i, scale in enumerate((1, 2, 3)):
        norm, sensitivity = _by_hand(params, scale, x.astype(np.float64), y)
        assert float(norms[i]) == pytest.approx(norm, rel=1e-4)
        assert float(sens[i]) == pytest.approx(sensitivity, rel=1e-4)


def test_synflow_equals_its_hand_computed_value_on_a_linear_network():
    # R = sum(ones @ (|w| * s) + |b|), so dR/d|w| = s, dR/d|b| = 1 and synflow = s * sum|w| + sum|b|.
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    x = rng.normal(size=(8, 5)).astype(np.float32)
    values = proxies.score("synflow", _linear, params, np.array([[1], [2], [3]], np.int32), x, np.zeros(8, int))
    w, b = np.abs(np.asarray(params["w"], np.float64)), np.abs(np.asarray(params["b"], np.float64))
    for i, scale in enumerate((1, 2, 3)):
        assert float(values[i]) == pytest.approx(scale * w.sum() + b.sum(), rel=1e-5)


def _mlp_model():
    space = macro_space(families=("mlp",), max_stages=1, max_depth=2, units=(4, 8), activations=("relu",),
                        dropouts=(0.0,), norms=(False,), skips=(False,))
    return space, SearchModel(space, (4, 4, 1), 3)


def test_naswot_equals_the_hand_computed_kernel_of_the_candidates_own_units():
    """K[i, j] = units of the candidate on which inputs i and j have the same code (pre-activation > 0), only the
    candidate's units (width 4 of 8, one block of 2); score = log det K."""
    space, model = _mlp_model()
    params = model.init(jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (6, 4, 4, 1)))
    # family, depth (1 of 1/2), units, activation, norm, skip, dropout: option indices
    encs = np.array([[0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0]], np.int32)
    dense = params["mlp"]["stages"][0]
    w1, b1, w2, b2 = (np.asarray(dense[j]["dense"][v], np.float64) for j in (0, 1) for v in ("kernel", "bias"))
    h1 = x.reshape(6, 16).astype(np.float64) @ w1 + b1
    h2 = np.maximum(h1, 0) @ w2 + b2

    def kernel(*layers):
        codes = np.concatenate([z > 0 for z in layers], axis=1).astype(float)
        return codes @ codes.T + (1 - codes) @ (1 - codes).T

    expected = [kernel(h1[:, :4]), kernel(h1), kernel(h1, h2)]
    values = proxies.score_model("naswot", model, params, encs, x, np.zeros(6, int))
    for i, k in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(model.activation_kernel(params, jnp.asarray(encs[i]), x)), k)
        assert float(values[i]) == pytest.approx(np.linalg.slogdet(k)[1], rel=1e-4, abs=1e-4)


def test_unknown_proxy_is_refused_with_the_names():
    with pytest.raises(ValueError, match="grad_norm, snip, synflow, naswot"):
        proxies.score("zen", _linear, {}, np.zeros((1, 1), np.int32), np.zeros((1, 1)), np.zeros(1))


def test_naswot_is_refused_for_the_transformer_space_with_the_alternatives():
    from interop.config import ConfigError, load_config
    from jaxnas.config import RunConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "transformer.yaml"
    with pytest.raises((ConfigError, ValueError), match="grad_norm, snip or synflow"):
        load_config(RunConfig, config, ["search.prefilter=naswot"])


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_a_subnets_proxy_ignores_weights_outside_it(family):
    """Every proxy of the narrow subnet (16 units / 4 channels) is unchanged when the other units' weights change
    (BatchNorm on for the conv family: its identity statistics for synflow, batch statistics for the others)."""
    space = macro_space(families=(family,), max_stages=1, max_depth=1, units=(16, 32), channels=(4, 8), kernels=(3,),
                        activations=("relu",), dropouts=(0.0,), norms=(family != "mlp",), skips=(False,))
    model = SearchModel(space, (6, 6, 1), 3)
    params = model.init(jax.random.key(0))
    enc = np.zeros((1, len(space.names)), np.int32)  # every first option: the narrow width
    x = np.asarray(jax.random.normal(jax.random.key(1), (6, 6, 6, 1)))
    y = np.array([0, 1, 2, 0, 1, 2])
    changed = jax.tree.map(lambda a: a, params)
    if family == "mlp":
        dense = params["mlp"]["stages"][0][0]["dense"]
        changed["mlp"]["stages"][0][0]["dense"] = {"kernel": dense["kernel"].at[:, 16:].set(7.0),
                                                   "bias": dense["bias"].at[16:].set(7.0)}
    else:
        conv = params["conv"]["cnn"]["stages"][0][0]["conv"]
        changed["conv"]["cnn"]["stages"][0][0]["conv"] = {"kernel": conv["kernel"].at[..., 4:].set(7.0),
                                                         "bias": conv["bias"].at[4:].set(-7.0)}
    for name in proxies.PROXIES:
        a = proxies.score_model(name, model, params, enc, x, y)
        b = proxies.score_model(name, model, changed, enc, x, y)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
        assert np.isfinite(float(a[0])) and float(a[0]) > 0


PREFILTER = [
    "data.name=digits", "mode=train", "space.families=[mlp]", "space.max_stages=2", "space.max_depth=1",
    "space.units=[8,16,32]", "space.activations=[relu,gelu]", "space.dropouts=[0.0]", "search.strategy=random",
    "search.population=6", "search.budget=6", "train.epochs=1", "search.prefilter=snip", "search.prefilter_keep=0.5",
    "final.top_k=0", "progress=false",
]


def test_prefilter_trains_only_the_best_proxy_scores_of_each_generation(tmp_path):
    import csv
    import json

    from jaxnas.search.__main__ import main

    out = tmp_path / "run"
    assert main([f"output={out}", *PREFILTER]) == 0
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    trained = [r for r in rows if r["status"] in ("ok", "early_stopped")]
    filtered = [r for r in rows if r["status"] == "filtered"]
    assert len(trained) == summary["evaluations"] == 6  # filtered candidates cost no budget
    assert summary["filtered"] == len(filtered) > 0
    for g in {r["generation"] for r in filtered}:
        gen_new = [r for r in rows if r["generation"] == g and r["status"] in ("ok", "early_stopped", "filtered")]
        kept = [float(r["snip"]) for r in gen_new if r["status"] != "filtered"]
        dropped = [float(r["snip"]) for r in gen_new if r["status"] == "filtered"]
        assert len(kept) == -(-len(gen_new) // 2)  # ceil(keep x new candidates)
        assert min(kept) >= max(dropped)
        assert all(r["fitness"] == "-inf" for r in gen_new if r["status"] == "filtered")
        assert all(r["val_accuracy"] == "" for r in gen_new if r["status"] == "filtered")


def test_prefilter_is_refused_in_table_mode():
    from interop.config import ConfigError, load_config
    from jaxnas.config import RunConfig

    with pytest.raises((ConfigError, ValueError), match="prefilter"):
        load_config(RunConfig, Path(__file__).resolve().parents[1] / "configs" / "nb201_table.yaml", ["search.prefilter=snip"])
