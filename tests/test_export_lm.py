"""Portable export of a language model: the StableHLO file a search writes, and ONNX (attention and linear mixers;
the recurrent mixer is refused), give the loaded twin's logits for token ids [b, seq_len]; causal, so right padding
leaves the logits of the real tokens unchanged."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from interop.config import load_config
from jaxnas import load_model
from jaxnas.config import RunConfig
from jaxnas.export import ExportError, export_onnx, load_onnx, load_stablehlo
from jaxnas.search.export import export_model
from jaxnas.search.models import build_space, model_for

ROOT = Path(__file__).resolve().parents[1]
SPACE = ["space.max_layers=1", "space.hidden=[8]", "space.heads=[2]", "space.kv_heads=[1,2]", "space.ffn_mults=[1]",
         "space.lm_activations=[swiglu]"]
MIXERS = {"attention": ["space.mixers=[attention]", "space.positions=[alibi]"],
          "linear": ["space.mixers=[linear]", "space.positions=[rope]"],
          "recurrent": ["space.mixers=[recurrent]"]}
TEXT = {"name": "text:pydoc", "tokenizer": "bytes", "vocab_size": 256, "seq_len": 12}


@pytest.fixture(scope="module", params=sorted(MIXERS))
def lm_run(request, tmp_path_factory):
    """A run folder holding an exported language model, written by the code a search's end runs (`export_model`;
    tests/test_search_lm.py checks a real run writes the same files)."""
    cfg = load_config(RunConfig, ROOT / "configs" / "lm.yaml", [*SPACE, *MIXERS[request.param]])
    space = build_space(cfg.space)
    model = model_for(space, cfg.space, (TEXT["seq_len"],), TEXT["vocab_size"])
    enc = np.asarray(space.sample(jax.random.key(0), 1))[0]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                          model.init(jax.random.key(1)))
    out = tmp_path_factory.mktemp(request.param) / "run"
    export_model(out / "model", model, cfg.space, enc, params, None, {"text": TEXT})
    return out


def _tokens(n=3, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, t)).astype(np.int32)


def test_lm_run_writes_a_stablehlo_file_that_gives_the_twins_logits(lm_run):
    sidecar = json.loads((lm_run / "model" / "model.stablehlo.json").read_text())
    assert sidecar["input"]["shape"] == ["b", 12] and sidecar["input"]["dtype"] == "int32"
    assert sidecar["output"]["shape"] == ["b", 12, 256] and sidecar["vocab_size"] == 256
    assert sidecar["tokenizer"] == "bytes" and sidecar["arch"] == load_model(lm_run).arch
    model, exported = load_model(lm_run), load_stablehlo(lm_run)
    for batch in (1, 3):
        tokens = _tokens(batch)
        np.testing.assert_allclose(np.asarray(exported(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    # right padding: the logits of the first 5 tokens do not depend on what follows them
    tokens = _tokens(1)
    padded = tokens.copy()
    padded[:, 5:] = 0
    np.testing.assert_allclose(np.asarray(exported(padded))[:, :5], np.asarray(exported(tokens))[:, :5], atol=1e-5)


def test_lm_onnx_export_runs_in_onnxruntime_with_the_twins_logits(lm_run, tmp_path):
    if "mixer=recurrent" in load_model(lm_run).arch:  # its parallel form (an associative scan) has no ONNX op
        with pytest.raises(ExportError, match="jax2onnx could not convert .*mixer=recurrent.*use --format stablehlo"):
            export_onnx(lm_run, tmp_path)
        assert not list(tmp_path.iterdir())  # nothing half-written
        return
    path = export_onnx(lm_run, tmp_path)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["input"]["name"] == "tokens" and sidecar["input"]["dtype"] == "int32"
    tokens = _tokens(2, seed=1)
    np.testing.assert_allclose(load_onnx(path)(tokens), np.asarray(load_model(lm_run)(tokens)), rtol=1e-4,
                               atol=1e-4)
