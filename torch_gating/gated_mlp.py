"""Gated MLPs: a decoder layer's MLP computed on a kept subset of its intermediate neurons.

The unit of selection is an aligned *block* of ``block`` consecutive intermediate neurons in the
model's original order (the last block is shorter when the width is not a multiple of ``block``). A kept
set is a union of blocks, stored as a few contiguous *runs* ``((start, stop), ...)`` of neuron indices.
Each run is computed on views of the original weight tensors, so:

- FLOPs shrink with the kept fraction (dense matmuls on smaller operands, never a mask);
- switching kept sets copies no weights (``set_kept`` only stores the runs);
- nothing is permuted in place, and the full kept set calls the original module's own ``forward``, so
  an unpruned model's logits are bit-identical to the unmodified model's.

The views are zero-copy for matmul: a run of ``down_proj`` (``W[:, s:e]``, row stride ``I``) and of
GPT-2's ``c_fc`` (Conv1D ``W[:, s:e]``) are strided matrices that BLAS reads through its leading
dimension, so the weight is never made contiguous.

Dense copies (``copy_weights=True``). At one token per forward (decode) the per-run kernels on views save
little, while over a window of tokens they save roughly in proportion to the kept fraction. With
``copy_weights``, forwards of at most :data:`COPY_MAX_TOKENS` tokens (decode steps) run on contiguous copies
of the kept rows / columns in the original layout, one dense matmul per projection; longer forwards
(prefill) keep using views, where making the copy would cost more than it saves. A copy is made at the
first short forward of a kept set and lives as long as the kept set (changing ``runs`` drops it, so a
per-sequence policy pays for its copies on every sequence); :meth:`GatedMLP.extra_memory_bytes` counts it.
Recording (probes) always uses views.

Cost model: each run is a handful of small kernels (gate, up, activation, product, down accumulation).
For a prefill of hundreds of tokens their fixed cost is negligible and time falls with the kept
fraction; at decode (one token per forward) it is comparable to a run's matmul, so a kept set made of
few runs is faster than a scattered one of the same size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

Runs = tuple[tuple[int, int], ...]
KeptBy = Literal["block", "unit"]
# A kept set: None (everything) or increasing block / neuron indices.
Kept = Sequence[int] | np.ndarray | torch.Tensor | None
# One run is stored as two Python ints; counted as two int64 so the reported overhead is an upper bound.
BYTES_PER_RUN = 16
PROBES = ("unit_abs_mean", "hidden_in", "mlp_out")
# With copy_weights, forwards of at most this many tokens use the dense copy (see the module docstring).
COPY_MAX_TOKENS = 8


def validate_block(block: int) -> int:
    """``block`` itself if it is a usable block size (a positive int), else ``ValueError``."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive number of neurons (e.g. 64 or 128); got {block!r}.")
    return block


