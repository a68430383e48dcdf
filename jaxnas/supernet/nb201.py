"""The NAS-Bench-201 network as one weight-sharing supernet over its cell space, and the cells' exact twins.

Layout (NAS-Bench-201's ``TinyNetwork``; ``C`` = stem channels, ``N`` = cells per stage, images NHWC)::

    x [B, H, W, Cin] -> stem: 3x3 conv Cin -> C (no bias) -> BN
    stage 1: N cells at C channels, H x W
    reduction: ResNet basic block C -> 2C, stride 2   (ReLU-conv3x3/2-BN -> ReLU-conv3x3-BN
                                                         + shortcut: 2x2 average pool /2 -> 1x1 conv)
    stage 2: N cells at 2C, H/2 x W/2
    reduction: 2C -> 4C, stride 2
    stage 3: N cells at 4C, H/4 x W/4
    BN -> ReLU -> global average pool [B, 4C] -> linear head [4C, classes] + bias

Every cell of the network is the encoded cell (one op per edge, `jaxnas.spaces.nb201.EDGES`), with its own
weights: node 0 is the cell's input, node j = sum over edges i -> j of op(node i), the output is node 3. Ops
(as NAS-Bench-201 defines them): ``none`` exact zeros, ``skip_connect`` the identity, ``nor_conv_1x1`` /
``nor_conv_3x3`` ReLU -> conv (no bias, same padding) -> BN, ``avg_pool_3x3`` stride 1, padding 1, padded
positions not counted (``count_include_pad=False``).

BatchNorm: the cells' BatchNorms are affine-free, as in NAS-Bench-201's weight-sharing search cells (its
``SearchCell`` builds every op with ``affine=False``), so an edge's conv op holds only its kernel; the stem,
reduction and final BatchNorms have a scale and bias, as in every NB201 network. The benchmark's own standalone
networks use affine cell BatchNorms, so our parameter counts are NB201's minus 2 x channels per conv edge (the
all-parameter-free cells, which have no cell BatchNorm, match NB201's 0.073306 M at C = 16, N = 5 on CIFAR-10).
Training normalises with the batch's statistics; evaluation takes per-subnet statistics from
`NB201Supernet.recalibrate_bn`, exactly as `jaxnas.supernet.ConvSupernet` does.

Op selection: every edge computes all five candidates and keeps the encoded one with ``lax.select_n`` (exact
values, and gradients only into the chosen op); the edges leaving one node share one convolution per kernel
size. Under `jax.vmap` over encodings a ``lax.switch`` would become the same select over all branches, so
this costs nothing there and keeps every BatchNorm statistic defined. The N cells of a stage run as one
`jax.lax.scan` over their stacked weights, so the compiled program holds one cell per stage whatever N is.
Measured on XLA:CPU (2 busy cores): the vmapped gradient of a C = 4, N = 1 supernet takes ~17 s of CPU to
compile, almost all of it LLVM code generation for ~480 kernels; one op set per edge, 1x1 kernels merged into
the 3x3 convolution, or no selects at all each changed that by less than the run-to-run noise.

Mixed forward (`apply_mixed`, `mixed_cell`): DARTS' continuous relaxation from the same op implementations; every
edge sums its ops weighted by ``op_weights`` [6, 5] instead of selecting one (`jaxnas.search.differentiable` learns
those weights), with PC-DARTS' partial channels and edge weights as options. A cell derived from it is an ordinary
encoding, so its twin comes from `extract` like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.spaces import Space
from jaxnas.spaces.nb201 import EDGES, OPS

from jaxnas.supernet.codes import ActivationCodes
from jaxnas.supernet.conv import NORM_EPSILON
from jaxnas.supernet.ops import FORMULATIONS, _taps, conv2d
from jaxnas.supernet.weights import concrete_rngs, lecun_init

STAGES = 3
CONV_OPS = {"nor_conv_1x1": 1, "nor_conv_3x3": 3}
"""Kernel size of each parametric op."""
_SKIP, _CONV1, _CONV3 = (OPS.index(op) for op in ("skip_connect", "nor_conv_1x1", "nor_conv_3x3"))
_EDGE_NAMES = tuple(f"{to}<-{src}" for to, src in EDGES)
_LEAVING = {src: tuple(e for e, (_, i) in enumerate(EDGES) if i == src) for src in (0, 1, 2)}
"""The edges leaving node ``src``, in `EDGES` order."""


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """NB201's avg_pool_3x3: stride 1, padding 1, each output the mean over the window's real positions only."""
    # Nine shifted views summed (not nnx.avg_pool, whose padding jax2onnx's ONNX conversion drops).
    total = functools.reduce(jnp.add, _taps(x, 3, 1))
    count = functools.reduce(jnp.add, _taps(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 3, 1))
    return total / count


def _halve(x: jax.Array) -> jax.Array:
    """[B, H / 2, W / 2, C]: the 2x2 average pool with stride 2 of a reduction block's shortcut."""
    ho, wo = x.shape[1] // 2, x.shape[2] // 2  # odd sizes drop the last row / column, as a VALID pool does
    views = [x[:, i : 2 * ho : 2, j : 2 * wo : 2] for i in (0, 1) for j in (0, 1)]
    return functools.reduce(jnp.add, views) / 4


