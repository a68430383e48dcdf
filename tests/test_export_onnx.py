"""ONNX export (`jaxnas.export.export_onnx`): every space's twin converted by jax2onnx gives the same logits in
onnxruntime as in jax, for any batch size; the CLI writes a run's model and its sidecar.

The twins come from supernets with perturbed weights (so norms are not identities) and recalibrated BatchNorm
statistics, between them covering every block family, activation, norm, NB201 operation and transformer option.
"""

import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.config import SpaceConfig
from jaxnas.export import export_onnx, load_onnx
from jaxnas.export.__main__ import main as export_main
from jaxnas.search.export import LoadedModel, export_model, load_model
from jaxnas.search.models import build_space, model_for

IMAGE, CLASSES = (8, 8, 1), 5
ACTIVATIONS = ("relu", "gelu", "silu", "elu", "leaky_relu")


def _twins(cfg: SpaceConfig, pick):
    """[(arch, twin)] of the encodings ``pick(space, sampled)`` chooses, from a perturbed supernet of ``cfg``."""
    space = build_space(cfg)
    model = model_for(space, cfg, IMAGE, CLASSES)
    flat, unravel = jax.flatten_util.ravel_pytree(model.init(jax.random.key(0)))
    params = unravel(flat + 0.2 * jax.random.normal(jax.random.key(1), flat.shape))
    encs = np.asarray(pick(space, np.array(space.sample(jax.random.key(2), 256))))
    x_batches = jax.random.normal(jax.random.key(3), (2, 16, *IMAGE))
    stats = model.statistics(params, encs, x_batches, shared=True)
    out = []
    for i, enc in enumerate(encs):
        own = None if stats is None else jax.tree.map(lambda a, i=i: a[i], stats)
        _, twin = model.extract(params, enc, own)
        twin.eval()
        out.append((space.to_string(enc), twin))
    return out


def _macro(space, encs):
    """One architecture per family, activations spread over all of them."""
    chosen = []
    for family in ("mlp", "cnn", "resnet", "mobilenet"):
        rows = [e for e in encs if space.decode(e)["family"] == family]
        chosen.append(rows[len(chosen)])
    options = space["stage1.activation"].options
    for k, enc in enumerate(chosen):  # stage 1 of architecture k gets activation k
        enc[space.index("stage1.activation")] = options.index(ACTIVATIONS[k])
    chosen[0][space.index("stage2.depth")] = space["stage2.depth"].options.index(1)
    chosen[0][space.index("stage2.activation")] = options.index("leaky_relu")
    return np.asarray(space.canonicalize(jnp.asarray(np.stack(chosen))))


CASES = {
    "macro": (SpaceConfig(name="macro", max_stages=2, max_depth=2, channels=(4, 8), units=(16, 32), kernels=(1, 3, 5),
                          expansions=(1, 2), batchnorm=(True,), dropouts=(0.0,)), _macro),
    "nb201": (SpaceConfig(name="nb201", cells=1, cell_channels=4), lambda space, encs: encs[:2]),
    "transformer": (SpaceConfig(name="transformer", patch=4), lambda space, encs: encs[:2]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def twins(request):
    cfg, pick = CASES[request.param]
    return _twins(cfg, pick)


def test_onnx_logits_equal_jax_for_every_space_and_any_batch(twins, tmp_path):
    x = np.asarray(jax.random.normal(jax.random.key(4), (9, *IMAGE)))
    for k, (arch, twin) in enumerate(twins):
        meta = {"image_shape": list(IMAGE), "num_classes": CLASSES}
        path = export_onnx(LoadedModel(twin, arch, meta), tmp_path / f"m{k}.onnx")
        run = load_onnx(path)
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        assert sidecar["arch"] == arch and sidecar["input"]["shape"] == ["batch", *IMAGE]
        for n in (9, 2):  # the batch dimension is dynamic: one file serves both
            got = run(x[:n])
            assert got.shape == (n, CLASSES)
            np.testing.assert_allclose(got, np.asarray(twin(x[:n])), rtol=1e-4, atol=1e-4, err_msg=arch)
        assert not list(tmp_path.glob(".*.tmp"))


def test_cli_writes_a_runs_model_as_onnx_next_to_the_orbax_state(tmp_path, capsys):
    cfg, _ = CASES["nb201"]
    space = build_space(cfg)
    model = model_for(space, cfg, IMAGE, CLASSES)
    params = model.init(jax.random.key(0))
    enc = np.asarray(space.sample(jax.random.key(2), 1))[0]
    x_batches = jax.random.normal(jax.random.key(3), (2, 16, *IMAGE))
    stats = jax.tree.map(lambda a: a[0], model.statistics(params, enc[None], x_batches, shared=True))
    export_model(tmp_path / "run" / "model", model, cfg, enc, params, stats, {})  # what a search writes
    assert export_main([str(tmp_path / "run"), "--format", "onnx"]) == 0
    path = tmp_path / "run" / "model" / "model.onnx"
    assert capsys.readouterr().out.strip() == str(path) and path.with_name("model.onnx.json").is_file()
    images = np.asarray(jax.random.normal(jax.random.key(5), (6, *IMAGE)))
    np.testing.assert_allclose(load_onnx(tmp_path / "run")(images), load_model(tmp_path / "run")(images),
                               rtol=1e-4, atol=1e-4)


def test_onnx_without_its_packages_says_how_to_install_them_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax2onnx" else find_spec(name, *a))
    assert export_main([str(tmp_path), "--format", "onnx"]) == 2  # refused before the folder is even looked at
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "needs jax2onnx" in captured.err and "pip install --no-deps jax2onnx==0.17.1" in captured.err
    assert "--format stablehlo" in captured.err