def n_blocks(width: int, block: int) -> int:
    """Number of aligned blocks of ``block`` neurons in a layer of ``width`` neurons (last may be shorter)."""
    return -(-width // block)


def kept_runs(kept: Kept, *, width: int, block: int, by: KeptBy = "block") -> Runs | None:
    """Validate a kept set and turn it into contiguous neuron runs ``((start, stop), ...)``.

    ``kept`` is ``None`` (keep everything) or a 1-D, strictly increasing integer array of kept block
    indices (``by="block"``, each in ``[0, n_blocks)``) or of kept neuron indices (``by="unit"``, each in
    ``[0, width)``, a union of whole blocks). Returns ``None`` when every block is kept (the caller then
    runs the original computation), else the runs in increasing order (``()`` when nothing is kept).
    Raises ``ValueError`` saying what was wrong and what is expected.
    """
    if kept is None:
        return None
    if by not in ("block", "unit"):
        raise ValueError(
            f"by={by!r} is not a kept-set kind; expected 'block' (block indices) or 'unit' (neuron indices)."
        )
    values = _as_index_array(kept, by)
    blocks = n_blocks(width, block)
    limit = blocks if by == "block" else width
    if values.size and (values[0] < 0 or values[-1] >= limit):
        bad = values[(values < 0) | (values >= limit)]
        raise ValueError(
            f"Kept {by} indices {bad[:5].tolist()} are out of range; this layer has {limit} {by}s "
            f"(width {width}, block {block}), so indices must lie in [0, {limit})."
        )
    if by == "unit":
        values = _blocks_of_units(values, width, block)
    if values.size == blocks:
        return None
    # Consecutive block indices merge into one run: a new run starts wherever the index jumps.
    starts = np.flatnonzero(np.diff(values, prepend=-2) != 1)
    stops = np.append(starts[1:], values.size)
    return tuple(
        (int(values[first]) * block, min(int(values[last - 1] + 1) * block, width))
        for first, last in zip(starts, stops)
    )


def _as_index_array(kept: Kept, by: KeptBy) -> np.ndarray:
    """``kept`` as a 1-D int64 numpy array, checked to be strictly increasing."""
    values = kept.detach().cpu().numpy() if isinstance(kept, torch.Tensor) else np.asarray(kept)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if values.ndim != 1 or values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"A kept set must be a 1-D array of integer {by} indices; got shape {values.shape} of dtype "
            f"{values.dtype}. Pass e.g. [0, 1, 5] (or None to keep everything); convert a boolean mask "
            "with numpy.flatnonzero(mask)."
        )
    values = values.astype(np.int64)
    steps = np.diff(values)
    if (steps <= 0).any():
        at = int(np.flatnonzero(steps <= 0)[0])
        what = "duplicated" if steps[at] == 0 else "out of order"
        raise ValueError(
            f"Kept {by} indices must be strictly increasing; {values[at:at + 2].tolist()} at positions "
            f"{at}, {at + 1} are {what}. Pass numpy.unique(kept) to sort and deduplicate."
        )
    return values


