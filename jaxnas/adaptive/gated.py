"""Channel-gated programs of an exported conv twin: the same network computed at fewer channels, for real.

A *gate* is a tensor of the twin whose channels are read only by convolutions (or by the pooled head), so that
dropping channel ``c`` is exactly dropping the producer's output filter ``c`` and the consumers' input
channel ``c`` - a network of smaller width, not a mask. Gates are found from the `jaxnas.blocks` declarations:

- ``stem``: the stem's output, read by block 1's convolutions of its input (block 1 of the network never adds
  its input back: cnn and MobileNet have no residual there, ResNet a projection shortcut, itself a convolution);
- ``b<i>.<conv>``: a block-internal tensor - ResNet's ``conv1`` output (read by ``conv2``), MobileNetV2's
  expansion (``expand`` -> the per-channel ``depthwise`` -> ``project``: the three are cut together);
- ``s<k>``: a cnn stage's stream - every block of the stage writes it (its convolution's filters, and its skip,
  if on, adds the stream back channel by channel), its later blocks and the next stage's first block (or the
  pooled head) read it: the whole stage runs at the kept channels.

`GatedNet.program(widths)` is one jitted program per width tuple (a static shape): it takes the kept channel
indices ``{gate: [k] int32}`` as arguments, cuts every affected kernel / bias / BatchNorm vector to them and runs
the smaller convolutions. At full width it runs the twin's own layers (so it equals the exported model exactly);
at a reduced width it equals `GatedNet.masked` - the full twin with the dropped channels zeroed where their
consumers read them - up to float summation order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.blocks import FAMILIES as BLOCK_FAMILIES
from jaxnas.supernet.conv import TwinConvNet
from jaxnas.supernet.mlp import ACTIVATION_FNS

STEM = "stem"


@dataclasses.dataclass(frozen=True)
class Gate:
    """One gateable tensor: its ``name``, ``width`` (channels at full width) and who writes and reads it.

    ``producers``: ``(block index, or -1 for the stem; conv name)`` of the convolutions whose output channels are
    cut (a depthwise convolution is also a consumer); ``consumers``: ``(block index, conv name)`` of the
    convolutions whose input channels are cut; ``head``: the pooled head reads it; ``outputs``: the blocks (-1:
    the stem) whose output *is* this tensor - the masked reference zeroes the channels there (a residual stream);
    for a block-internal tensor (``outputs`` empty) it zeroes them where the consumers read them.
    """

    name: str
    width: int
    producers: tuple[tuple[int, str], ...]
    consumers: tuple[tuple[int, str], ...]
    head: bool = False
    outputs: tuple[int, ...] = ()


def _stages(blocks: list) -> list[list[int]]:
    """Block indices grouped by stage (a stage starts at each ``first`` block)."""
    stages: list[list[int]] = []
    for i, block in enumerate(blocks):
        if block.first or not stages:
            stages.append([])
        stages[-1].append(i)
    return stages


def find_gates(twin: TwinConvNet) -> list[Gate]:
    """Every gate of ``twin``, in forward order (see the module docstring)."""
    if not isinstance(twin, TwinConvNet):
        raise TypeError(f"channel gating needs a conv twin (cnn / resnet / mobilenet), got {type(twin).__name__}")
    blocks = list(twin.blocks)

    def readers(i: int) -> tuple[tuple[int, str], ...]:
        """The convolutions of block ``i`` that read its input (none past the last block: the head reads it)."""
        if i == len(blocks):
            return ()
        convs = BLOCK_FAMILIES[blocks[i].family].convs(blocks[i].first)
        return tuple((i, name) for name, conv in convs.items() if conv.n_in == "in")

    gates = [Gate(STEM, twin.stem.out_features, ((-1, "stem"),), readers(0), head=not blocks, outputs=(-1,))]
    for k, stage in enumerate(_stages(blocks)):
        family = blocks[stage[0]].family
        for i in stage:
            block = blocks[i]
            if family == "resnet":
                gates.append(Gate(f"b{i}.conv1", block.conv1.out_features, ((i, "conv1"),), ((i, "conv2"),)))
            elif family == "mobilenet":
                gates.append(Gate(f"b{i}.expand", block.expand.out_features, ((i, "expand"), (i, "depthwise")),
                                  ((i, "project"),)))
        if family == "cnn":  # the stage's stream: every block writes it, later blocks read it and add it back
            end = stage[-1] + 1
            gates.append(Gate(
                f"s{k + 1}", blocks[stage[0]].conv.out_features,
                tuple((i, "conv") for i in stage), tuple((i, "conv") for i in stage[1:]) + readers(end),
                head=end == len(blocks), outputs=tuple(stage),
            ))
    return gates


def reader_norms(twin: TwinConvNet, gates: list[Gate]) -> dict[str, jax.Array]:
    """gate -> ``[C]`` float32 (traceable, so training can recompute it): for each channel the summed L2 norm of
    the weights that read it - every consumer convolution's input slice and the head's row; a gate read only by
    depthwise producers weighs its channels alike."""
    blocks = list(twin.blocks)
    out = {}
    for gate in gates:
        total = jnp.zeros(gate.width, jnp.float32)
        for block, conv in gate.consumers:
            total = total + jnp.sqrt((getattr(blocks[block], conv).kernel[...] ** 2).sum(axis=(0, 1, 3)))
        if gate.head:
            total = total + jnp.sqrt((twin.head.kernel[...] ** 2).sum(axis=1))
        if not gate.consumers and not gate.head:
            total = total + 1.0
        out[gate.name] = total
    return out


def _conv(module: nnx.Conv, h, kernel, bias, groups: int):
    """``module``'s convolution (strides, padding) with the given (cut) kernel and bias, as nnx.Conv computes it."""
    y = jax.lax.conv_general_dilated(
        h, kernel, module.strides if isinstance(module.strides, tuple) else (module.strides,) * 2, module.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )
    return y + bias.reshape(1, 1, 1, -1)


