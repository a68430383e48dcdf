"""Shared-weight evaluation of a population at every candidate's exact sizes: no masks, no padded FLOPs.

`jaxnas.population.masked.evaluate_shared` runs a whole population as one vmapped program over masks: on GPU / TPU
that is the fastest form, but on CPU the masked program computes every block at the largest width, depth and
kernel (only ~18-24% of its FLOPs are the candidates' own in the macro space, benchmarks/population.py) and
every activation of a `lax.switch`. `evaluate_sized` is the CPU formulation of the same function:

- each candidate is a chain of **layer programs** (`Op`: one block at its real input / output widths, kernel,
  activation, norm and skip, weights sliced from the supernet inside the program). A layer program is compiled
  once per distinct layer size and cached for the process (activation, norm and skip are runtime arguments),
  so compiles are bounded by the space's layer sizes, not by the number of architectures: a search's next
  generation compiles only sizes it has not met before;
- the population is a **prefix tree**: candidates whose first blocks agree share those blocks' outputs (the
  fixed conv stem is computed once for the whole population), and sibling blocks that read the same input
  with the same weights but different output widths share one matmul / convolution at their widest (an MLP
  population's first layer, the largest, is one ``x @ W1`` for everyone; the first convolution after a conv
  population's stem is one per kernel size): elastic width keeps the first units, so a narrower candidate's
  pre-activations are a slice of the wider one's;
- BatchNorm statistics are recalibrated per subnet on the given training batches (the mean of the batch
  means and variances, exactly `ConvSupernet.recalibrate_bn`), also once per tree node.

The results equal `evaluate_shared` (MLP) / recalibrated `evaluate_population` (conv) to float tolerance;
tests/test_population_sized.py checks both, and benchmarks/population.py times the formulations side by side.

    out = evaluate_sized(supernet, params, encs, x, y, bn_batches=x_batches)   # {"loss", "accuracy"}: [P]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas.blocks import FAMILIES as BLOCK_FAMILIES
from jaxnas.blocks import Conv, widths
from jaxnas.supernet.conv import NORM_EPSILON as BN_EPSILON
from jaxnas.supernet.conv import ConvSupernet
from jaxnas.supernet.mlp import ACTIVATION_FNS, NORM_EPSILON, MLPSupernet
from jaxnas.supernet.ops import batch_norm, conv2d, depthwise_conv2d
from jaxnas.supernet.weights import own_slices

Path = tuple  # keys from the supernet's params root to an op's weights
ACTIVATION_NAMES = tuple(ACTIVATION_FNS)
# Depthwise layers always as shifted slices: lax's grouped convolution is several times slower on CPU
# (docs/benchmarks.md).
DEPTHWISE_FORMULATION = {"lax": "slices", "slices": "slices"}


# An op's runtime arguments (activation index, norm, skip) are either traced (one compiled layer program serves
# every choice: evaluation) or concrete numpy values (plain ops, decided while tracing: `jaxnas.population.sized_train`).
def _static(flag) -> bool:
    return isinstance(flag, bool | int | np.bool_ | np.integer)


def _activation(index: jax.Array, z: jax.Array) -> jax.Array:
    """The activation ``ACTIVATION_NAMES[index]`` of z: a runtime choice (one branch runs, outside vmap)."""
    if _static(index):
        return ACTIVATION_FNS[ACTIVATION_NAMES[int(index)]](z)
    return jax.lax.switch(index, [ACTIVATION_FNS[name] for name in ACTIVATION_NAMES], z)


def _if(flag, yes, no, *operands):
    """``yes(*operands)`` where ``flag`` else ``no(*operands)``: decided now for a concrete flag, else lax.cond."""
    if _static(flag):
        return yes(*operands) if flag else no(*operands)
    return jax.lax.cond(flag, yes, no, *operands)


def at(tree, path: Path):
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------- ops
@dataclasses.dataclass(frozen=True)
class Dense:
    """An MLP block at its real sizes: ``act(LN(h[:, :n_in] @ W[:n_in, :n_out] + b))`` (+ h when ``skip``)."""

    path: Path
    n_in: int
    n_out: int
    activation: str
    norm: bool
    skip: bool
    uses_stats = False

    @property
    def linear_key(self):
        """Siblings with this key read the same input through the same weights: one matmul at their widest."""
        return (self.path, self.n_in)

    @property
    def linear_width(self) -> int:
        return self.n_out

    def linear(self, w: dict, h: jax.Array) -> jax.Array:
        h = h.reshape(h.shape[0], -1)  # the first block reads images [B, H, W, C] as [B, D]
        return h @ w["dense"]["kernel"][: self.n_in, : self.n_out] + w["dense"]["bias"][: self.n_out]

    @property
    def program(self) -> Dense:
        """The compiled program's static part: sizes only (activation, norm and skip are runtime arguments)."""
        return dataclasses.replace(self, path=(), activation="", norm=False, skip=False)

    @property
    def arguments(self) -> np.ndarray:
        return np.array([ACTIVATION_NAMES.index(self.activation), self.norm, self.skip], np.int32)

    def run(self, w: dict, h: jax.Array, stats, args, z=None):
        z = self.linear(w, h) if z is None else z

        def normed(z):  # flax's LayerNorm (use_fast_variance=False) over the real units, as the twin
            mean = z.mean(-1, keepdims=True)
            centred = z - mean
            var = (centred * centred).mean(-1, keepdims=True)
            scale, bias = (w["norm"][v][: self.n_out] for v in ("scale", "bias"))
            return centred * jax.lax.rsqrt(var + NORM_EPSILON) * scale + bias

        z = _if(args[1] > 0, normed, lambda z: z, z)
        a = _activation(args[0], z)
        if self.n_in == self.n_out and h.ndim == 2:
            a = _if(args[2] > 0, lambda a: h + a, lambda a: a, a)
        return a, {}

    def weight_shapes(self) -> dict:
        """Shapes of the weights this block reads (under ``path``), at its own sizes."""
        shapes = {"dense": {"kernel": (self.n_in, self.n_out), "bias": (self.n_out,)}}
        if self.norm:
            shapes["norm"] = {"scale": (self.n_out,), "bias": (self.n_out,)}
        return shapes