def _blocks_of_units(units: np.ndarray, width: int, block: int) -> np.ndarray:
    """The block indices whose neurons are exactly ``units``; ``ValueError`` naming a partial block."""
    blocks, counts = np.unique(units // block, return_counts=True)
    sizes = np.minimum((blocks + 1) * block, width) - blocks * block
    partial = np.flatnonzero(counts != sizes)
    if partial.size:
        b = int(blocks[partial[0]])
        raise ValueError(
            f"Kept neuron indices must be a union of whole blocks of {block}; block {b} (neurons "
            f"{b * block}..{min((b + 1) * block, width) - 1}) is only partly kept ({int(counts[partial[0]])} of "
            f"{int(sizes[partial[0]])} neurons). Keep all or none of each block, or pass block indices with by='block'."
        )
    return blocks


class MLPProbe:
    """Activation statistics of one gated layer, collected during a forward (see ``ModelAdapter.record``).

    ``what`` selects among :data:`PROBES`; after a forward, :attr:`values` holds (float tensors, detached):

    - ``"unit_abs_mean"``: ``[B, I]`` mean over tokens of |intermediate activation| per neuron, at full width
      (``act(gate(x)) * up(x)`` for Llama / Qwen2, ``act(c_fc(x))`` for GPT-2);
    - ``"hidden_in"``: ``[B, H]`` mean over tokens of the MLP input (the normalised hidden state);
    - ``"mlp_out"`` gives two entries: ``"mlp_out_norm"`` ``[B]``, the mean over tokens of the L2 norm of
      the MLP output, and ``"residual_norm"`` ``[B]``, the same for the residual stream entering the MLP's
      block (the input of the pre-MLP layer norm); their quotient is a true output/residual ratio.

    Means run over the tokens where ``attention_mask`` ``[B, T]`` is nonzero (all tokens if ``None``). A
    later forward in the same recording overwrites the values.
    """

    def __init__(self, what: Iterable[str], attention_mask: torch.Tensor | None = None):
        self.what = frozenset(what)
        unknown = self.what - set(PROBES)
        if unknown:
            raise ValueError(f"Unknown probes {sorted(unknown)}; choose among {list(PROBES)}.")
        self.attention_mask = attention_mask
        self.values: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe_residual(self, residual: torch.Tensor) -> None:
        """Record the residual stream ``[B, T, H]`` entering the pre-MLP norm."""
        if "mlp_out" in self.what:
            self.values["residual_norm"] = self._token_mean(residual.norm(dim=-1, keepdim=True))[:, 0]

    @torch.no_grad()
    def observe(self, x: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """Record MLP input ``x`` ``[B, T, H]``, full intermediate ``hidden`` ``[B, T, I]``, output ``[B, T, H]``."""
        if "unit_abs_mean" in self.what:
            self.values["unit_abs_mean"] = self._token_mean(hidden.abs())
        if "hidden_in" in self.what:
            self.values["hidden_in"] = self._token_mean(x)
        if "mlp_out" in self.what:
            self.values["mlp_out_norm"] = self._token_mean(out.norm(dim=-1, keepdim=True))[:, 0]

    def _token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, D]`` float: mean over the tokens the attention mask marks as real."""
        values = values.float()
        mask = self.attention_mask
        if mask is None:
            return values.mean(dim=1)
        if mask.shape != values.shape[:2]:
            raise ValueError(
                f"The recording's attention_mask has shape {tuple(mask.shape)}, but this forward has "
                f"[batch, tokens] = {list(values.shape[:2])}. Pass the mask of exactly the tokens fed to the "
                "model in this forward (for a KV-cache step, its last columns)."
            )
        weights = mask.to(values.device, values.dtype).unsqueeze(-1)
        return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class GatedMLP(nn.Module, ABC):
    """A decoder layer's MLP that computes only its kept neuron runs, on views of the original weights.

    Subclasses give the family's layout. The wrapper registers the original MLP's children under their
    own names (so ``state_dict`` keys and parameter storage are unchanged) and keeps the original module
    itself unregistered, to call its ``forward`` when every neuron is kept.

    Input and output ``[B, T, H]``; the intermediate width is ``I`` (:attr:`width`).
    """

    def __init__(self, original: nn.Module, *, hidden_size: int, width: int, block: int, copy_weights: bool = False):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        # Not a submodule: registering it would duplicate every parameter under a second name.
        self.__dict__["original"] = original
        self.hidden_size = hidden_size
        self.width = width
        self.block = validate_block(block)
        self.copy_weights = copy_weights
        # Per-run weight views (or one dense copy) and the (runs, weight placement) they were made for; see _views.
        self._cached_views: tuple[tuple, list[tuple]] | None = None
        self.runs = None
        # Set by ModelAdapter.record for the duration of a recording; see GatedMLP.forward.
        self.probe: MLPProbe | None = None

    @property
    def runs(self) -> Runs | None:
        """The kept runs ``((start, stop), ...)``, or ``None`` (every neuron kept)."""
        return self._runs

    @runs.setter
    def runs(self, runs: Runs | None) -> None:
        if self._cached_views is not None and self._cached_views[0][0] != runs:
            self._cached_views = None  # dense copies live only as long as their kept set
        self._runs = runs

    @property
    def n_blocks(self) -> int:
        """Number of selectable blocks in this layer."""
        return n_blocks(self.width, self.block)

    def set_kept(self, kept: Kept, *, by: KeptBy = "block") -> None:
        """Keep only the given blocks (``by="block"``) or whole-block neurons (``by="unit"``); ``None`` keeps all.

        Stores the contiguous runs only: no weight is copied, so this is cheap enough to call per sequence.
        See :func:`kept_runs` for the accepted forms and the errors raised.
        """
        self.runs = kept_runs(kept, width=self.width, block=self.block, by=by)

    @property
    def kept_units(self) -> torch.Tensor:
        """The kept neuron indices, ``[k]`` int64, increasing."""
        runs = ((0, self.width),) if self.runs is None else self.runs
        return torch.cat([torch.arange(s, e) for s, e in runs]) if runs else torch.zeros(0, dtype=torch.int64)

    @property
    def n_kept(self) -> int:
        """Number of kept neurons ``k``."""
        return self.width if self.runs is None else sum(e - s for s, e in self.runs)

    @property
    def kept_fraction(self) -> float:
        """``k / I``, the fraction of intermediate neurons computed (1.0 when nothing is pruned)."""
        return self.n_kept / self.width

    def extra_memory_bytes(self) -> int:
        """Bytes this wrapper holds beyond the original weights: its run list, plus the dense copies of the
        kept weights when ``copy_weights`` is set and they exist.

        Views allocate no tensor storage: the cached per-run views are tensor headers over the original
        weights' storage.
        """
        copies = 0
        if self._cached_views is not None and self._cached_views[0][2]:
            shared = {p.untyped_storage().data_ptr() for p in self.parameters()}
            copies = sum(t.numel() * t.element_size() for t in self._cached_views[1][0]
                         if t is not None and t.untyped_storage().data_ptr() not in shared)
        return BYTES_PER_RUN * len(self.runs or ()) + copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MLP output ``[B, T, H]`` for input ``[B, T, H]`` at the current kept set.

        While a recording is active (``self.probe`` set by ``ModelAdapter.record``) the intermediate
        activations are computed at full width, because the probe's evidence must cover every neuron;
        the output is still the kept set's.
        """
        if self.probe is not None:
            return self._forward_probed(x)
        if self.runs is None:
            return self.original(x)
        x2d = x.reshape(-1, x.shape[-1])
        out = None
        for views in self._views(x2d.shape[0]):
            out = self._down_run(self._hidden_run(x2d, views), views, out)
        if out is None:
            out = self._down_none(x2d)
        return self._finish(out.view(*x.shape[:-1], out.shape[-1]))

    def _forward_probed(self, x: torch.Tensor) -> torch.Tensor:
        """Full-width intermediate ``[B, T, I]`` for the probe, then the kept runs' down projection."""
        hidden = self._hidden_full(x)
        if self.runs is None:
            out = self._down_full(hidden)
        else:
            h2d = hidden.reshape(-1, self.width)
            out2d = None
            for start, stop in self.runs:
                views = self._run_views(start, stop)
                out2d = self._down_run(h2d[:, start:stop], views, out2d)
            if out2d is None:
                out2d = self._down_none(h2d)
            out = self._finish(out2d.view(*x.shape[:-1], out2d.shape[-1]))
        self.probe.observe(x, hidden, out)
        return out

    def _views(self, n_tokens: int = 0) -> list[tuple]:
        """The per-run weight views (:meth:`_run_views` of each run), reused across forwards; with
        ``copy_weights`` and at most :data:`COPY_MAX_TOKENS` tokens in this forward, one dense copy instead.

        Slicing a Parameter in Python costs several microseconds per view, which at decode (one token)
        is as much as a run's matmul; so without autograd the views are cached for the current runs. They
        are rebuilt when the runs change, when ``.to()`` / ``.half()`` moves the weights (:meth:`_apply`),
        or when the down-projection weight is replaced by another tensor. With autograd they are made
        afresh so that gradients flow through this forward's graph.
        """
        if torch.is_grad_enabled():
            return [self._run_views(start, stop) for start, stop in self.runs]
        dense = self.copy_weights and n_tokens <= COPY_MAX_TOKENS
        key = (self.runs, self._down_weight().data_ptr(), dense)
        if self._cached_views is None or self._cached_views[0] != key:
            if dense:
                views = [self._dense_views(self.runs)]
            else:
                views = [self._run_views(start, stop) for start, stop in self.runs]
            self._cached_views = (key, views)
        return self._cached_views[1]

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): drop the cached views, which would keep the old weights alive.
        self._cached_views = None
        return super()._apply(fn, recurse)

    @abstractmethod
    def _down_weight(self) -> torch.Tensor:
        """The down-projection weight (its storage address tells whether the cached views are current)."""

    @abstractmethod
    def _run_views(self, start: int, stop: int) -> tuple:
        """Views (no copies) of the weights and biases that neurons ``start:stop`` use, in matmul layout."""

    @abstractmethod
    def _dense_views(self, runs: Runs) -> tuple:
        """The :meth:`_run_views` layout for all ``runs`` at once, on contiguous copies of the kept weights."""

    @abstractmethod
    def _hidden_run(self, x2d: torch.Tensor, views: tuple) -> torch.Tensor:
        """Intermediate activations of one run, ``[N, stop - start]``, for input ``[N, H]``."""

    @abstractmethod
    def _down_run(self, h: torch.Tensor, views: tuple, out: torch.Tensor | None) -> torch.Tensor:
        """Add the down projection of one run (``h`` ``[N, stop - start]``) into ``out`` ``[N, H]``.

        ``out=None`` starts the sum (and adds the output bias, once).
        """

    @abstractmethod
    def _down_none(self, x2d: torch.Tensor) -> torch.Tensor:
        """The output ``[N, H]`` when no neuron is kept: the output bias, or zeros."""

    @abstractmethod
    def _hidden_full(self, x: torch.Tensor) -> torch.Tensor:
        """All intermediate activations ``[B, T, I]``, by the original module's own operations."""

    @abstractmethod
    def _down_full(self, hidden: torch.Tensor) -> torch.Tensor:
        """The original module's output from its full intermediate ``[B, T, I]`` (bit-identical to forward)."""

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """What the original module applies after the down projection (GPT-2: dropout)."""
        return out


