"""SeqGate: the per-sequence gating policy of a frozen causal LM (ExNAS's promise, built for real).

For every sequence (a perplexity window, a prefill window, or a prompt before generation):

1. **Probe.** The first ``probe_tokens`` tokens run through the model at full width, with a KV cache,
   while the adapter records the gated layers and the sentinel layer.
2. **Decision.** The sentinel's ratio ``r = mlp_out_norm / residual_norm`` (token means over the probe;
   a true ratio: how much the sentinel MLP writes relative to the residual stream it adds to) is
   compared with the calibrated threshold: gate iff ``r <= tau``.
3. **Selection** (only when gating). Current evidence per gated layer and block: the probe's mean
   |intermediate activation| of each neuron times the L2 norm of its down-projection column, summed
   over the block's neurons. Memory evidence: the probe layers' mean MLP inputs are fingerprinted
   (``Fingerprinter``, d = 64, one projection per layer, combined), the top-K = 16 most similar
   calibration sequences are retrieved, and their whole-sequence block scores averaged by similarity.
   :class:`~interop.selector.TransversalSelector` mixes both (``wcur`` / ``wmem``, rank-normalised per
   layer), and :class:`~interop.budget.BudgetController` turns the scores into kept blocks under ``bl``
   (per layer) and ``Bg`` (over all gated layers' blocks), counts aligned to ``align`` neurons.
4. **Rest.** The remaining tokens (of the window, of the prompt and the whole generation) run on the
   kept sets, reusing the probe's KV cache.

Everything above happens inside :meth:`SeqGatePolicy.forward`, :meth:`prefill` and :meth:`generate`,
so a timer around them includes the probe and the decision. A policy that never gates (``tau = -inf``,
where guardrail enforcement ends when nothing else holds) skips the probe and runs the plain model, so it
costs nothing over the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from interop import BudgetController, ExperienceMemory, Fingerprinter, TransversalSelector
from torch_gating.adapters import ModelAdapter
from torch_gating.gated_mlp import GatedGPT2MLP, n_blocks
from torch_gating.kv_cache import cache_of, forward_cached

FINGERPRINT_DIM = 64
TOP_K = 16


def layer_key(layer: int) -> str:
    """The name of decoder layer ``layer`` in selector / budget / memory-payload dicts."""
    return f"mlp.{layer}"


@torch.no_grad()
def down_column_norms(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    """``[I]`` float32: the L2 norm of each neuron's down-projection column (its output weight vector).

    A neuron's contribution to the MLP output is its activation times this column, so
    ``mean|activation| * column norm`` estimates how much the output moves without it.
    """
    mlp = adapter.mlp(layer)
    if isinstance(mlp, GatedGPT2MLP):
        return mlp.c_proj.weight.float().norm(dim=1)  # Conv1D weight [I, H]
    return mlp.down_proj.weight.float().norm(dim=0)  # Linear weight [H, I]


def block_sums(unit_values: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., I]`` per-neuron values -> ``[..., n_blocks]`` sums over each aligned block of ``block`` neurons."""
    width = unit_values.shape[-1]
    pad = n_blocks(width, block) * block - width
    padded = torch.nn.functional.pad(unit_values, (0, pad))
    return padded.reshape(*unit_values.shape[:-1], -1, block).sum(dim=-1)


@dataclass
class Probe:
    """What the full-width probe of one sequence (batch 1) leaves behind.

    ``logits`` ``[1, P, V]``; ``cache`` the KV cache of the ``P`` probe tokens; per recorded layer:
    ``evidence`` ``[n_blocks]`` (block scores, see the module docstring), ``hidden_in`` ``[H]`` (mean MLP
    input), ``ratio`` (mlp_out_norm / residual_norm, a float).
    """

    logits: torch.Tensor
    cache: object
    evidence: dict[int, torch.Tensor]
    hidden_in: dict[int, torch.Tensor]
    ratio: dict[int, float]


@dataclass
class Decision:
    """The policy's choice for one sequence of ``n_tokens`` tokens whose first ``n_probe`` were the probe.

    ``kept`` maps each gated layer to its kept block indices (``None``: the sequence is not gated);
    ``ratio`` is the sentinel's probe ratio. Only the ``n_tokens - n_probe`` tokens after the probe run
    on the kept sets.
    """

    ratio: float
    kept: dict[int, list[int]] | None
    n_tokens: int
    n_probe: int

    @property
    def gated(self) -> bool:
        return self.kept is not None


