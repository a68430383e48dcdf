"""Portable export (`jaxnas.export`): a search writes its winner as one StableHLO file that jax alone runs.

One tiny real search per family (an MLP, and a conv net with BatchNorm), shared by the tests below.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnas import load_model
from jaxnas.data import load_dataset
from jaxnas.export import load_stablehlo
from jaxnas.export.__main__ import main as export_main
from jaxnas.search.__main__ import main as search_main

TINY = [
    "data.name=digits", "mode=train", "search.strategy=random", "space.max_stages=1", "space.max_depth=1",
    "space.activations=[relu]", "space.dropouts=[0.0]", "space.batchnorm=[true]", "space.skip=[false]",
    "search.population=1", "search.budget=1", "train.epochs=1", "train.batch_size=64", "train.learning_rate=0.01",
    "final.top_k=1", "final.epochs=1", "final.seeds=1", "final.control=0", "final.baselines=[]", "progress=false",
]
FAMILIES = {
    "mlp": ["space.families=[mlp]", "space.units=[16]"],
    "cnn": ["space.families=[cnn]", "space.channels=[4]", "space.kernels=[3]"],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert search_main([f"output={out}", *TINY, *FAMILIES[request.param]]) == 0
    return out


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits").test.images


def _close(a, b) -> bool:
    return np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_search_writes_the_stablehlo_file_and_its_sidecar(run):
    model_dir = run / "model"
    assert (model_dir / "model.stablehlo").is_file() and (model_dir / "model.stablehlo").stat().st_size > 0
    sidecar = json.loads((model_dir / "model.stablehlo.json").read_text())
    final = json.loads((run / "best.json").read_text())["final"]
    assert sidecar["arch"] == final["arch"] == load_model(run).arch
    assert sidecar["input"]["shape"] == ["b", 8, 8, 1] and sidecar["input"]["dtype"] == "float32"
    assert sidecar["output"]["shape"] == ["b", 10] and sidecar["num_classes"] == 10
    assert sidecar["jax_version"] == jax.__version__ and "jax.export.deserialize" in sidecar["usage"]
    assert not list(model_dir.glob(".*.tmp"))  # written atomically: no temporaries left behind


def test_stablehlo_logits_equal_load_model_for_any_batch_size(run, images):
    model, exported = load_model(run), load_stablehlo(run / "model" / "model.stablehlo")
    assert run.parent.name.startswith(model.arch.split("|")[0])  # the family this run was meant to cover
    for n in (len(images), 7):  # the batch dimension is symbolic: one file serves both
        logits = np.asarray(exported(images[:n]))
        assert logits.shape == (n, 10)
        assert _close(logits, model(images[:n]))


def test_batchnorm_in_the_file_uses_the_running_statistics_of_the_eval_twin(run, images):
    model, exported = load_model(run), load_stablehlo(run)
    stats = nnx.to_flat_state(nnx.state(model.twin, nnx.BatchStat))
    if model.arch.startswith("mlp|"):
        assert not stats  # MLP stages have no BatchNorm: nothing more to check
        return
    assert len(stats) >= 2  # the conv winner has BatchNorm (space.batchnorm=[true])
    means = [np.asarray(v.get_value()) for path, v in stats if path[-1] == "mean"]
    assert any(np.abs(m).max() > 0 for m in means)  # the recalibrated statistics, not the initial zeros
    batch_mode = nnx.clone(model.twin)
    batch_mode.train()  # normalise with each batch's own statistics instead
    logits = np.asarray(exported(images))
    assert _close(logits, model.twin(images)) and not _close(logits, batch_mode(images))


ONLY_JAX = r"""
import sys
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
logits = exported.call(np.load(sys.argv[2]))
np.save(sys.argv[3], np.asarray(logits))
print(sorted({name.split(".")[0] for name in sys.modules} & {"jaxnas", "flax", "orbax", "interop"}))
"""


def test_the_file_runs_in_a_process_that_imports_only_jax(run, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    out = subprocess.run(
        [sys.executable, "-c", ONLY_JAX, str(run / "model" / "model.stablehlo"), "images.npy", "logits.npy"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"  # neither jaxnas nor flax (nor orbax) was imported
    assert _close(np.load(tmp_path / "logits.npy"), load_model(run)(images))


def test_cli_writes_to_output(run, images, tmp_path, capsys):
    target = tmp_path / "exports" / "digits.stablehlo"
    assert export_main([str(run), "--format", "stablehlo", "--output", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.is_file() and (tmp_path / "exports" / "digits.stablehlo.json").is_file()
    assert _close(load_stablehlo(target)(images[:5]), load_model(run)(images[:5]))


def test_cli_refuses_a_folder_without_a_model_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxnas.export", str(tmp_path), "--format", "stablehlo"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no exported model in {tmp_path}"), out.stderr
    assert "python -m jaxnas.search" in lines[0]  # says how such a folder is made


def test_cli_refuses_an_unknown_format_in_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path), "--format", "tflite"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "unknown --format 'tflite'; use --format stablehlo or --format onnx" in captured.err