class _Fixed:
    """Ops with nothing searched inside: no runtime arguments, no statistics, no sharable first layer."""

    uses_stats = False
    linear_key = None
    arguments = np.zeros(0, np.int32)

    @property
    def program(self):
        return dataclasses.replace(self, path=())


@dataclasses.dataclass(frozen=True)
class Head(_Fixed):
    """The classifier on the last features: ``h @ W[:n_in] + b`` (``pool``: after global average pooling)."""

    path: Path
    n_in: int
    pool: bool = False

    def run(self, w: dict, h: jax.Array, stats, args):
        if self.pool:
            h = h.mean((1, 2))
        return h @ w["kernel"][: self.n_in] + w["bias"], {}

    def weight_shapes(self) -> dict:
        return {"kernel": (self.n_in, None), "bias": (None,)}  # None: the whole axis (the classes)


@dataclasses.dataclass(frozen=True)
class Stem(_Fixed):
    """The conv families' fixed stem: 3x3 conv, bias, relu."""

    path: Path
    stride: int
    formulation: str

    def run(self, w: dict, h: jax.Array, stats, args):
        return jax.nn.relu(conv2d(h, w["kernel"], self.stride, self.formulation) + w["bias"]), {}

    def weight_shapes(self) -> dict:
        return {"kernel": (None, None, None, None), "bias": (None,)}


@dataclasses.dataclass(frozen=True)
class ConvBlock:
    """One block of a `jaxnas.blocks` family at its real channels, kernel and expansion, run by the family's
    forward on weights cut with `own_slices` (the supernet's leaves, or weights already at these sizes);
    ``first``: block 1 of its stage."""

    path: Path
    family: str
    ci: int
    co: int
    kernel: int
    stride: int
    expansion: int
    activation: str
    norm: bool
    skip: bool
    first: bool
    formulation: str

    uses_stats = True

    @property
    def _first_layer(self) -> Conv:
        return BLOCK_FAMILIES[self.family].layers(self.first)[0]

    @property
    def linear_key(self):
        """Siblings with this key apply the same first convolution to the same input: computed once at their
        widest output, each takes its first channels (elastic width keeps the first channels)."""
        layer = self._first_layer
        return (self.path, self.ci, layer.size(self.kernel), self.stride if layer.strided else 1)

    @property
    def linear_width(self) -> int:
        return widths(self.ci, self.co, self.expansion)[self._first_layer.n_out]

    def linear(self, w: dict, h: jax.Array) -> jax.Array:
        return _SizedOps(self, w, None, None).conv(self._first_layer.name, h)

    @property
    def program(self) -> ConvBlock:
        """The compiled program's static part: sizes (activation, norm and skip are runtime arguments)."""
        return dataclasses.replace(self, path=(), activation="", norm=False, skip=False)

    @property
    def arguments(self) -> np.ndarray:
        return np.array([ACTIVATION_NAMES.index(self.activation), self.norm, self.skip], np.int32)

    def run(self, w: dict, h: jax.Array, stats, args, z=None):
        ops = _SizedOps(self, w, stats, args, z)
        return BLOCK_FAMILIES[self.family].forward(ops, h, self.first), ops.recorded

    def weight_shapes(self) -> dict:
        """Shapes of the weights this block reads (under ``path``), at its own sizes (BatchNorm only when on)."""
        shapes = {}
        for layer in BLOCK_FAMILIES[self.family].layers(self.first):
            shape = layer.kernel_shape(self.kernel, widths(self.ci, self.co, self.expansion))
            shapes[layer.name] = {"kernel": shape, "bias": shape[-1:]}
            if self.norm and layer.norm:
                shapes[layer.norm] = {"scale": shape[-1:], "bias": shape[-1:]}
        return shapes


