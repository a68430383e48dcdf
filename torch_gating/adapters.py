"""Model adapters: one gating surface for the GPT-2 family and the Llama / Qwen2 family.

Like transformers' one-class-per-family pattern, :func:`adapter_for` picks the adapter for a model's
class; every adapter has the same surface::

    adapter = adapter_for(model)             # block = 64 neurons per selectable unit
    with adapter:                            # install(): each layer's MLP becomes a GatedMLP
        adapter.set_kept({3: [0, 1, 5], 7: None})   # per-layer kept blocks; None keeps all
        logits = model(ids).logits           # layer 3 computes 3 of its blocks
        with adapter.record([3, 7]) as probes:
            model(prompt_ids)
        probes[3]["unit_abs_mean"]           # [B, I]
    # remove(): the original MLP modules are back

Gating never permutes or modifies a weight: kept neurons are computed on views of the original weights,
or, with ``copy_weights``, on dense copies of the kept weights made for short (decode) forwards (see
:mod:`torch_gating.gated_mlp`). With nothing pruned the original MLPs run, so the logits are bit-identical,
installed or not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM

from torch_gating.gated_mlp import (
    PROBES,
    GatedGLUMLP,
    GatedGPT2MLP,
    GatedMLP,
    Kept,
    KeptBy,
    MLPProbe,
    kept_runs,
    validate_block,
)


class ModelAdapter(ABC):
    """Gating surface of one causal LM: its decoder layers' MLPs, kept sets, probes and sizes.

    Subclasses name where a family keeps its layers and modules. ``block`` is the number of consecutive
    intermediate neurons selected together (the alignment of every kept set). ``copy_weights``: gated
    layers compute on contiguous copies of their kept weights instead of views (faster at decode, costs
    memory while a kept set lasts; see :mod:`torch_gating.gated_mlp`).
    """

    gated_mlp_class: type[GatedMLP]
    # MLP weight matrices per kept neuron: MACs per token of one layer = matrices_per_unit * H * k.
    matrices_per_unit: int
    pre_mlp_norm: str

    def __init__(self, model: PreTrainedModel, *, block: int = 64, copy_weights: bool = False):
        self.model = model
        self.block = validate_block(block)
        self.copy_weights = copy_weights
        self._originals: list[nn.Module] | None = None

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The model's decoder layers, in order."""

    @abstractmethod
    def attention(self, layer: int) -> nn.Module:
        """Layer ``layer``'s self-attention module."""

    @property
    def hidden_size(self) -> int:
        """Width ``H`` of the residual stream."""
        return self.model.config.hidden_size

    @property
    @abstractmethod
    def mlp_width(self) -> int:
        """Intermediate width ``I`` of every MLP (neurons per layer)."""

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.decoder_layers())

    @property
    def installed(self) -> bool:
        """Whether the decoder layers currently hold :class:`GatedMLP` wrappers of this adapter."""
        return self._originals is not None

    def install(self) -> ModelAdapter:
        """Replace every decoder layer's MLP by a :class:`GatedMLP` sharing its modules; returns ``self``.

        Idempotent. Nothing is pruned until :meth:`set_kept`.
        """
        if self.installed:
            return self
        layers = self.decoder_layers()
        foreign = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, GatedMLP)]
        if foreign:
            raise RuntimeError(
                f"Layers {foreign} of this model already hold gated MLPs installed by another adapter. "
                "Call remove() on that adapter (or reuse it) before installing a new one."
            )
        self._originals = [layer.mlp for layer in layers]
        for layer, mlp in zip(layers, self._originals):
            layer.mlp = self.gated_mlp_class(
                mlp, hidden_size=self.hidden_size, width=self.mlp_width, block=self.block, copy_weights=self.copy_weights
            )
        return self

    def remove(self) -> None:
        """Put the original MLP modules back (their weights were never touched). Idempotent."""
        if not self.installed:
            return
        for layer, mlp in zip(self.decoder_layers(), self._originals):
            layer.mlp = mlp
        self._originals = None

    def __enter__(self) -> ModelAdapter:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def mlp(self, layer: int) -> GatedMLP:
        """The gated MLP of decoder layer ``layer`` (needs :meth:`install`)."""
        if not self.installed:
            raise RuntimeError(
                "The gated MLPs are not installed; call adapter.install() (or use `with adapter:`) first."
            )
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"Layer {layer} does not exist; this model has layers 0..{self.n_layers - 1}.")
        return self.decoder_layers()[layer].mlp

    def gated_mlps(self) -> list[GatedMLP]:
        """Every layer's gated MLP, in layer order (needs :meth:`install`)."""
        return [self.mlp(layer) for layer in range(self.n_layers)]

    def set_kept(self, kept: Mapping[int, Kept], *, by: KeptBy = "block") -> None:
        """Set the kept sets of the listed layers (``{layer: kept}``); other layers keep theirs.

        ``kept`` per layer is ``None`` (all) or increasing block indices (``by="block"``) or whole-block
        neuron indices (``by="unit"``); see :func:`torch_gating.gated_mlp.kept_runs`. Every layer is
        validated before any is changed, so a bad entry leaves the model as it was.
        """
        mlps = {layer: self.mlp(layer) for layer in kept}
        runs = {}
        for layer, layer_kept in kept.items():
            try:
                runs[layer] = kept_runs(layer_kept, width=self.mlp_width, block=self.block, by=by)
            except ValueError as err:
                raise ValueError(f"Layer {layer}: {err}") from None
        for layer, layer_runs in runs.items():
            mlps[layer].runs = layer_runs

    def reset(self) -> None:
        """Keep every neuron of every layer again."""
        for mlp in self.gated_mlps():
            mlp.runs = None

    def extra_memory_bytes(self) -> int:
        """Bytes gating holds beyond the model's weights: run lists, plus any dense copies of kept weights
        (``copy_weights``)."""
        return sum(mlp.extra_memory_bytes() for mlp in self.gated_mlps()) if self.installed else 0

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters, tied weights counted once."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @contextmanager
    def record(
        self,
        layers: Iterable[int],
        what: Iterable[str] = PROBES,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Record activation probes of ``layers`` during the forwards inside the ``with`` block.

        Yields ``{layer: values}``, filled by each forward (a later forward overwrites): ``values`` has
        ``"unit_abs_mean"`` ``[B, I]``, ``"hidden_in"`` ``[B, H]``, ``"mlp_out_norm"`` and ``"residual_norm"``
        ``[B]`` as selected by ``what`` (see :class:`torch_gating.gated_mlp.MLPProbe`). Token means skip
        the positions where ``attention_mask`` ``[B, T]`` (the model input's mask) is 0.

        Recorded layers compute their intermediate activations at full width (the evidence must cover
        every neuron) but still output their kept set's result. Needs :meth:`install`.
        """
        layers = sorted(set(layers))
        mlps = {layer: self.mlp(layer) for layer in layers}
        probes = {layer: MLPProbe(what, attention_mask) for layer in layers}
        hooks = []
        try:
            for layer, mlp in mlps.items():
                mlp.probe = probes[layer]
                norm = getattr(self.decoder_layers()[layer], self.pre_mlp_norm)
                hooks.append(norm.register_forward_pre_hook(_residual_hook(probes[layer])))
            yield {layer: probe.values for layer, probe in probes.items()}
        finally:
            for hook in hooks:
                hook.remove()
            for mlp in mlps.values():
                mlp.probe = None

    def n_kept(self, layer: int) -> int:
        """Kept neurons of ``layer`` now (all of them when not installed)."""
        return self.mlp(layer).n_kept if self.installed else self.mlp_width


def _residual_hook(probe: MLPProbe):
    def hook(module: nn.Module, args: tuple) -> None:
        probe.observe_residual(args[0])

    return hook


class GPT2Adapter(ModelAdapter):
    """``GPT2LMHeadModel`` (GPT-2, DistilGPT-2): ``transformer.h[i].mlp`` with Conv1D ``c_fc`` / ``c_proj``."""

    gated_mlp_class = GatedGPT2MLP
    matrices_per_unit = 2
    pre_mlp_norm = "ln_2"

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].attn

    @property
    def mlp_width(self) -> int:
        return self.model.config.n_inner or 4 * self.model.config.hidden_size


class LlamaAdapter(ModelAdapter):
    """``LlamaForCausalLM`` (SmolLM2) and ``Qwen2ForCausalLM``: ``model.layers[i].mlp`` gate / up / down."""

    gated_mlp_class = GatedGLUMLP
    matrices_per_unit = 3
    pre_mlp_norm = "post_attention_layernorm"

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].self_attn

    @property
    def mlp_width(self) -> int:
        return self.model.config.intermediate_size


ADAPTERS: dict[type[PreTrainedModel], type[ModelAdapter]] = {
    GPT2LMHeadModel: GPT2Adapter,
    LlamaForCausalLM: LlamaAdapter,
    Qwen2ForCausalLM: LlamaAdapter,
}


def adapter_for(model: PreTrainedModel, *, block: int = 64, copy_weights: bool = False) -> ModelAdapter:
    """The adapter of ``model``'s family (not yet installed); ``TypeError`` listing the supported classes."""
    for cls, adapter_cls in ADAPTERS.items():
        if isinstance(model, cls):
            return adapter_cls(model, block=block, copy_weights=copy_weights)
    supported = ", ".join(cls.__name__ for cls in ADAPTERS)
    raise TypeError(
        f"SeqGate has no adapter for {type(model).__name__}; supported model classes are {supported}. "
        "Load the model with AutoModelForCausalLM (or torch_gating.models.load_model) to get one of them."
    )


def mlp_macs_per_token(adapter: ModelAdapter, kept: Mapping[int, Kept] | None = None, *, by: KeptBy = "block") -> int:
    """MACs per token of all MLPs: ``sum_l m * H * k_l`` with ``m`` = 3 (gate/up/down) or 2 (GPT-2).

    ``k_l`` is layer ``l``'s kept neuron count: from ``kept`` (``{layer: kept}`` as in
    :meth:`ModelAdapter.set_kept`) for the layers it lists, else the layer's current kept set.
    Activation functions and the elementwise product are not counted (they are not MACs).
    """
    kept = kept or {}
    total = 0
    for layer in range(adapter.n_layers):
        if layer in kept:
            runs = kept_runs(kept[layer], width=adapter.mlp_width, block=adapter.block, by=by)
            n_kept = adapter.mlp_width if runs is None else sum(e - s for s, e in runs)
        else:
            n_kept = adapter.n_kept(layer)
        total += adapter.matrices_per_unit * adapter.hidden_size * n_kept
    return total


def attention_macs_per_token(adapter: ModelAdapter) -> int:
    """MACs per token of the attention projections (Q, K, V, O): the element count of their weights.

    The score and value products (``Q K^T``, ``A V``) are left out: they grow with the context length.
    """
    return sum(
        param.numel()
        for layer in range(adapter.n_layers)
        for param in adapter.attention(layer).parameters()
        if param.dim() == 2
    )


def lm_head_macs_per_token(adapter: ModelAdapter) -> int:
    """MACs per token of the output projection: ``H * vocab``."""
    return adapter.model.get_output_embeddings().weight.numel()


def model_macs_per_token(adapter: ModelAdapter, kept: Mapping[int, Kept] | None = None, *, by: KeptBy = "block") -> int:
    """MACs per token of the whole model: MLPs (at ``kept``, see :func:`mlp_macs_per_token`), attention
    projections and LM head. Norms, embeddings lookups and attention score products are not counted.
    """
    mlps = mlp_macs_per_token(adapter, kept, by=by)
    return mlps + attention_macs_per_token(adapter) + lm_head_macs_per_token(adapter)