def _norm(module: nnx.BatchNorm, z, keep):
    """``module`` (inference mode) on the channels ``keep`` (None: all), with nnx.BatchNorm's formula."""
    pick = (lambda v: v) if keep is None else (lambda v: jnp.take(v, keep, axis=0))
    y = z - pick(module.mean[...])
    mul = jax.lax.rsqrt(pick(module.var[...]) + module.epsilon) * pick(module.scale[...])
    return y * mul + pick(module.bias[...])


@dataclasses.dataclass
class _Ops:
    """`jaxnas.blocks.BlockOps` of one twin block with some channels cut (``cut``) or zeroed (``zero``).

    ``out_keep`` / ``in_keep``: conv name -> kept indices of its output / input channels (absent: all).
    ``zero``: conv name -> a ``[C]`` 0/1 mask multiplied into its input (the masked reference form).
    ``reads``: conv name -> the block-internal gate it reads; ``seen``: gate -> recorded mean |activation|.
    """

    block: nnx.Module
    out_keep: dict
    in_keep: dict
    zero: dict
    seen: dict
    reads: dict

    def conv(self, name, h):
        module = getattr(self.block, name)
        if name in self.zero:
            h = h * self.zero[name]
        if name in self.reads and self.reads[name] not in self.seen:
            self.seen[self.reads[name]] = [jnp.abs(h).mean((0, 1, 2))]
        out, inp = self.out_keep.get(name), self.in_keep.get(name)
        if out is None and inp is None:
            return module(h)
        kernel, bias = module.kernel[...], module.bias[...]
        depthwise = module.feature_group_count > 1
        if inp is not None and not depthwise:
            kernel = jnp.take(kernel, inp, axis=2)
        if out is not None:
            kernel, bias = jnp.take(kernel, out, axis=3), jnp.take(bias, out, axis=0)
        return _conv(module, h, kernel, bias, kernel.shape[3] if depthwise else 1)

    def norm(self, name, z):
        if not self.block.normed:
            return z
        conv = next(c for c in BLOCK_FAMILIES[self.block.family].layers(self.block.first) if c.norm == name)
        keep = self.out_keep.get(conv.name)
        return getattr(self.block, name)(z) if keep is None else _norm(getattr(self.block, name), z, keep)

    def act(self, z, width):
        return ACTIVATION_FNS[self.block.activation](z)

    def keep(self, z, width):
        return z

    def skip(self, h, a):
        return h + a if self.block.skip else a