class _SizedOps:
    """`jaxnas.blocks.BlockOps` of a sized block: each layer's own slice of its weights, the activation, norm and
    skip as runtime arguments (``args``), BatchNorm statistics given or the batch's (``recorded``); ``first_z``:
    the block's first convolution, already computed for a group of siblings."""

    def __init__(self, block: ConvBlock, w: dict, stats, args, first_z=None):
        self.block, self.w, self.stats, self.args, self.first_z = block, w, stats, args, first_z
        self.layers = BLOCK_FAMILIES[block.family].convs(block.first)
        self.widths = widths(block.ci, block.co, block.expansion)
        self.recorded: dict = {}

    def conv(self, name, h):
        layer, b = self.layers[name], self.block
        if self.first_z is not None and name == next(iter(self.layers)):
            return self.first_z
        shape = layer.kernel_shape(b.kernel, self.widths)
        kernel = self.w[name]["kernel"]
        kernel = kernel[own_slices(kernel.shape, shape)]
        bias = self.w[name]["bias"][: shape[-1]]
        stride = b.stride if layer.strided else 1
        if layer.depthwise:  # XLA:CPU's grouped convolution is slow; K * K shifted multiply-adds are not
            return depthwise_conv2d(h, kernel, stride, DEPTHWISE_FORMULATION[b.formulation]) + bias
        return conv2d(h, kernel, stride, b.formulation) + bias

    def norm(self, name, z):
        on = self.args[1] > 0
        if _static(on) and not on:  # a block without BatchNorm (its weights need not even exist: sized_train)
            return z
        c = z.shape[-1]
        given = None if self.stats is None else self.stats[name]
        y, self.recorded[name] = batch_norm(z, self.w[name]["scale"][:c], self.w[name]["bias"][:c], given, BN_EPSILON)
        return y if _static(on) else jnp.where(on, y, z)

    def act(self, z, width):
        return _activation(self.args[0], z)

    def keep(self, z, width):
        return z

    def skip(self, h, a):
        # Blocks 2 .. depth keep the stage's width, so the skip always fits; args[2] is the stage's choice.
        return _if(self.args[2] > 0, lambda: h + a, lambda: a)


Op = Dense | Head | Stem | ConvBlock


# ---------------------------------------------------------------------------------------------- ops of a candidate
def mlp_ops(supernet: MLPSupernet, enc, prefix: Path = ()) -> tuple[Op, ...]:
    """The layer programs of MLP candidate ``enc`` [n_choices], in order (the head last)."""
    ops: list[Op] = []
    width = supernet.in_features
    for k, stage in enumerate(supernet.arch(enc).stages):
        for j in range(stage.depth):
            path = (*prefix, "stages", k, j)
            ops.append(Dense(path, width, stage.width, stage.activation, stage.norm, stage.skip and j > 0))
            width = stage.width
    return (*ops, Head((*prefix, "head"), width))