class GatedGLUMLP(GatedMLP):
    """Gated ``LlamaMLP`` / ``Qwen2MLP``: ``down(act(gate(x)) * up(x))``.

    ``gate_proj`` / ``up_proj`` weights are ``[I, H]`` (a run is a contiguous row slice) and
    ``down_proj`` is ``[H, I]`` (a run is the strided column view ``W[:, s:e]``). All three are used
    transposed (``x @ W_run.T``), which BLAS reads in place.
    """

    def _down_weight(self):
        return self.down_proj.weight

    def _run_views(self, start, stop):
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return (
            gate.weight[start:stop].t(),
            _slice(gate.bias, start, stop),
            up.weight[start:stop].t(),
            _slice(up.bias, start, stop),
            down.weight[:, start:stop].t(),
            down.bias,
        )

    def _dense_views(self, runs):
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        rows = lambda w: torch.cat([w[s:e] for s, e in runs]) if w is not None else None  # noqa: E731
        return (
            rows(gate.weight).t(),
            rows(gate.bias),
            rows(up.weight).t(),
            rows(up.bias),
            torch.cat([down.weight[:, s:e] for s, e in runs], dim=1).t(),
            down.bias,
        )

    def _hidden_run(self, x2d, views):
        gate_w, gate_b, up_w, up_b, _, _ = views
        return self.act_fn(_matmul(x2d, gate_w, gate_b)) * _matmul(x2d, up_w, up_b)

    def _down_run(self, h, views, out):
        down_w, down_b = views[4:]
        return _matmul(h, down_w, down_b) if out is None else out.addmm_(h, down_w)

    def _down_none(self, x2d):
        out = x2d.new_zeros(x2d.shape[0], self.hidden_size)
        return out if self.down_proj.bias is None else out + self.down_proj.bias

    def _hidden_full(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def _down_full(self, hidden):
        return self.down_proj(hidden)


class GatedGPT2MLP(GatedMLP):
    """Gated ``GPT2MLP``: ``dropout(c_proj(act(c_fc(x))))`` with Conv1D weights stored ``[in, out]``.

    ``c_fc.weight`` is ``[H, I]`` (a run is the strided column view ``W[:, s:e]`` plus ``bias[s:e]``) and
    ``c_proj.weight`` is ``[I, H]`` (a run is a contiguous row slice; its bias is added once).
    """

    def _down_weight(self):
        return self.c_proj.weight

    def _run_views(self, start, stop):
        return (
            self.c_fc.weight[:, start:stop],
            self.c_fc.bias[start:stop],
            self.c_proj.weight[start:stop],
            self.c_proj.bias,
        )

    def _dense_views(self, runs):
        return (
            torch.cat([self.c_fc.weight[:, s:e] for s, e in runs], dim=1),
            torch.cat([self.c_fc.bias[s:e] for s, e in runs]),
            torch.cat([self.c_proj.weight[s:e] for s, e in runs]),
            self.c_proj.bias,
        )

    def _hidden_run(self, x2d, views):
        fc_w, fc_b, _, _ = views
        return self.act(torch.addmm(fc_b, x2d, fc_w))

    def _down_run(self, h, views, out):
        proj_w, proj_b = views[2:]
        return torch.addmm(proj_b, h, proj_w) if out is None else out.addmm_(h, proj_w)

    def _down_none(self, x2d):
        return self.c_proj.bias.expand(x2d.shape[0], self.hidden_size).clone()

    def _hidden_full(self, x):
        return self.act(self.c_fc(x))

    def _down_full(self, hidden):
        return self.dropout(self.c_proj(hidden))

    def _finish(self, out):
        return self.dropout(out)


def _slice(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:stop]


def _matmul(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight_t (+ bias)`` for ``x`` ``[N, a]``, ``weight_t`` ``[a, b]``: what ``F.linear`` does, minus its
    per-call transpose of the weight."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