@dataclass
class SeqGatePolicy:
    """A calibrated SeqGate policy bound to an installed adapter (see the module docstring).

    ``gated_layers`` are decoder-layer indices (need not be consecutive); ``sentinel`` is the layer whose
    ratio decides; ``tau`` the threshold (``-inf`` never gates); ``bl`` / ``Bg`` fractions of blocks;
    ``align`` in neurons (a multiple of the adapter's block); ``memory`` holds payloads named by
    :func:`layer_key` (``None``: current evidence only). Every decision made is appended to
    :attr:`decisions` when :attr:`log_decisions` is set.
    """

    adapter: ModelAdapter
    gated_layers: list[int]
    sentinel: int
    tau: float
    bl: float = 0.12
    Bg: float = 0.06
    align: int = 64
    probe_tokens: int = 64
    memory: ExperienceMemory | None = None
    wcur: float = 0.8
    wmem: float = 0.2
    fingerprint_seed: int = 0
    log_decisions: bool = False
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self):
        if not self.adapter.installed:
            raise RuntimeError("SeqGatePolicy needs an installed adapter: call adapter.install() first.")
        if not self.gated_layers:
            raise ValueError("gated_layers is empty; name at least one decoder layer to gate.")
        if self.align % self.adapter.block:
            raise ValueError(
                f"align={self.align} neurons is not a multiple of the adapter's block of {self.adapter.block}; "
                f"use a multiple such as {self.adapter.block} or {2 * self.adapter.block}."
            )
        if self.probe_tokens < 1:
            raise ValueError(f"probe_tokens must be >= 1, got {self.probe_tokens}.")
        self.gated_layers = sorted(set(self.gated_layers))
        self.probe_layers = sorted(set(self.gated_layers) | {self.sentinel})
        self.selector = TransversalSelector([layer_key(l) for l in self.gated_layers], self.wcur, self.wmem)
        self._col_norms: dict[int, torch.Tensor] = {}
        hidden = self.adapter.hidden_size
        self._fingerprinters = {
            l: Fingerprinter(hidden, FINGERPRINT_DIM, seed=self.fingerprint_seed + l) for l in self.gated_layers
        }

    @property
    def model(self):
        return self.adapter.model

    def budget(self) -> BudgetController:
        """The budget controller in block units: ``align`` neurons = ``align / block`` blocks."""
        return BudgetController(self.bl, self.Bg, align=self.align // self.adapter.block)

    @torch.no_grad()
    def probe(self, probe_ids: torch.Tensor, layers: list[int] | None = None, *, logits_to_keep: int = 0) -> Probe:
        """Run ``probe_ids`` ``[1, P]`` at full width with a KV cache, recording ``layers``.

        ``layers`` defaults to the gated layers and the sentinel; calibration records every layer to
        choose the sentinel. ``logits_to_keep`` as in transformers (0: all ``P``; prefill and generation
        need only the last, and computing the others would bill the LM head to SeqGate's timing).
        """
        layers = self.probe_layers if layers is None else layers
        self.adapter.reset()
        with self.adapter.record(layers) as rec:
            out = self.model(input_ids=probe_ids, use_cache=True, logits_to_keep=logits_to_keep)
        evidence, hidden_in, ratio = {}, {}, {}
        for l in layers:
            values = rec[l]
            evidence[l] = self.block_scores(l, values["unit_abs_mean"][0])
            hidden_in[l] = values["hidden_in"][0]
            ratio[l] = float(values["mlp_out_norm"][0] / values["residual_norm"][0].clamp_min(1e-12))
        return Probe(out.logits, cache_of(out), evidence, hidden_in, ratio)

    def block_scores(self, layer: int, unit_abs_mean: torch.Tensor) -> torch.Tensor:
        """``[n_blocks]`` block scores from one layer's mean |activation| per neuron ``[I]``:
        ``sum over the block of mean|activation| * down-column norm``."""
        if layer not in self._col_norms:
            self._col_norms[layer] = down_column_norms(self.adapter, layer)
        return block_sums(unit_abs_mean * self._col_norms[layer], self.adapter.block)

    def fingerprint(self, probe: Probe) -> torch.Tensor:
        """``[64]`` unit vector: the gated layers' mean MLP inputs over the probe, projected per layer
        (one seeded projection each) and combined."""
        fps = [self._fingerprinters[l](probe.hidden_in[l][None, None, :])[0] for l in self.gated_layers]
        return Fingerprinter.combine(fps)

    def select(self, probe: Probe, *, memory: ExperienceMemory | None = None, Bg: float | None = None) -> dict[int, list[int]]:
        """Kept block indices per gated layer from the probe's evidence (and ``memory``'s, if given).

        ``Bg`` overrides the policy's global budget (calibration tries several levels).
        """
        current = {layer_key(l): probe.evidence[l] for l in self.gated_layers}
        memory_evidence = None
        if memory is not None and len(memory):
            retrieval = memory.query(self.fingerprint(probe), k=TOP_K)
            memory_evidence = {
                layer_key(l): memory.payload_evidence(layer_key(l), retrieval).to(probe.evidence[l].dtype)
                for l in self.gated_layers
            }
        return self._kept(self.selector.scores(current, memory_evidence), Bg)

    def static_kept(self, importance: dict[int, torch.Tensor]) -> dict[int, list[int]]:
        """Static pruning at this policy's budgets: kept blocks per gated layer from fixed block scores
        (``importance[layer]`` ``[n_blocks]``, e.g. the calibrated static importance), scored and budgeted
        exactly as :meth:`select` scores a probe's evidence without memory. One kept set for every sequence."""
        return self._kept(self.selector.scores({layer_key(l): importance[l] for l in self.gated_layers}), None)

    def _kept(self, scores: dict[str, torch.Tensor], Bg: float | None) -> dict[int, list[int]]:
        controller = self.budget() if Bg is None else BudgetController(self.bl, Bg, align=self.align // self.adapter.block)
        kept = controller.select(scores)
        return {l: kept[layer_key(l)].tolist() for l in self.gated_layers}

    def decide(self, probe: Probe, n_tokens: int) -> Decision:
        """Gate iff the sentinel ratio is at most ``tau``; if so, select the kept blocks (with memory).

        ``n_tokens`` is the length of the whole sequence the probe starts (for the MACs accounting).
        """
        ratio = probe.ratio[self.sentinel]
        kept = self.select(probe, memory=self.memory) if ratio <= self.tau else None
        decision = Decision(ratio, kept, n_tokens, probe.cache.get_seq_length())
        if self.log_decisions:
            self.decisions.append(decision)
        return decision

    def apply(self, decision: Decision) -> None:
        """Set the adapter's kept sets for ``decision`` (every layer full width if not gated)."""
        self.adapter.reset()
        if decision.gated:
            self.adapter.set_kept(decision.kept, by="block")

    @property
    def never_gates(self) -> bool:
        """Whether no ratio can pass the threshold (``tau = -inf``): then no sequence is probed."""
        return self.tau == -math.inf

    def _ungated(self, n_tokens: int) -> None:
        """Log the decision of a policy that never gates (no probe: ratio NaN, no probe tokens)."""
        if self.log_decisions:
            self.decisions.append(Decision(math.nan, None, n_tokens, 0))

    @torch.no_grad()
    def forward_one(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, L, V]`` of one sequence ``[1, L]``: probe logits from the full model, the rest gated."""
        if self.never_gates:
            self._ungated(ids.shape[1])
            return self.model(input_ids=ids, use_cache=False).logits
        n_probe = min(self.probe_tokens, ids.shape[1])
        probe = self.probe(ids[:, :n_probe])
        if n_probe == ids.shape[1]:
            return probe.logits
        self.apply(self.decide(probe, ids.shape[1]))
        try:
            rest = forward_cached(self.model, ids[:, n_probe:], probe.cache).logits
        finally:
            self.adapter.reset()
        return torch.cat([probe.logits, rest], dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``forward(ids [B, L]) -> logits [B, L, V]`` for ``sliding_window_ppl``; one decision per row."""
        return torch.cat([self.forward_one(ids[row : row + 1]) for row in range(ids.shape[0])], dim=0)

    @torch.no_grad()
    def prefill(self, windows: torch.Tensor) -> int:
        """Prefill each window ``[n, L]`` (probe, decision, gated rest; last-token logits only).

        The gating counterpart of :func:`torch_gating.timing.prefill_workload`; returns ``n * L`` tokens.
        """
        for row in range(windows.shape[0]):
            ids = windows[row : row + 1]
            if self.never_gates:
                self._ungated(ids.shape[1])
                self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                continue
            n_probe = min(self.probe_tokens, ids.shape[1])
            probe = self.probe(ids[:, :n_probe], logits_to_keep=1)
            if n_probe < ids.shape[1]:
                self.apply(self.decide(probe, ids.shape[1]))
                forward_cached(self.model, ids[:, n_probe:], probe.cache, logits_to_keep=1)
                self.adapter.reset()
        return windows.numel()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy generation (batch 1, KV cache) with the decision taken on the prompt's first tokens.

        The rest of the prompt and every generated token run on the kept sets. Returns the generated
        ids ``[new_tokens]`` (no EOS stop, so both timing arms produce the same number of tokens).
        """
        ids = prompt_ids.reshape(1, -1)
        try:
            if self.never_gates:
                self._ungated(ids.shape[1] + new_tokens)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                n_probe = min(self.probe_tokens, ids.shape[1] - 1)
                probe = self.probe(ids[:, :n_probe], logits_to_keep=1)
                self.apply(self.decide(probe, ids.shape[1] + new_tokens))
                out = forward_cached(self.model, ids[:, n_probe:], probe.cache, logits_to_keep=1)
            generated = []
            for step in range(new_tokens):
                next_id = out.logits[:, -1].argmax(dim=-1)
                generated.append(next_id)
                if step + 1 == new_tokens:
                    break
                out = forward_cached(self.model, next_id[:, None], cache_of(out))
        finally:
            self.adapter.reset()
        return torch.cat(generated)