def conv_ops(supernet: ConvSupernet, enc, prefix: Path = (), formulation: str = "lax") -> tuple[Op, ...]:
    """The layer programs of conv candidate ``enc`` [n_choices], in order (stem first, head last).

    ``formulation``: how each exact-size convolution runs (`jaxnas.supernet.ops`); ``"lax"`` (XLA's own
    convolution) is the fast one for a single network of real sizes on CPU, unlike under vmap.
    """
    arch = supernet.arch(enc)
    root = (*prefix, arch.family)
    ops: list[Op] = [Stem((*root, "stem"), supernet.stem_stride, formulation)]
    width = supernet.stem_width
    for k, stage in enumerate(arch.stages):
        for j in range(stage.depth):
            ops.append(
                ConvBlock(
                    (*root, "stages", k, j), arch.family, width, stage.width, stage.kernel,
                    2 if k > 0 and j == 0 else 1, stage.expansion or 1, stage.activation, stage.norm,
                    bool(stage.skip) and j > 0, j == 0, formulation,
                )
            )
            width = stage.width
    return (*ops, Head((*root, "head", len(arch.stages) - 1), width, pool=True))


def ops_for(model, enc, formulation: str = "lax") -> tuple[Op, ...]:
    """Layer programs of ``enc`` for an `MLPSupernet`, a `ConvSupernet`, or a search model holding them
    (``model.mlp`` / ``model.conv`` with params ``{"mlp": ..., "conv": ...}``)."""
    if isinstance(model, MLPSupernet):
        return mlp_ops(model, enc)
    if isinstance(model, ConvSupernet):
        return conv_ops(model, enc, formulation=formulation)
    if getattr(model, "mlp", None) is not None and model.family(enc) == "mlp":
        return mlp_ops(model.mlp, enc, ("mlp",))
    if getattr(model, "conv", None) is not None:
        return conv_ops(model.conv, enc, ("conv",), formulation)
    raise TypeError(f"no exact-size layer programs for {type(model).__name__}; use population.evaluate_shared")


def supports(model) -> bool:
    """Whether `evaluate_sized` handles ``model`` (MLP / conv supernets of the macro space, or a model of them)."""
    if isinstance(model, MLPSupernet | ConvSupernet):
        return True
    return hasattr(model, "mlp") and hasattr(model, "conv") and (model.mlp is not None or model.conv is not None)


# ---------------------------------------------------------------------------------------------- compiled pieces
# Each is compiled once per ``op.program`` (sizes) and input shape; the weights, the op's runtime arguments
# (activation, norm, skip) and the statistics are arguments, so every layer position and choice shares it.
@functools.partial(jax.jit, static_argnums=0)
def _run(program, w, h, stats, args):
    return program.run(w, h, stats, args)[0]


@functools.partial(jax.jit, static_argnums=0)
def _run_on(program, w, h, stats, args, z):
    return program.run(w, h, stats, args, z=z)[0]


@functools.partial(jax.jit, static_argnums=0)
def _linear(program, w, h):
    return program.linear(w, h)


@functools.partial(jax.jit, static_argnums=0)
def _recalibrate(program, w, hs, args):
    """Outputs [n, B, ...] of the op on every batch of hs [n, B, ...] with the batch's statistics, and the mean
    of the statistics over the batches (what `ConvSupernet.recalibrate_bn` computes)."""
    out, stats = jax.vmap(lambda h: program.run(w, h, None, args))(hs)
    return out, jax.tree.map(lambda a: a.mean(0), stats)


@jax.jit
def _sums(logits, y, weight):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss * weight), jnp.sum((jnp.argmax(logits, -1) == y) * weight)


# ---------------------------------------------------------------------------------------------- the prefix tree
class _Node:
    __slots__ = ("children", "leaves", "stats")

    def __init__(self):
        self.children: dict[Op, _Node] = {}
        self.leaves: list[int] = []  # candidates whose chain ends here (after their head)
        self.stats = None


def _tree(chains: Sequence[tuple[Op, ...]]) -> _Node:
    root = _Node()
    for i, chain in enumerate(chains):
        node = root
        for op in chain:
            node = node.children.setdefault(op, _Node())
        node.leaves.append(i)
    return root


def _children_outputs(node: _Node, params, h, run):
    """(op, child, output) for every child of ``node``; siblings with one ``linear_key`` share one matmul."""
    groups: dict = {}
    for op in node.children:
        if op.linear_key is not None:
            groups.setdefault(op.linear_key, []).append(op)
    shared = {}
    for ops in groups.values():
        if len(ops) > 1:
            widest = max(ops, key=lambda o: o.linear_width)
            z = _linear(widest.program, at(params, widest.path), h)
            for op in ops:
                shared[op] = z if op.linear_width == widest.linear_width else z[..., : op.linear_width]
    for op, child in node.children.items():
        if op in shared:
            yield op, child, _run_on(op.program, at(params, op.path), h, child.stats, op.arguments, shared[op])
        else:
            yield op, child, run(op, child, h)