def gate_depth(gate: Gate) -> int:
    """The last block (-1: the stem) a forward must run for ``gate``'s activity to be recorded in full."""
    return max(gate.outputs) if gate.outputs else max(block for block, _ in gate.consumers)


def _forward(twin: TwinConvNet, gates: list[Gate], x, keep: Mapping[str, jax.Array],
             zero: Mapping[str, jax.Array], record: dict | None = None, until: int | None = None):
    """Logits ``[B, classes]`` of ``twin`` with gates cut to ``keep`` (gate -> kept indices) and / or zeroed by
    ``zero`` (gate -> ``[C]`` 0/1 mask). ``record`` (a dict, filled in place): gate -> ``[C]`` mean |activation|
    of the gate's tensor over the batch and positions (a stream: averaged over the blocks that write it), and
    ``"stem_activations"`` -> the stem's output ``[B, H, W, C]``. ``until``: stop after that block (-1: the stem)
    and return None - a probe of the gates up to there (`gate_depth`)."""
    outs: dict[int, dict] = {}
    ins: dict[int, dict] = {}
    zeros: dict[int, dict] = {}
    out_zero: dict[int, jax.Array] = {}
    out_gate: dict[int, str] = {}
    head_keep = None
    for gate in gates:
        for block, conv in gate.producers:
            if gate.name in keep:
                outs.setdefault(block, {})[conv] = keep[gate.name]
        for block, conv in gate.consumers:
            if gate.name in keep:
                ins.setdefault(block, {})[conv] = keep[gate.name]
            if gate.name in zero and not gate.outputs:
                zeros.setdefault(block, {})[conv] = zero[gate.name]
        for block in gate.outputs:
            out_gate[block] = gate.name
            if gate.name in zero:
                out_zero[block] = zero[gate.name]
        if gate.head:
            head_keep = keep.get(gate.name)
    seen: dict[str, list] = {}

    def output(block: int, h):
        if block in out_zero:
            h = h * out_zero[block]
        if record is not None and block in out_gate:
            seen.setdefault(out_gate[block], []).append(jnp.abs(h).mean((0, 1, 2)))
        return h

    stem_keep = outs.get(-1, {}).get("stem")
    if stem_keep is None:
        h = twin.stem(x)
    else:
        h = _conv(twin.stem, x, jnp.take(twin.stem.kernel[...], stem_keep, axis=3),
                  jnp.take(twin.stem.bias[...], stem_keep, axis=0), 1)
    h = output(-1, jax.nn.relu(h))
    if record is not None:
        record["stem_activations"] = h
    for i, block in enumerate(twin.blocks):
        if until is not None and i > until:
            break
        ops = _Ops(block, outs.get(i, {}), ins.get(i, {}), zeros.get(i, {}), {} if record is None else seen, {
            conv: g.name for g in gates if not g.outputs for b, conv in g.consumers if b == i})
        h = output(i, BLOCK_FAMILIES[block.family].forward(ops, h, block.first))
    if record is not None:
        record.update({name: sum(values) / len(values) for name, values in seen.items()})
    if until is not None:
        return None
    pooled = h.mean((1, 2))
    if head_keep is None:
        return twin.head(pooled)
    return pooled @ jnp.take(twin.head.kernel[...], head_keep, axis=0) + twin.head.bias[...]