def _channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """x [..., c] with its channels interleaved across ``groups`` groups of c / groups (ShuffleNet's shuffle):
    output channel i * groups + g is input channel g * c / groups + i."""
    c = x.shape[-1]
    return x.reshape(*x.shape[:-1], groups, c // groups).swapaxes(-1, -2).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- twin
def _conv(ci: int, co: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    p = (k - 1) // 2
    return nnx.Conv(ci, co, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False, rngs=rngs)


def _bn(c: int, affine: bool, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        c, use_running_average=True, use_scale=affine, use_bias=affine, epsilon=NORM_EPSILON, rngs=rngs
    )


class _TwinEdgeConv(nnx.Module):
    """ReLU -> k x k conv -> affine-free BN: one conv edge of a cell."""

    def __init__(self, c: int, k: int, rngs: nnx.Rngs):
        self.conv = _conv(c, c, k, 1, rngs)
        self.norm = _bn(c, False, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.norm(self.conv(jax.nn.relu(h)))


class _TwinCell(nnx.Module):
    """One NB201 cell with weights only for its conv edges; ``convs[n]`` belongs to edge ``conv_edges[n]``."""

    def __init__(self, ops: tuple[str, ...], c: int, rngs: nnx.Rngs):
        self.ops = ops
        self.conv_edges = tuple(e for e, op in enumerate(ops) if op in CONV_OPS)
        self.convs = nnx.List([_TwinEdgeConv(c, CONV_OPS[ops[e]], rngs) for e in self.conv_edges])

    def __call__(self, x: jax.Array) -> jax.Array:
        nodes = [x]
        for j in (1, 2, 3):
            total = None
            for e, (to, src) in enumerate(EDGES):
                op = self.ops[e]
                if to != j or op == "none":
                    continue
                h = nodes[src]
                if op == "skip_connect":
                    out = h
                elif op == "avg_pool_3x3":
                    out = _avg_pool_3x3(h)
                else:
                    out = self.convs[self.conv_edges.index(e)](h)
                total = out if total is None else total + out
            nodes.append(jnp.zeros_like(x) if total is None else total)
        return nodes[3]


class _TwinReduction(nnx.Module):
    """NB201's ResNet basic block with stride 2: ReLU-conv3x3/2-BN -> ReLU-conv3x3-BN, + avgpool2x2 -> conv1x1."""

    def __init__(self, ci: int, co: int, rngs: nnx.Rngs):
        self.conv_a = _conv(ci, co, 3, 2, rngs)
        self.norm_a = _bn(co, True, rngs)
        self.conv_b = _conv(co, co, 3, 1, rngs)
        self.norm_b = _bn(co, True, rngs)
        self.shortcut = _conv(ci, co, 1, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.norm_a(self.conv_a(jax.nn.relu(x)))
        b = self.norm_b(self.conv_b(jax.nn.relu(a)))
        return self.shortcut(_halve(x)) + b


class TwinNB201(nnx.Module):
    """The standalone NAS-Bench-201 network of one cell: weights only for the cell's conv edges, BatchNorm in
    inference mode (running statistics = the subnet's recalibrated ones).

    ``twin(x [B, H, W, Cin]) -> logits [B, classes]``; ``blocks`` lists the 3N cells and 2 reductions in order.
    """

    def __init__(
        self, ops: tuple[str, ...], in_channels: int, channels: int, cells: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        if len(ops) != len(EDGES) or any(op not in OPS for op in ops):
            raise ValueError(f"TwinNB201 needs one op of {OPS} per edge {_EDGE_NAMES}, got {ops}")
        self.stem = _conv(in_channels, channels, 3, 1, rngs)
        self.stem_norm = _bn(channels, True, rngs)
        blocks = []
        for s in range(STAGES):
            c = channels * 2**s
            if s > 0:
                blocks.append(_TwinReduction(c // 2, c, rngs))
            blocks += [_TwinCell(ops, c, rngs) for _ in range(cells)]
        self.blocks = nnx.List(blocks)
        self.lastact = _bn(channels * 2 ** (STAGES - 1), True, rngs)
        self.head = nnx.Linear(channels * 2 ** (STAGES - 1), num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.stem_norm(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(jax.nn.relu(self.lastact(h)).mean((1, 2)))


# ---------------------------------------------------------------------------------------------- supernet
def _normalised(z: jax.Array, given: dict | None, affine: dict | None = None) -> tuple[jax.Array, dict]:
    """(BatchNorm of z [B, H, W, C], the statistics used): ``given`` {"mean", "var"} or else the batch's.

    The order of operations of flax's BatchNorm, so the twin agrees to the last bits it can.
    """
    if given is None:
        mean = z.mean((0, 1, 2))
        var = jnp.square(z - mean).mean((0, 1, 2))
    else:
        mean, var = given["mean"], given["var"]
    mul = jax.lax.rsqrt(var + NORM_EPSILON)
    if affine is None:
        return (z - mean) * mul, {"mean": mean, "var": var}
    return (z - mean) * (mul * affine["scale"]) + affine["bias"], {"mean": mean, "var": var}


@dataclasses.dataclass(frozen=True)
class NB201Supernet:
    """Weight-sharing supernet of the NAS-Bench-201 cell space (layout in the module docstring).

    Hashable, so its bound ``apply`` can be a static argument of `jax.jit` (the population functions do this).

    Attributes:
      space: `nb201_space()` (any mutation rate); an encoding is int32 [6], one op index per edge.
      image_shape: (H, W, C) of the inputs; H and W must be multiples of 4 (two stride-2 reductions, each with a
        2x2 average-pool shortcut).
      num_classes: number of logits.
      channels: C, the stem's and first stage's channels (NB201: 16); stages have C, 2C, 4C.
      cells: N, cells per stage (NB201: 5).
      formulation: ``"slices"`` (shifted slices + matmul, fast for vmapped populations on CPU), ``"lax"``
        (`lax.conv_general_dilated`, fastest on GPU / TPU) or ``"auto"`` (slices on CPU, lax elsewhere).
    """

    space: Space
    image_shape: tuple[int, int, int]
    num_classes: int
    channels: int = 16
    cells: int = 5
    formulation: str = "auto"

    def __post_init__(self) -> None:
        space = self.space
        if (
            not isinstance(space, Space)
            or space.names != _EDGE_NAMES
            or any(tuple(c.options) != OPS for c in space.choices)
        ):
            raise ValueError(
                f"NB201Supernet needs the NAS-Bench-201 cell space (edges {_EDGE_NAMES}, ops {OPS}), got {space!r}; "
                "build it with jaxnas.spaces.nb201_space()"
            )
        shape = tuple(self.image_shape)
        if len(shape) != 3 or min(shape) < 1 or shape[0] % 4 or shape[1] % 4:
            raise ValueError(
                f"image_shape must be (H, W, C) with H and W positive multiples of 4 (two stride-2 reductions "
                f"halve them), got {self.image_shape}; resize or crop the images, e.g. to 32 x 32"
            )
        if min(self.num_classes, self.channels, self.cells) < 1:
            raise ValueError(
                f"num_classes, channels and cells must be >= 1, got {self.num_classes}, {self.channels}, {self.cells}"
            )
        if self.formulation not in (*FORMULATIONS, "auto"):
            raise ValueError(f"formulation must be one of {(*FORMULATIONS, 'auto')}, got {self.formulation!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def conv_formulation(self) -> str:
        if self.formulation != "auto":
            return self.formulation
        return "slices" if jax.default_backend() == "cpu" else "lax"

    def stage_channels(self, s: int) -> int:
        """Channels of stage ``s`` (0-based): C * 2^s."""
        return self.channels * 2**s

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Supernet parameters, a plain dict pytree::

            {"stem": {"conv": {"kernel"}, "norm": {"scale", "bias"}},
             "cells": {s: {edge: {"nor_conv_1x1": {"kernel" [N, 1, 1, c, c]},
                                  "nor_conv_3x3": {"kernel" [N, 3, 3, c, c]}}}},
             "reductions": {r: {"conv_a", "norm_a", "conv_b", "norm_b", "shortcut"}},
             "lastact": {"scale", "bias"}, "head": {"kernel" [4C, classes], "bias"}}

        Cell kernels carry the N cells of a stage on a leading axis (the stage is a `lax.scan`). Kernels are
        LeCun-normal over their fan-in, BN scales 1, biases 0, all cut from one flat random draw (XLA:CPU
        compiles one draw far faster than one per layer, which matters under ``jax.vmap(supernet.init)``).
        """
        return self._compiled_init()(key)

    @functools.cache  # noqa: B019 - the supernet is a small frozen value; one compiled init per distinct supernet
    def _compiled_init(self) -> Callable[[jax.Array], dict]:
        shapes = self._shapes()

        def init(key):
            params = lecun_init(key, shapes)
            # Drawn per cell (the fan-in of a cell kernel excludes the cell axis), then stacked for the scan.
            params["cells"] = {
                s: jax.tree.map(lambda *cells: jnp.stack(cells), *params["cells"][s].values())
                for s in params["cells"]
            }
            return params

        return jax.jit(init)

    def _shapes(self) -> dict:
        def f32(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.float32)

        def norm(c):
            return {"scale": f32(c), "bias": f32(c)}

        def cell(c):
            return {e: {op: {"kernel": f32(k, k, c, c)} for op, k in CONV_OPS.items()} for e in range(len(EDGES))}

        def reduction(ci, co):
            return {
                "conv_a": {"kernel": f32(3, 3, ci, co)},
                "norm_a": norm(co),
                "conv_b": {"kernel": f32(3, 3, co, co)},
                "norm_b": norm(co),
                "shortcut": {"kernel": f32(1, 1, ci, co)},
            }

        c, last = self.channels, self.stage_channels(STAGES - 1)
        return {
            "stem": {"conv": {"kernel": f32(3, 3, self.image_shape[2], c)}, "norm": norm(c)},
            "cells": {s: {i: cell(self.stage_channels(s)) for i in range(self.cells)} for s in range(STAGES)},
            "reductions": {r: reduction(self.stage_channels(r), self.stage_channels(r + 1)) for r in range(STAGES - 1)},
            "lastact": norm(last),
            "head": {"kernel": f32(last, self.num_classes), "bias": f32(self.num_classes)},
        }

    # ------------------------------------------------------------------ apply
    def apply(
        self,
        params: dict,
        enc: jax.Array,
        x: jax.Array,
        *,
        train: bool,
        key: jax.Array | None = None,
        bn_stats: dict | None = None,
    ) -> jax.Array:
        """logits [B, classes] float32 of the cell ``enc`` int32 [6] on ``x`` [B, H, W, C].

        Pure and jit/vmap-able over (params, enc, bn_stats). ``train``: BatchNorm uses the batch's statistics
        (``key`` is accepted for the population functions' signature; NB201 has no dropout). Eval: BatchNorm uses
        ``bn_stats`` (this subnet's, from `recalibrate_bn`); without them, the statistics of ``x`` itself.
        """
        logits, _ = self._forward(params, enc, x, None if train else bn_stats)
        return logits

    def apply_recalibrated(self, variables: dict, enc: jax.Array, x: jax.Array, *, train: bool, key=None) -> jax.Array:
        """`apply` with ``variables = {"params": ..., "bn_stats": ...}``: the population functions' signature, so
        ``evaluate_population(supernet.apply_recalibrated, {"params": tile_population(params, P), "bn_stats":
        vmap(recalibrate_bn)(...)}, encs, x, y)`` scores every candidate with its own statistics."""
        return self.apply(variables["params"], enc, x, train=train, key=key, bn_stats=variables["bn_stats"])

    def recalibrate_bn(self, params: dict, enc: jax.Array, x_batches: jax.Array) -> dict:
        """BatchNorm statistics of subnet ``enc`` [6]: the mean over ``x_batches`` [n, B, H, W, C] of each batch's
        per-channel mean and variance::

            {"stem": {"mean", "var"}, "cells": {s: {edge: {"mean" [N, c], "var" [N, c]}}},
             "reductions": {r: {"norm_a", "norm_b"}}, "lastact": {"mean", "var"}}

        A cell edge's entry is its conv op's statistics (those of the 3x3 candidate for none / skip / pool edges,
        never read). Pure; ``jax.vmap(supernet.recalibrate_bn, in_axes=(None, 0, None))(params, encs, x_batches)``
        gives a whole population's statistics.
        """
        stats = jax.lax.map(lambda x: self._forward(params, enc, x, None)[1], x_batches)
        return jax.tree.map(lambda a: a.mean(0), stats)

    def activation_kernel(self, params: dict, enc: jax.Array, x: jax.Array) -> jax.Array:
        """NASWOT's kernel [B, B] of the cell ``enc`` on ``x`` (`jaxnas.supernet.codes`), BatchNorm on the batch's
        statistics. As in NB201's networks, every ReLU -> conv -> BN op has its own ReLU (so an edge's input counts
        once per conv op leaving it), plus the reductions' two and the last one; jit/vmap-able."""
        codes = ActivationCodes(x.shape[0])
        self._forward(params, enc, x, None, codes)
        return codes.kernel

    def apply_mixed(
        self, params: dict, op_weights: jax.Array, x: jax.Array, *, edge_weights: jax.Array | None = None,
        partial: int = 1,
    ) -> jax.Array:
        """logits [B, classes] float32 of the continuous relaxation of the cell (DARTS' mixed operations) on ``x``.

        Every edge e of every cell computes ``sum_k op_weights[e, k] * op_k(its input)`` over the five ops in
        `OPS` order (``op_weights`` float [6, 5]: softmax(alpha) for DARTS, a straight-through one-hot for
        GDAS). BatchNorm always uses the batch's statistics, as DARTS' search cells (they keep none).

        ``edge_weights`` float [6] (PC-DARTS' edge normalisation): edge e's output is scaled by it before the sum
        into its node. ``partial`` K (PC-DARTS' partial channels): only the first c / K channels of an edge's
        input go through its mixed op, whose conv ops use the first c / K input and output channels of their
        kernels; the other channels bypass it, and the concatenation is shuffled with K groups. With K = 1, no
        ``edge_weights`` and one-hot ``op_weights`` the logits equal ``apply(params, enc, x, train=True)`` of the
        cell ``enc`` the one-hots pick. Pure and jit-able; differentiable in ``op_weights`` and ``edge_weights``.
        """
        if jnp.shape(op_weights) != (len(EDGES), len(OPS)):
            raise ValueError(
                f"op_weights must be float [{len(EDGES)}, {len(OPS)}] (edges {_EDGE_NAMES} x ops {OPS}), got shape "
                f"{jnp.shape(op_weights)}"
            )
        if edge_weights is not None and jnp.shape(edge_weights) != (len(EDGES),):
            raise ValueError(f"edge_weights must be float [{len(EDGES)}], got shape {jnp.shape(edge_weights)}")
        if partial < 1 or self.channels % partial:
            raise ValueError(
                f"partial channels K={partial} must be >= 1 and divide the cell channels C={self.channels} (every "
                "stage's c = C * 2^s then splits into K equal groups); choose a divisor of C"
            )

        def cell(p, given, h, codes):
            return self.mixed_cell(p, op_weights, h, edge_weights=edge_weights, partial=partial), None

        logits, _ = self._network(params, x, None, cell)
        return logits

    def _forward(
        self, params: dict, enc: jax.Array, x: jax.Array, given: dict | None, codes: ActivationCodes | None = None
    ) -> tuple[jax.Array, dict]:
        """(logits [B, classes], the BatchNorm statistics used) of the cell ``enc``; ``given`` None: every
        BatchNorm uses the batch's. ``codes`` records the activation codes of every ReLU of the network."""
        if jnp.shape(enc) != (len(EDGES),):
            raise ValueError(
                f"an NB201 encoding is int32 [{len(EDGES)}] (one op index per edge {_EDGE_NAMES}), got shape "
                f"{jnp.shape(enc)}; vmap apply over a population [P, {len(EDGES)}]"
            )
        enc = jnp.asarray(enc, jnp.int32)

        def cell(p, g, h, cell_codes):
            return self._cell(p, g, enc, h, cell_codes)

        return self._network(params, x, given, cell, codes)

    def _network(
        self, params: dict, x: jax.Array, given: dict | None, cell: Callable, codes: ActivationCodes | None = None
    ) -> tuple[jax.Array, dict]:
        """(logits [B, classes], the BatchNorm statistics used) of the network whose every cell is
        ``cell(cell params, given cell statistics | None, h, codes | None) -> (h, cell statistics)``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"inputs must be [B, H, W, C] = [B, {', '.join(map(str, self.image_shape))}], got shape {x.shape}; "
                f"build NB201Supernet(space, image_shape={tuple(x.shape[1:])}, ...) for these images"
            )
        fmt = self.conv_formulation

        def part(*path):
            """The given statistics at ``path``, or None (use the batch's)."""
            return None if given is None else functools.reduce(operator.getitem, path, given)

        stats: dict = {"cells": {}, "reductions": {}}
        stem = params["stem"]
        h, stats["stem"] = _normalised(conv2d(x, stem["conv"]["kernel"], 1, fmt), part("stem"), stem["norm"])
        for s in range(STAGES):
            if s > 0:
                h, stats["reductions"][s - 1] = self._reduction(
                    params["reductions"][s - 1], h, part("reductions", s - 1), codes
                )

            def scanned(h, weights):
                p, g = weights
                cell_codes = None if codes is None else ActivationCodes(h.shape[0])
                h, cell_stats = cell(p, g, h, cell_codes)
                return h, (cell_stats, None if codes is None else cell_codes.kernel)

            h, (stats["cells"][s], kernels) = jax.lax.scan(scanned, h, (params["cells"][s], part("cells", s)))
            if codes is not None:
                codes.kernel = codes.kernel + kernels.sum(0)
        h, stats["lastact"] = _normalised(h, part("lastact"), params["lastact"])
        if codes is not None:
            codes.add(h)
        pooled = jax.nn.relu(h).mean((1, 2))
        return pooled @ params["head"]["kernel"] + params["head"]["bias"], stats

    def _reduction(self, p: dict, x: jax.Array, given: dict | None, codes: ActivationCodes | None = None):
        """(NB201's stride-2 ResNet basic block on x [B, h, w, c] -> [B, h / 2, w / 2, 2c], its BN statistics)."""
        fmt = self.conv_formulation
        g_a, g_b = (None, None) if given is None else (given["norm_a"], given["norm_b"])
        if codes is not None:
            codes.add(x)
        a, stats_a = _normalised(conv2d(jax.nn.relu(x), p["conv_a"]["kernel"], 2, fmt), g_a, p["norm_a"])
        if codes is not None:
            codes.add(a)
        b, stats_b = _normalised(conv2d(jax.nn.relu(a), p["conv_b"]["kernel"], 1, fmt), g_b, p["norm_b"])
        return conv2d(_halve(x), p["shortcut"]["kernel"], 1, fmt) + b, {"norm_a": stats_a, "norm_b": stats_b}

    def _edge_ops(self, p: dict, h: jax.Array, src: int, given: dict | None = None) -> tuple[dict, dict]:
        """Every op's output on each edge leaving node ``src``, from the node's value h [B, h, w, c']:
        ({edge: {op: [B, h, w, c']}}, {edge: {conv op: {"mean", "var"} it used}}).

        c' may be fewer than the stage's channels (PC-DARTS' partial channels): conv ops then use the first c'
        input and output channels of their kernels. The edges' conv ops run together: one convolution per kernel
        size with the edges' kernels concatenated on the output axis ([B, h, w, n * c']: wider matmuls), and one
        BatchNorm over all 2 * n * c' channels (per channel, so exactly the per-edge BatchNorms); an edge's
        ``given`` statistics {edge: {"mean", "var"}} serve both its conv ops.
        """
        fmt, c = self.conv_formulation, h.shape[-1]
        edges = _LEAVING[src]
        relu = jax.nn.relu(h)
        z = jnp.concatenate(
            [conv2d(relu, jnp.concatenate([p[e][op]["kernel"][:, :, :c, :c] for e in edges], -1), 1, fmt)
             for op in CONV_OPS], -1
        )
        # Channel block k of z is (op k // n, edge edges[k % n]).
        blocks = [(op, e) for op in CONV_OPS for e in edges]
        g = None
        if given is not None:
            g = {v: jnp.concatenate([given[e][v] for _, e in blocks]) for v in ("mean", "var")}
        z, used = _normalised(z, g)
        pool = _avg_pool_3x3(h)
        outputs, stats = {}, {}
        for e in edges:
            at = {op: blocks.index((op, e)) * c for op in CONV_OPS}
            outputs[e] = {"none": jnp.zeros_like(h), "skip_connect": h, "avg_pool_3x3": pool}
            outputs[e] |= {op: z[..., i : i + c] for op, i in at.items()}
            stats[e] = {op: {v: a[i : i + c] for v, a in used.items()} for op, i in at.items()}
        return outputs, stats

    def _cell(
        self, p: dict, given: dict | None, enc: jax.Array, x: jax.Array, codes: ActivationCodes | None = None
    ) -> tuple[jax.Array, dict]:
        """(node 3 of one cell on x [B, h, w, c], each edge's conv statistics {edge: {"mean", "var"}}).

        Once node i is final, its outgoing edges run together (`_edge_ops`) and each keeps its encoded op.
        """
        nodes, incoming, stats = [x], {1: [], 2: [], 3: []}, {}
        for src in (0, 1, 2):
            h = nodes[src]
            if codes is not None:  # one ReLU per conv op leaving this node
                codes.add(h, sum((enc[e] == _CONV1) | (enc[e] == _CONV3) for e in _LEAVING[src]))
            outputs, used = self._edge_ops(p, h, src, given)
            for e in _LEAVING[src]:
                op = enc[e]
                incoming[EDGES[e][0]].append(jax.lax.select_n(op, *(outputs[e][name] for name in OPS)))
                # A none / skip / pool edge records its 3x3 candidate's statistics (never read).
                stats[e] = jax.tree.map(
                    lambda a, b: jnp.where(op == _CONV1, a, b), used[e]["nor_conv_1x1"], used[e]["nor_conv_3x3"]
                )
            # Sources arrive in ascending order, so node j sums its edges as NB201 does (from node 0 upwards).
            nodes.append(functools.reduce(jnp.add, incoming[src + 1]))
        return nodes[3], stats

    def mixed_cell(
        self, cell_params: dict, op_weights: jax.Array, x: jax.Array, *, edge_weights: jax.Array | None = None,
        partial: int = 1,
    ) -> jax.Array:
        """Node 3 [B, h, w, c] of one mixed cell on its input x [B, h, w, c]: what `apply_mixed` computes in every
        cell. ``cell_params`` are one cell's weights ({edge: {conv op: {"kernel" [k, k, c, c]}}}, e.g.
        ``jax.tree.map(lambda a: a[i], params["cells"][s])``); the other arguments as in `apply_mixed`."""
        p, width = cell_params, x.shape[-1] // partial
        nodes, incoming = [x], {1: [], 2: [], 3: []}
        for src in (0, 1, 2):
            h = nodes[src]
            outputs, _ = self._edge_ops(p, h[..., :width], src)
            for e in _LEAVING[src]:
                # "none" adds op_weights[e, none] * 0: nothing, in value and in gradient, so it is left out.
                out = functools.reduce(
                    jnp.add, (op_weights[e, k] * outputs[e][op] for k, op in enumerate(OPS) if op != "none")
                )
                if partial > 1:
                    out = _channel_shuffle(jnp.concatenate([out, h[..., width:]], -1), partial)
                incoming[EDGES[e][0]].append(out if edge_weights is None else edge_weights[e] * out)
            nodes.append(functools.reduce(jnp.add, incoming[src + 1]))
        return nodes[3]

    # ------------------------------------------------------------------ architectures
    def cell_ops(self, enc: jax.Array) -> tuple[str, ...]:
        """The op name of each edge of a valid ``enc`` [6] (host side), in `EDGES` order."""
        row = np.asarray(enc)
        self.space.validate(row)
        if row.shape != (len(EDGES),):
            raise ValueError(f"cell_ops takes one encoding of shape [{len(EDGES)}], got shape {row.shape}")
        return tuple(OPS[int(i)] for i in row)

    def largest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., 6]: the all-``nor_conv_3x3`` cell (the most parameters and MACs of the space) for every
        row of ``enc``; the "largest" end of the sandwich rule (`jaxnas.population.SubnetSampler`). Jit-able."""
        return jnp.full(jnp.shape(enc), _CONV3, jnp.int32)

    def smallest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., 6]: the all-``skip_connect`` cell for every row of ``enc``, the sandwich's small end.

        Cells of only none / skip / pool edges all have no cell parameters and MACs; all-skip is the one that
        still passes a signal (all-none makes the logits a constant), so training it still teaches the stem,
        reductions and head. Jit-able.
        """
        return jnp.full(jnp.shape(enc), _SKIP, jnp.int32)

    def layers(self, enc: jax.Array) -> list[tuple[int, int, int, int, bool]]:
        """[(kernel, in_channels, out_channels, output positions H * W, affine BatchNorm after it)] of the
        candidate's convolutions in order (stem, every cell's conv edges, the reductions' conv_a, conv_b and
        shortcut), the head last as a 1x1 "convolution" at one position."""
        ops = self.cell_ops(enc)
        height, width = self.image_shape[:2]
        layers = [(3, self.image_shape[2], self.channels, height * width, True)]
        for s in range(STAGES):
            c = self.stage_channels(s)
            n = (height // 2**s) * (width // 2**s)
            if s > 0:
                layers += [(3, c // 2, c, n, True), (3, c, c, n, True), (1, c // 2, c, n, False)]
            layers += [(CONV_OPS[op], c, c, n, False) for _ in range(self.cells) for op in ops if op in CONV_OPS]
        layers.append((1, self.stage_channels(STAGES - 1), self.num_classes, 1, False))
        return layers

    def param_count(self, enc: jax.Array) -> int:
        """Analytic parameter count: conv kernels (no biases), the head's kernel and bias, and the scale + bias
        of the stem, reduction and final BatchNorms (cell BatchNorms are affine-free; running statistics are
        buffers, not parameters). Every conv edge counts, also one on a path that never reaches the cell's
        output, as NAS-Bench-201 counts them."""
        kernels = sum(k * k * ci * co + (2 * co if affine else 0) for k, ci, co, _, affine in self.layers(enc))
        return kernels + self.num_classes + 2 * self.stage_channels(STAGES - 1)

    def macs(self, enc: jax.Array) -> int:
        """Analytic multiply-accumulates per example (MACs) of every convolution and the head: output positions
        x kernel area x input channels x output channels. Element-wise work and pooling (BatchNorm, ReLU, node
        sums, average pools) is not counted, as usual for MACs."""
        return sum(n * k * k * ci * co for k, ci, co, n, _ in self.layers(enc))

    # ------------------------------------------------------------------ twin
    def extract(self, params: dict, enc: jax.Array, bn_stats: dict | None = None) -> tuple[dict, TwinNB201]:
        """The standalone twin of ``enc`` [6]: ``(twin_params, twin)``.

        ``twin`` is a `TwinNB201` holding the supernet's weights of the cell's conv edges only (none / skip /
        pool edges have none), and ``bn_stats`` (from `recalibrate_bn` for this ``enc``) as its BatchNorm running
        statistics; ``twin_params`` is its parameter state as a plain dict (what gets exported and counted). Its
        logits equal ``apply(params, enc, x, train=False, bn_stats=bn_stats)`` up to float summation order.
        """
        ops = self.cell_ops(enc)
        if bn_stats is None:
            raise ValueError(
                "every NB201 network has BatchNorms (stem, reductions, final), so its twin needs this subnet's "
                "statistics: pass bn_stats=supernet.recalibrate_bn(params, enc, x_batches)"
            )
        twin = nnx.eval_shape(
            lambda: TwinNB201(
                ops, self.image_shape[2], self.channels, self.cells, self.num_classes, rngs=nnx.Rngs(0)
            )
        )
        conv_edges = [e for e, op in enumerate(ops) if op in CONV_OPS]
        blocks, block_stats = {}, {}
        for s in range(STAGES):
            if s > 0:
                p, g = params["reductions"][s - 1], bn_stats["reductions"][s - 1]
                blocks[len(blocks)] = p
                block_stats[len(block_stats)] = {"norm_a": g["norm_a"], "norm_b": g["norm_b"]}
            cell_params, cell_stats = params["cells"][s], bn_stats["cells"][s]
            for i in range(self.cells):
                convs = {n: {"conv": {"kernel": cell_params[e][ops[e]]["kernel"][i]}} for n, e in enumerate(conv_edges)}
                stats = {
                    n: {"norm": {v: cell_stats[e][v][i] for v in ("mean", "var")}} for n, e in enumerate(conv_edges)
                }
                blocks[len(blocks)] = {"convs": convs}
                block_stats[len(block_stats)] = {"convs": stats}
        state = nnx.state(twin, nnx.Param)
        state.replace_by_pure_dict(
            {
                "stem": params["stem"]["conv"],
                "stem_norm": params["stem"]["norm"],
                "blocks": blocks,
                "lastact": params["lastact"],
                "head": params["head"],
            }
        )
        nnx.update(twin, state)
        running = nnx.state(twin, nnx.BatchStat)
        running.replace_by_pure_dict(
            {"stem_norm": bn_stats["stem"], "blocks": block_stats, "lastact": bn_stats["lastact"]}
        )
        nnx.update(twin, running)
        return state.to_pure_dict(), concrete_rngs(twin)