def _recalibrate_tree(node: _Node, params, hs) -> None:
    """Fill every node's BatchNorm statistics from the batches hs [n, B, ...] flowing through its prefix."""
    for op, child in node.children.items():
        if not child.children:  # a head: nothing after it needs statistics
            continue
        out, child.stats = _recalibrate(op.program, at(params, op.path), hs, op.arguments)
        _recalibrate_tree(child, params, out)


def _needs_stats(node: _Node) -> bool:
    return any(op.uses_stats or _needs_stats(child) for op, child in node.children.items())


def _evaluate_tree(node: _Node, params, h, y, weight, totals) -> None:
    def run(op, child, h):
        return _run(op.program, at(params, op.path), h, child.stats, op.arguments)

    for _, child, out in _children_outputs(node, params, h, run):
        if child.leaves:
            loss, correct = _sums(out, y, weight)
            for i in child.leaves:
                totals[i].append((loss, correct))
        if child.children:
            _evaluate_tree(child, params, out, y, weight, totals)


def evaluate_sized(
    model,
    params,
    encs,
    x,
    y,
    *,
    bn_batches=None,
    batch_size: int = 1000,
    formulation: str = "lax",
    shared: bool = True,
) -> dict[str, np.ndarray]:
    """Loss and accuracy of every encoding in ``encs`` [P, n_choices] with one shared ``params``, each candidate
    computed at its own sizes (see the module docstring).

    ``shared=False``: ``params`` holds every candidate's own weights (leaves [P, ...], e.g. a trained
    population's); each candidate is then its own chain (no prefix is shared: the weights differ) and its
    BatchNorm statistics are recalibrated on its own weights, as the masked program's per-candidate
    statistics are. The layer programs are the same (compiled once per layer size).

    ``model``: an `MLPSupernet`, a `ConvSupernet`, or a search model holding them; x [N, ...], y [N] int labels;
    ``bn_batches`` [n, B, H, W, C]: training batches for each candidate's BatchNorm statistics (needed when a
    candidate uses BatchNorm); ``batch_size``: examples per evaluation batch (the last one is padded and the
    padding ignored). Returns numpy ``{"loss": [P] mean cross-entropy, "accuracy": [P]}``, as `evaluate_shared`.
    """
    encs = np.asarray(encs)
    if encs.ndim != 2 or len(encs) == 0:
        raise ValueError(f"encs must be a non-empty [P, n_choices] array, got shape {encs.shape}")
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x has {x.shape[0]} examples and y {y.shape[0]} labels; they must match and be > 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not shared:
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
        if sizes != {len(encs)}:
            raise ValueError(
                f"shared=False takes every candidate's own weights, leaves [P = {len(encs)}, ...]; got leading "
                f"sizes {sorted(sizes, key=str)}; pass shared=True for one supernet's weights"
            )
        scores = [
            evaluate_sized(
                model, jax.tree.map(lambda a, c=c: a[c], params), encs[c : c + 1], x, y, bn_batches=bn_batches,
                batch_size=batch_size, formulation=formulation,
            )
            for c in range(len(encs))
        ]
        return {k: np.concatenate([s[k] for s in scores]) for k in ("loss", "accuracy")}
    root = _tree([ops_for(model, e, formulation) for e in encs])
    if _needs_stats(root):
        if bn_batches is None:
            raise ValueError(
                "candidates use BatchNorm, so evaluate_sized needs training batches for their statistics: pass "
                "bn_batches=[n, B, H, W, C] (the same batches recalibrate_bn takes)"
            )
        _recalibrate_tree(root, params, jnp.asarray(bn_batches))
    n = x.shape[0]
    totals: list[list] = [[] for _ in range(len(encs))]
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        real = xb.shape[0]
        if real < batch_size and n > batch_size:  # pad to the batch size: no new program shape for the tail
            xb = jnp.pad(xb, [(0, batch_size - real)] + [(0, 0)] * (xb.ndim - 1))
            yb = jnp.pad(yb, (0, batch_size - real))
        weight = (jnp.arange(xb.shape[0]) < real).astype(jnp.float32)
        _evaluate_tree(root, params, xb, yb, weight, totals)
    # float32 like evaluate_shared (the same division, so equal counts give bit-equal accuracies)
    loss = np.array([sum(float(t[0]) for t in ts) for ts in totals], np.float32) / np.float32(n)
    correct = np.array([sum(float(t[1]) for t in ts) for ts in totals], np.float32)
    return {"loss": loss, "accuracy": correct / np.float32(n)}