class GatedNet:
    """The channel-gated forms of one exported conv twin (see the module docstring).

    ``gates``: the gateable tensors in forward order; ``full``: their full widths (the width tuple of the
    exported model). Programs are compiled once per width tuple and cached.
    """

    def __init__(self, twin: TwinConvNet):
        self.gates = find_gates(twin)
        self.names = tuple(g.name for g in self.gates)
        self.full = tuple(g.width for g in self.gates)
        # Programs take the state as a flat list of arrays (extracted twins hold arrays only: `concrete_rngs`).
        self._graph, self._state = nnx.split(twin)
        self._leaves, self._treedef = jax.tree.flatten(self._state)
        self._programs: dict[tuple[int, ...], object] = {}

    @property
    def state(self) -> list:
        """The twin's weights and statistics as a flat list of arrays, the first argument of every program."""
        return self._leaves

    def _twin(self, leaves):
        """The twin (inside a program) from :attr:`state`'s arrays."""
        return nnx.merge(self._graph, jax.tree.unflatten(self._treedef, leaves))

    def widths(self, keep: Mapping[str, object]) -> tuple[int, ...]:
        """The width tuple of kept indices ``keep`` (gate -> indices; a missing gate keeps all)."""
        return tuple(len(keep[n]) if n in keep else w for n, w in zip(self.names, self.full))

    def program(self, widths: tuple[int, ...]):
        """The jitted ``(state, x [B, H, W, C], keep {gate: [k] int32}) -> logits [B, classes]`` at ``widths``.

        Gates at full width are not cut (their ``keep`` entries are ignored), so the full-width program is the
        exported twin's own computation.
        """
        widths = tuple(int(w) for w in widths)
        if len(widths) != len(self.full) or any(not 1 <= w <= f for w, f in zip(widths, self.full)):
            raise ValueError(f"widths must give 1..full channels for each of the gates {list(self.names)} "
                             f"(full widths {list(self.full)}), got {list(widths)}")
        if widths not in self._programs:
            cut = {n for n, w, f in zip(self.names, widths, self.full) if w < f}
            twin_of, gates = self._twin, self.gates

            def run(state, x, keep):
                return _forward(twin_of(state), gates, x, {n: keep[n] for n in cut}, {})

            self._programs[widths] = jax.jit(run)
        return self._programs[widths]

    def __call__(self, x, keep: Mapping[str, object] | None = None) -> jax.Array:
        """Logits ``[B, classes]`` of ``x`` with each gate cut to its kept indices (``keep``; None: full width)."""
        keep = {} if keep is None else keep
        unknown = set(keep) - set(self.names)
        if unknown:
            raise ValueError(f"unknown gates {sorted(unknown)}; this network's gates are {list(self.names)}")
        return self.program(self.widths(keep))(self._leaves, jnp.asarray(x, jnp.float32), self.cut_args(keep))

    def latencies(self, widths: list[tuple[int, ...]], x, *, rounds: int = 15,
                  calls: int = 8) -> dict[tuple[int, ...], float]:
        """Milliseconds per call of each width tuple's program on ``x`` ``[B, H, W, C]`` (median over rounds).

        The programs are compiled and warmed first, then timed in ``rounds`` interleaved rounds (every tuple once
        per round, so a drifting machine load affects them alike); a tuple's turn is ``calls`` calls dispatched
        back to back and waited for once, as batches stream through a predict loop (jax dispatches
        asynchronously: one blocking call at a time measures a different, slower regime). Which channels are
        kept does not change the cost, so the first ``k`` of each gate are kept.
        """
        import time

        x = jnp.asarray(x, jnp.float32)
        programs = {}
        for w in dict.fromkeys(tuple(int(v) for v in t) for t in widths):
            keep = {n: jnp.arange(k, dtype=jnp.int32) for n, k, f in zip(self.names, w, self.full) if k < f}
            program = self.program(w)
            jax.block_until_ready(program(self._leaves, x, keep))
            programs[w] = functools.partial(program, self._leaves, x, keep)
        times: dict[tuple[int, ...], list[float]] = {w: [] for w in programs}
        for _ in range(max(1, rounds)):
            for w, call in programs.items():
                start = time.perf_counter()
                out = [call() for _ in range(max(1, calls))]
                jax.block_until_ready(out)
                times[w].append((time.perf_counter() - start) / max(1, calls))
        return {w: 1e3 * float(np.median(t)) for w, t in times.items()}

    @functools.cached_property
    def recorder(self):
        """The ``(state, x) -> (logits, record)`` at full width; ``record``: gate -> ``[C]`` mean |activation|
        and ``"stem_activations"`` -> ``[B, H, W, C]`` (see `_forward`)."""
        return self.recorder_until(None)

    def recorder_until(self, until: int | None):
        """:attr:`recorder` stopped after block ``until`` (-1: the stem; None: the whole network): ``(None,
        record)`` of the gates up to there."""
        twin_of, gates = self._twin, self.gates

        def run(state, x):
            record: dict = {}
            logits = _forward(twin_of(state), gates, x, {}, {}, record, until)
            return logits, record

        return run

    def reader_norms(self) -> dict[str, jax.Array]:
        """gate -> ``[C]``: for each channel, the summed L2 norm of the weights that read it (every consumer
        convolution's input slice, the head's row): ``mean|activation| * this`` estimates what dropping it moves."""
        return reader_norms(nnx.merge(self._graph, self._state), self.gates)

    def cut_args(self, keep: Mapping[str, object]) -> dict[str, jax.Array]:
        """The ``keep`` argument of a program: int32 kept indices of the gates ``keep`` cuts below full width."""
        return {n: jnp.asarray(keep[n], jnp.int32) for n, w, f in zip(self.names, self.widths(keep), self.full)
                if w < f}

    def macs(self, widths: tuple[int, ...], image_shape: tuple[int, int, int]) -> int:
        """Multiply-accumulates of one image ``[H, W, C]`` at ``widths`` (convolutions and the head)."""
        return sum(self.layer_macs(widths, image_shape))

    def layer_macs(self, widths: tuple[int, ...], image_shape: tuple[int, int, int]) -> list[int]:
        """``[stem, block 1, ..., block n, head]`` multiply-accumulates of one image ``[H, W, C]`` at ``widths``."""
        twin = nnx.merge(self._graph, self._state)
        width = dict(zip(self.names, widths))
        out_cut, in_cut = {}, {}
        for gate in self.gates:
            for key in gate.producers:
                out_cut[key] = width[gate.name]
            for key in gate.consumers:
                in_cut[key] = width[gate.name]
        h, w = image_shape[:2]

        def conv_macs(module, key, h, w):
            stride = module.strides[0] if isinstance(module.strides, tuple) else module.strides
            ho, wo = -(-h // stride), -(-w // stride)
            k = module.kernel_size[0]
            cout = out_cut.get(key, module.out_features)
            cin = 1 if module.feature_group_count > 1 else in_cut.get(key, module.in_features)
            return ho * wo * k * k * cin * cout, ho, wo

        stem, h, w = conv_macs(twin.stem, (-1, "stem"), h, w)
        out = [stem]
        for i, block in enumerate(twin.blocks):
            bh, bw, total = h, w, 0
            for conv in BLOCK_FAMILIES[block.family].layers(block.first):
                m, ho, wo = conv_macs(getattr(block, conv.name), (i, conv.name), bh if not conv.strided else h,
                                      bw if not conv.strided else w)
                total += m
                if conv.strided:
                    bh, bw = ho, wo
            out.append(total)
            h, w = bh, bw
        last = self.gates[-1]
        features = width[last.name] if last.head else twin.head.in_features
        return [int(m) for m in out] + [int(features * twin.head.out_features)]

    @functools.cached_property
    def _masked(self):
        twin_of, gates = self._twin, self.gates
        return jax.jit(lambda state, x, zero: _forward(twin_of(state), gates, x, {}, zero))

    def masked(self, x, keep: Mapping[str, object]) -> jax.Array:
        """The reference: the full twin with every gate's dropped channels zeroed where they are read."""
        zero = {}
        for name, width in zip(self.names, self.full):
            if name in keep:
                mask = np.zeros(width, np.float32)
                mask[np.asarray(keep[name], int)] = 1.0
                zero[name] = jnp.asarray(mask)
        return self._masked(self._leaves, jnp.asarray(x, jnp.float32), zero)


__all__ = ["Gate", "GatedNet", "STEM", "find_gates", "gate_depth", "reader_norms"]
