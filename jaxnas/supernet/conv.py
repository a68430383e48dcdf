"""The conv families of the macro space (cnn, resnet, mobilenet) as one masked supernet, and their exact twins.

Supernet layout (``C`` = largest ``channels`` option, ``K`` = largest kernel, ``E`` = largest expansion,
``S`` = stem channels; images NHWC)::

    x [B, H, W, Cin] -> stem: 3x3 conv Cin -> S + bias, relu, stride 1 or 2   (fixed: not searched)
    stage k = 1 .. max_stages (stride 2 in the first block of every stage after the first), block j:
        the family's block (jaxnas.blocks: cnn, resnet, mobilenet), its layers at C channels, K x K kernels
        and E x input hidden channels
        h = block(h) if j <= stage depth else h      (an inactive block is exactly the identity)
    global average pool of the last existing stage [B, C] -> dropout (train only) -> head [C, classes] (one head per
    number of stages: ``head[k]`` classifies networks of k + 1 stages)

Each block family is declared once in `jaxnas.blocks` (its convolutions and one forward); this module derives
from that declaration the supernet's weight shapes, the masked forward (`_MaskedOps`), the twin (`TwinBlock`),
extraction and the analytic counts.

Elastic choices are masks: channels >= the stage width hold exact zeros (so weights beyond the width meet only
zeros), a kernel of size k < K is the K x K kernel with everything outside its centre k x k zeroed (Once-for-All's
centre crop; `jaxnas.supernet.ops` pads symmetrically so the two agree at every position), the activation is a
`lax.switch`, norm on / off a `jnp.where`. Block 1 of a stage changes the width (and, after stage 1, halves the
resolution), so it is active whenever the stage exists and carries no identity residual (ResNet: a projection
shortcut, as in option B of He et al.; MobileNetV2: no residual, as in the paper). A missing stage (depth 0) has
a smaller resolution than its predecessor, so instead of an identity the pooled features of the last existing
stage are kept. Every family present in the space has its own weights (stem, stages, head); with several
families each candidate computes all of them and keeps its own logits, so bucket mixed populations by family
(one ``ConvSupernet`` per single-family space) when speed matters.

BatchNorm: shared running statistics are wrong for every subnet, so training always normalises with the
batch's statistics, and evaluation takes per-subnet statistics from `ConvSupernet.recalibrate_bn` (the mean of
the batch means and variances over a few training batches, as Once-for-All does), vmappable over encodings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.blocks import FAMILIES as BLOCK_FAMILIES
from jaxnas.blocks import STAGE_KERNEL, Conv, widths
from jaxnas.blocks import layers as block_layers
from jaxnas.spaces import MacroArch, Space
from jaxnas.supernet.codes import ActivationCodes
from jaxnas.supernet.mlp import ACTIVATION_FNS
from jaxnas.supernet.ops import FORMULATIONS, batch_norm, conv2d, depthwise_conv2d
from jaxnas.supernet.weights import concrete_rngs, lecun_init, own_slices

NORM_EPSILON = 1e-5
STEM_KERNEL = 3


# ---------------------------------------------------------------------------------------------- twin
def _conv(ci: int, co: int, k: int, stride: int, rngs: nnx.Rngs, groups: int = 1) -> nnx.Conv:
    p = (k - 1) // 2
    return nnx.Conv(
        ci, co, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), feature_group_count=groups, rngs=rngs
    )


class TwinBlock(nnx.Module):
    """One block of a `jaxnas.blocks` family at its real sizes: an ``nnx.Conv`` per declared layer (and its
    ``nnx.BatchNorm`` when the stage's norm is on), attributes named as declared, run by the family's forward."""

    def __init__(self, family: str, ci: int, co: int, kernel: int, stride: int, expansion: int, norm: bool,
                 activation: str, skip: bool, first: bool, rngs: nnx.Rngs):
        self.family, self.activation, self.skip, self.first, self.normed = family, activation, skip, first, norm
        w = widths(ci, co, expansion)
        for layer in BLOCK_FAMILIES[family].layers(first):
            n_in, n_out = w[layer.n_in], w[layer.n_out]
            groups = n_in if layer.depthwise else 1
            setattr(self, layer.name, _conv(n_in, n_out, layer.size(kernel), stride if layer.strided else 1, rngs,
                                            groups))
            if norm and layer.norm:
                setattr(self, layer.norm, nnx.BatchNorm(n_out, use_running_average=True, epsilon=NORM_EPSILON,
                                                        rngs=rngs))

    def __call__(self, h: jax.Array) -> jax.Array:
        return BLOCK_FAMILIES[self.family].forward(_TwinOps(self), h, self.first)


@dataclasses.dataclass(frozen=True)
class _TwinOps:
    """`jaxnas.blocks.BlockOps` of a twin block: its own layers, activation and skip choice (layer names such as
    ``conv`` and ``norm`` are the block's attributes, so the ops live beside it)."""

    block: TwinBlock

    def conv(self, name, h):
        return getattr(self.block, name)(h)

    def norm(self, name, z):
        return getattr(self.block, name)(z) if self.block.normed else z

    def act(self, z, width):
        return ACTIVATION_FNS[self.block.activation](z)

    def keep(self, z, width):
        return z

    def skip(self, h, a):
        return h + a if self.block.skip else a


class TwinConvNet(nnx.Module):
    """The compact standalone model of one cnn / resnet / mobilenet architecture: real widths, cropped kernels,
    inactive blocks left out, BatchNorm in inference mode (running statistics = the recalibrated ones).

    ``twin(x [B, H, W, C]) -> logits [B, classes]``; dropout is active only after ``twin.train()``.
    """

    def __init__(
        self, arch: MacroArch, in_channels: int, stem_channels: int, num_classes: int, *, rngs: nnx.Rngs,
        stem_stride: int = 1,
    ):
        if arch.family not in BLOCK_FAMILIES:
            raise ValueError(f"TwinConvNet builds {tuple(BLOCK_FAMILIES)} architectures, got family {arch.family!r}")
        self.stem = _conv(in_channels, stem_channels, STEM_KERNEL, stem_stride, rngs)
        blocks = []
        width = stem_channels
        for k, stage in enumerate(arch.stages):
            for j in range(stage.depth):
                stride = 2 if k > 0 and j == 0 else 1
                blocks.append(TwinBlock(
                    arch.family, width, stage.width, stage.kernel, stride, stage.expansion or 1, stage.norm,
                    stage.activation, bool(stage.skip) and j > 0, j == 0, rngs,
                ))
                width = stage.width
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(arch.dropout, deterministic=True, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(self.dropout(h.mean((1, 2))))


# ---------------------------------------------------------------------------------------------- supernet
class _Norms:
    """The BatchNorms of one block: normalise with ``given`` statistics, or else with the batch's; ``recorded``
    keeps the statistics used (what `ConvSupernet.recalibrate_bn` averages).

    Applied only where the stage's norm is on (``jnp.where``), so the off branch is the raw pre-activation.
    """

    def __init__(self, params: dict, given: dict | None, on: jax.Array):
        self.params, self.given, self.on = params, given, on
        self.recorded: dict[str, dict[str, jax.Array]] = {}

    def __call__(self, name: str, z: jax.Array) -> jax.Array:
        w = self.params[name]
        y, self.recorded[name] = batch_norm(z, w["scale"], w["bias"], self.given and self.given[name], NORM_EPSILON)
        return _blend(self.on, y, z)


@dataclasses.dataclass(frozen=True)
class _MaskedOps:
    """`jaxnas.blocks.BlockOps` of the masked supernet: every layer at the supernet's largest sizes, the
    candidate's kernel as the centre of the largest (``kernel_mask``), channels beyond each width zeroed after
    every activation (``units``: width name -> bool [largest channels]), NASWOT codes recorded where the block is
    ``active``."""

    layers: dict[str, Conv]
    weights: dict
    norms: _Norms
    units: dict[str, jax.Array]
    kernel_mask: jax.Array
    stride: int
    formulation: str
    activation: Callable[[jax.Array, jax.Array], jax.Array]
    active: jax.Array | bool
    skip_on: jax.Array | bool

    def conv(self, name, h):
        layer, w = self.layers[name], self.weights[name]
        kernel = _gate(self.kernel_mask, w["kernel"]) if layer.kernel == STAGE_KERNEL else w["kernel"]
        op = depthwise_conv2d if layer.depthwise else conv2d
        return op(h, kernel, self.stride if layer.strided else 1, self.formulation) + w["bias"]

    def norm(self, name, z):
        return self.norms(name, z)

    def act(self, z, width):
        valid = self.units[width]
        return _gate(valid, self.activation(z, valid & self.active if _is_bool(valid) else valid))

    def keep(self, z, width):
        return _gate(self.units[width], z)

    def skip(self, h, a):
        return _blend(self.skip_on, h + a, a)


def _soft_mask(size: int, values: jax.Array, weights: jax.Array) -> jax.Array:
    """float [size]: channel c weighted by P(width > c) for widths ``values`` drawn with ``weights``."""
    return (weights[None, :] * (jnp.arange(size)[:, None] < values[None, :])).sum(-1)


def _product(a: tuple, b: tuple) -> tuple[jax.Array, jax.Array]:
    """(values, weights) of the product of two independent (values, weights) distributions."""
    return (a[0][:, None] * b[0][None, :]).ravel(), (a[1][:, None] * b[1][None, :]).ravel()


def _is_bool(a) -> bool:
    return jnp.result_type(a) == jnp.bool_


def _gate(mask, z):
    """``z`` where ``mask``, else 0: a bool mask selects (the supernet of one candidate), a float one weighs (the
    relaxed supernet of `ConvSupernet.apply_relaxed`, whose masks are probabilities)."""
    return jnp.where(mask, z, 0.0) if _is_bool(mask) else mask * z


def _blend(on, a, b):
    """``a`` where ``on`` else ``b``; a float ``on`` (a probability) mixes them."""
    return jnp.where(on, a, b) if _is_bool(on) else on * a + (1.0 - on) * b


@dataclasses.dataclass(frozen=True)
class ConvSupernet:
    """Weight-sharing supernet of the macro space's conv families (layout in the module docstring).

    Hashable, so its bound ``apply`` can be a static argument of `jax.jit` (the population functions do this).

    Attributes:
      space: a `macro_space` with at least one of cnn / resnet / mobilenet; ``apply`` reads only those families.
      image_shape: (H, W, C) of the inputs.
      num_classes: number of logits.
      stem_channels: output channels of the fixed stem; default the smallest ``channels`` option.
      stem_stride: 1, or 2 to halve the resolution in the stem (4x fewer MACs in every later layer; the usual
        choice for CPU-sized searches on 28 x 28 images and larger).
      formulation: ``"slices"`` (shifted slices + matmul, fast for vmapped populations on CPU), ``"lax"``
        (`lax.conv_general_dilated`, fastest on GPU / TPU) or ``"auto"`` (slices on CPU, lax elsewhere).
    """

    space: Space
    image_shape: tuple[int, int, int]
    num_classes: int
    stem_channels: int | None = None
    formulation: str = "auto"
    stem_stride: int = 1

    def __post_init__(self) -> None:
        if "family" not in self.space.names or not self.families:
            raise ValueError(
                f"ConvSupernet needs a macro space with a conv family {tuple(BLOCK_FAMILIES)}, got {self.space!r}; "
                "build one with macro_space(families=('cnn', 'resnet', 'mobilenet'))"
            )
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        if self.num_classes < 1 or (self.stem_channels is not None and self.stem_channels < 1):
            raise ValueError(
                f"num_classes and stem_channels must be >= 1, got {self.num_classes} and {self.stem_channels}"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.formulation not in (*FORMULATIONS, "auto"):
            raise ValueError(f"formulation must be one of {(*FORMULATIONS, 'auto')}, got {self.formulation!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f in self.space["family"].options if f in BLOCK_FAMILIES)

    @property
    def max_stages(self) -> int:
        return sum(1 for n in self.space.names if n.endswith(".depth"))

    @property
    def max_depth(self) -> int:
        return max(self.space["stage1.depth"].options)

    @property
    def max_width(self) -> int:
        return max(self.space["stage1.channels"].options)

    @property
    def max_kernel(self) -> int:
        return max(self.space["stage1.kernel"].options)

    @property
    def max_expansion(self) -> int:
        uses = any(BLOCK_FAMILIES[f].expansion for f in self.families)
        return max(self.space["stage1.expansion"].options) if uses else 1

    @property
    def stem_width(self) -> int:
        return self.stem_channels or min(self.space["stage1.channels"].options)

    @property
    def conv_formulation(self) -> str:
        if self.formulation != "auto":
            return self.formulation
        return "slices" if jax.default_backend() == "cpu" else "lax"

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Supernet parameters, a plain dict pytree ``{family: {"stem", "stages": {k: {j: block}}, "head"}}``.

        Kernels (HWIO, and [C, classes] for the head) are LeCun-normal over their fan-in (all axes but the
        last), biases 0, BatchNorm scales 1, all cut from one flat random draw (one draw compiles far faster on
        XLA:CPU than one per layer, which matters under ``jax.vmap(supernet.init)``).
        """
        return self._compiled_init()(key)

    @functools.cache  # noqa: B019 - the supernet is a small frozen value; one compiled init per distinct supernet
    def _compiled_init(self) -> Callable[[jax.Array], dict]:
        return jax.jit(functools.partial(lecun_init, shapes=self._shapes()))

    def _shapes(self) -> dict:
        def f32(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.float32)

        def norm(c):
            return {"scale": f32(c), "bias": f32(c)}

        c, kk, e = self.max_width, self.max_kernel, self.max_expansion

        def block(family, ci, first):
            w = widths(ci, c, e if BLOCK_FAMILIES[family].expansion else 1)
            shapes = {}
            for layer in BLOCK_FAMILIES[family].layers(first):
                shape = layer.kernel_shape(kk, w)
                shapes[layer.name] = {"kernel": f32(*shape), "bias": f32(shape[-1])}
                if layer.norm:
                    shapes[layer.norm] = norm(shape[-1])
            return shapes

        def network(family):
            stages = {
                k: {j: block(family, self.stem_width if (k, j) == (0, 0) else c, j == 0) for j in range(self.max_depth)}
                for k in range(self.max_stages)
            }
            stem = {"kernel": f32(STEM_KERNEL, STEM_KERNEL, self.image_shape[2], self.stem_width),
                    "bias": f32(self.stem_width)}
            # One classifier per number of stages: the pooled features of stage 1 and of stage 3 mean different
            # things, and one shared head left every shallower subnet near chance (benchmarks/ranking.py).
            head = {k: {"kernel": f32(c, self.num_classes), "bias": f32(self.num_classes)} for k in range(self.max_stages)}
            return {"stem": stem, "stages": stages, "head": head}

        return {family: network(family) for family in self.families}

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
        """logits [B, classes] float32 of the subnet ``enc`` int32 [n_choices] on ``x`` [B, H, W, C].

        Pure and jit/vmap-able over (params, enc, bn_stats). ``train``: BatchNorm uses the batch's statistics
        and dropout is on (``key`` needed). Eval: BatchNorm uses ``bn_stats`` (this subnet's, from
        `recalibrate_bn`); without them, the statistics of ``x`` itself (zero-padded batches then skew them).
        """
        if train:
            if key is None:
                raise ValueError("apply(..., train=True) needs a PRNG key for dropout; pass key=jax.random.key(seed)")
            bn_stats = None
        logits, _ = self._forward(params, enc, x, bn_stats, key if train else None)
        return logits

    def apply_recalibrated(self, variables: dict, enc: jax.Array, x: jax.Array, *, train: bool, key=None) -> jax.Array:
        """`apply` with ``variables = {"params": ..., "bn_stats": ...}``: the population functions' signature, so
        ``evaluate_population(supernet.apply_recalibrated, {"params": tile_population(params, P), "bn_stats":
        vmap(recalibrate_bn)(...)}, encs, x, y)`` scores every candidate with its own statistics."""
        return self.apply(variables["params"], enc, x, train=train, key=key, bn_stats=variables["bn_stats"])

    def recalibrate_bn(self, params: dict, enc: jax.Array, x_batches: jax.Array) -> dict:
        """BatchNorm statistics of subnet ``enc`` [n_choices]: the mean over ``x_batches`` [n, B, H, W, C] of
        each batch's per-channel mean and variance, ``{family: {"stages": {k: {j: {norm: {"mean", "var"}}}}}}``.

        Pure; ``jax.vmap(supernet.recalibrate_bn, in_axes=(None, 0, None))(params, encs, x_batches)`` gives a
        whole population's statistics (leaves [P, channels]). Statistics of inactive blocks are computed too
        and never read.
        """
        stats = jax.lax.map(lambda x: self._forward(params, enc, x, None, None)[1], x_batches)
        return jax.tree.map(lambda a: a.mean(0), stats)

    def activation_kernel(self, params: dict, enc: jax.Array, x: jax.Array) -> jax.Array:
        """NASWOT's kernel [B, B] of the candidate ``enc`` on ``x`` (`jaxnas.supernet.codes`), BatchNorm on the
        batch's statistics; jit/vmap-able."""
        codes = {family: ActivationCodes(x.shape[0]) for family in self.families}
        self._forward(params, enc, x, None, None, codes)
        return self._pick(enc, [codes[family].kernel for family in self.families])

    def _pick(self, enc: jax.Array, per_family: list[jax.Array]) -> jax.Array:
        """The entry of ``per_family`` (one per `families`, in order) of ``enc``'s family."""
        if len(per_family) == 1:
            return per_family[0]
        options = self.space["family"].options
        chosen = enc[self.space.index("family")]
        out = per_family[0]
        for family, value in zip(self.families[1:], per_family[1:], strict=True):
            out = jnp.where(chosen == options.index(family), value, out)
        return out

    def _forward(self, params, enc, x, bn_stats, dropout_key, codes: dict | None = None):
        """(logits [B, classes], the BatchNorm statistics used) for every family of the supernet, then the
        logits of ``enc``'s family. ``codes``: {family: `ActivationCodes`} to record each family's activations."""
        self._check_inputs(x)
        logits, stats = [], {}
        for family in self.families:
            given = None if bn_stats is None else bn_stats[family]
            recorder = None if codes is None else codes[family]
            pooled, stats[family] = self._features(family, params[family], enc, x, given, recorder)
            if dropout_key is not None:
                rate = self.space.value(enc, "dropout")
                keep = jax.random.uniform(dropout_key, pooled.shape) >= rate
                pooled = jnp.where(keep, pooled / (1.0 - rate), 0.0)
            logits.append(self._head(params[family]["head"], enc, pooled))
        return self._pick(enc, logits), stats

    def _check_inputs(self, x: jax.Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"inputs must be [B, H, W, C] = [B, {', '.join(map(str, self.image_shape))}], got shape {x.shape}; "
                f"build ConvSupernet(space, image_shape={tuple(x.shape[1:])}, ...) for these images"
            )

    # ------------------------------------------------------------------ the continuous relaxation
    @property
    def relaxed_choices(self) -> tuple[str, ...]:
        """The choices `apply_relaxed` weighs: every choice of the space but ``dropout`` (a regulariser, not part
        of the network the search picks)."""
        return tuple(name for name in self.space.names if name != "dropout")

    def apply_relaxed(self, params: dict, probs: dict, x: jax.Array) -> jax.Array:
        """logits [B, classes] float32 of the continuous relaxation of the whole space on ``x`` (mode differentiable).

        ``probs``: {choice name: float [n_options]}, a distribution over each of `relaxed_choices` (softmax(alpha)
        for DARTS, a straight-through one-hot for GDAS). Every choice becomes a weighted mask, as in FBNetV2's
        channel masking: channel c of a stage is kept with weight P(channels > c), kernel tap t with P(kernel
        covers t), hidden channels with P(in x expansion > c); the activation is sum_a P(a) a(z), BatchNorm and the
        optional skip are mixed with P(on). Depth: a stage's output is sum_d P(depth = d | the stage exists) h_d
        (h_d after its first d blocks); the logits are sum_n P(n stages) head_n(pool(stage n)), with stage k
        existing with 1 - P(stage k depth = 0) once stage k - 1 does; families' logits are mixed by P(family).
        BatchNorm uses the batch's statistics and no dropout is applied. With one-hot ``probs`` of a candidate
        ``enc`` (dropout 0) the logits equal ``apply(params, enc, x, train=True)``. Pure, jit-able and
        differentiable in ``probs``; costs one forward of the largest network of every family.
        """
        missing = sorted(set(self.relaxed_choices) - set(probs))
        wrong = sorted(n for n in self.relaxed_choices if n in probs
                       and jnp.shape(probs[n]) != (len(self.space[n].options),))
        if missing or wrong:
            raise ValueError(f"probs needs float [n_options] for every choice of {self.relaxed_choices}; missing "
                             f"{missing}, wrong shape {wrong}")
        self._check_inputs(x)
        if "mlp" in self.space["family"].options:
            raise ValueError("apply_relaxed relaxes the conv families only; the space also has family 'mlp': drop it "
                             "from space.families")
        family_p = probs["family"]
        options = self.space["family"].options
        return sum(family_p[options.index(f)] * self._relaxed_logits(f, params[f], probs, x) for f in self.families)

    def _relaxed_logits(self, family: str, p: dict, probs: dict, x: jax.Array) -> jax.Array:
        space, fmt, block_family = self.space, self.conv_formulation, BLOCK_FAMILIES[family]
        h = jax.nn.relu(conv2d(x, p["stem"]["kernel"], self.stem_stride, fmt) + p["stem"]["bias"])
        centre = jnp.abs(jnp.arange(self.max_kernel) - (self.max_kernel - 1) // 2)
        in_width = (jnp.array([self.stem_width]), jnp.ones(1))  # (widths, their probabilities) of the stage input
        exists, logits = jnp.float32(1.0), 0.0  # exists: P(the network reaches stage k)
        for k in range(self.max_stages):
            s = f"stage{k + 1}."

            def choice(name, s=s):
                return jnp.asarray(space[s + name].options), probs[s + name]

            def on(name, s=s):
                options = space[s + name].options
                return probs[s + name][options.index(True)] if True in options else False

            depth_p = probs[s + "depth"]
            width = choice("channels")
            kernels, kernel_p = choice("kernel")
            inside = (centre[None, :] <= (kernels[:, None] - 1) // 2).astype(jnp.float32)  # [kernels, K]
            kernel_mask = jnp.einsum("k,ki,kj->ij", kernel_p, inside, inside)[:, :, None, None]
            expansion = choice("expansion") if block_family.expansion else (jnp.ones(1, jnp.int32), jnp.ones(1))
            branches = [ACTIVATION_FNS[name] for name in space[s + "activation"].options]
            act_p = probs[s + "activation"]

            def act(z, valid, act_p=act_p, branches=branches):
                return sum(w * f(z) for w, f in zip(act_p, branches, strict=True))

            skip_on = on("skip") if block_family.optional_skip else False
            within = self._depth_if_present(depth_p)
            stage = 0.0
            for j in range(self.max_depth):
                first = j == 0
                b = p["stages"][k][j]
                ci_max = self.stem_width if (k, j) == (0, 0) else self.max_width
                most = widths(ci_max, self.max_width, self.max_expansion if block_family.expansion else 1)
                block_in = in_width if first else width
                real = {"in": block_in, "out": width, "hidden": _product(block_in, expansion)}
                ops = _MaskedOps(
                    block_family.convs(first), b, _Norms(b, None, on("norm")),
                    {name: _soft_mask(most[name], *real[name]) for name in most}, kernel_mask,
                    2 if k > 0 and j == 0 else 1, fmt, act, True, skip_on,
                )
                h = block_family.forward(ops, h, first)
                stage = stage + within[j] * h
            h = stage
            if k > 0:
                exists = exists * (1.0 - self._no_stage(probs, k))
            ends = self._no_stage(probs, k + 1) if k + 1 < self.max_stages else 1.0  # P(no stage k + 2 | stage k + 1)
            head = p["head"][k]
            logits = logits + exists * ends * (h.mean((1, 2)) @ head["kernel"] + head["bias"])
            in_width = width
        return logits

    def expected_macs(self, probs: dict) -> jax.Array:
        """float: the relaxed network's MACs per example, differentiable in ``probs`` (as `apply_relaxed` takes them).

        Each layer's MACs (`macs`' formula) with its sizes replaced by their expectations - kernel area by
        E[k^2], channels by E[channels], hidden channels by E[in] E[expansion] - weighted by the probability that
        the layer runs (its block within the stage's depth, the stage within the network) and by P(family). Sizes
        of one layer are treated as independent (E[c_in c_out] as E[c_in] E[c_out]: a surrogate inside a stage,
        where both are the stage's width); for one-hot ``probs`` it is the candidate's `macs` exactly.
        """
        options = self.space["family"].options
        return sum(probs["family"][options.index(f)] * self._expected_family_macs(f, probs) for f in self.families)

    def _expected_family_macs(self, family: str, probs: dict) -> jax.Array:
        block_family = BLOCK_FAMILIES[family]
        height, width = self.image_shape[:2]
        if self.stem_stride == 2:
            height, width = -(-height // 2), -(-width // 2)
        n = height * width
        total = n * STEM_KERNEL * STEM_KERNEL * self.image_shape[2] * self.stem_width
        ci, exists = jnp.float32(self.stem_width), jnp.float32(1.0)

        def mean(name, power=1):
            return (probs[name] * jnp.asarray(self.space[name].options, jnp.float32) ** power).sum()

        for k in range(self.max_stages):
            s = f"stage{k + 1}."
            n_in = n
            if k > 0:
                height, width = -(-height // 2), -(-width // 2)
                n = height * width
                exists = exists * (1.0 - self._no_stage(probs, k))
            co, kernel = mean(s + "channels"), jnp.sqrt(mean(s + "kernel", 2))  # kernel**2 = E[k^2]
            expansion = mean(s + "expansion") if block_family.expansion else 1.0
            within = self._depth_if_present(probs[s + "depth"])
            for j in range(self.max_depth):
                runs = exists * within[j:].sum()  # P(block j + 1 runs)
                layers = block_layers(block_family, j == 0, ci if j == 0 else co, co, kernel, expansion, False,
                                      (n_in if j == 0 else n, n))
                total = total + runs * sum(m * kk * kk * (1 if dw else a) * b for kk, a, b, dw, m, _ in layers)
            ends = self._no_stage(probs, k + 1) if k + 1 < self.max_stages else 1.0
            total = total + exists * ends * co * self.num_classes  # the head of networks that end here
            ci = co
        return total

    def _depth_if_present(self, depth_p: jax.Array) -> jax.Array:
        """[max_depth]: P(depth = d | the stage exists), d = 1 .. max_depth, of a stage's depth weights. A zero
        total (GDAS sampled depth 0) gives zeros, and the double `where` keeps the gradient finite there."""
        within = depth_p[-self.max_depth:]
        total = within.sum()
        return jnp.where(total > 0, within / jnp.where(total > 0, total, 1.0), 0.0)

    def _no_stage(self, probs: dict, k: int) -> jax.Array:
        """P(stage k + 1 has depth 0) (k >= 1: stage 1 always exists)."""
        name = f"stage{k + 1}.depth"
        return probs[name][self.space[name].options.index(0)]

    def _head(self, heads: dict, enc: jax.Array, pooled: jax.Array) -> jax.Array:
        """Logits of the head of the candidate's number of stages (``heads[k]``: networks of k + 1 stages)."""
        last = sum((self.space.value(enc, f"stage{k + 1}.depth") >= 1).astype(jnp.int32)
                   for k in range(self.max_stages)) - 1
        kernel = jnp.stack([heads[k]["kernel"] for k in range(self.max_stages)])[last]
        bias = jnp.stack([heads[k]["bias"] for k in range(self.max_stages)])[last]
        return pooled @ kernel + bias

    def _features(self, family: str, p: dict, enc: jax.Array, x: jax.Array, given: dict | None,
                  codes: ActivationCodes | None = None):
        """Pooled features [B, C] of the last existing stage, and the BatchNorm statistics used."""
        space, fmt, block_family = self.space, self.conv_formulation, BLOCK_FAMILIES[family]
        stem = conv2d(x, p["stem"]["kernel"], self.stem_stride, fmt) + p["stem"]["bias"]
        if codes is not None:
            codes.add(stem)
        h = jax.nn.relu(stem)
        centre = jnp.abs(jnp.arange(self.max_kernel) - (self.max_kernel - 1) // 2)
        in_width = self.stem_width
        stats, pooled = {}, None
        for k in range(self.max_stages):
            s = f"stage{k + 1}."
            depth = space.value(enc, s + "depth")
            width = space.value(enc, s + "channels")
            inside = centre <= (space.value(enc, s + "kernel") - 1) // 2
            kernel_mask = (inside[:, None] & inside[None, :])[:, :, None, None]
            branches = [ACTIVATION_FNS[name] for name in space[s + "activation"].options]
            act_index = enc[space.index(s + "activation")]

            def act(z, valid, act_index=act_index, branches=branches):
                if codes is not None:
                    codes.add(z, valid)
                return jax.lax.switch(act_index, branches, z)

            expansion = space.value(enc, s + "expansion") if block_family.expansion else 1
            skip_on = space.value(enc, s + "skip") if block_family.optional_skip else False
            stats[k] = {}
            for j in range(self.max_depth):
                b = p["stages"][k][j]
                first = j == 0
                ci_max = self.stem_width if (k, j) == (0, 0) else self.max_width
                most = widths(ci_max, self.max_width, self.max_expansion if block_family.expansion else 1)
                real = widths(in_width if first else width, width, expansion)
                ops = _MaskedOps(
                    block_family.convs(first), b,
                    _Norms(b, None if given is None else given["stages"][k][j], space.value(enc, s + "norm")),
                    {name: jnp.arange(most[name]) < real[name] for name in most}, kernel_mask,
                    2 if k > 0 and j == 0 else 1, fmt, act,
                    j < depth,  # stage 1's first block always (depth >= 1); a later stage's only if it exists
                    skip_on,
                )
                out = block_family.forward(ops, h, first)
                stats[k][j] = ops.norms.recorded
                # Block 1 exists whenever the stage does; a missing stage is handled at the pooling below.
                h = out if first else jnp.where(j < depth, out, h)
            features = h.mean((1, 2))
            pooled = features if k == 0 else jnp.where(depth >= 1, features, pooled)
            in_width = width
        return pooled, {"stages": stats}

    # ------------------------------------------------------------------ architectures
    def largest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: ``enc`` with every stage at its largest depth, width, kernel and expansion.

        Jit-able; the "largest" end of the sandwich rule (family, activations, norm, skip, dropout kept).
        """
        return self._with_size(enc, pick=max, stages=self.max_stages)

    def smallest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: one block of the smallest width, kernel and expansion, the sandwich's small end."""
        return self._with_size(enc, pick=min, stages=1)

    def _with_size(self, enc, pick, stages):
        enc = jnp.asarray(enc, jnp.int32)
        for k in range(1, self.max_stages + 1):
            s = f"stage{k}."
            depths = self.space[s + "depth"].options
            # Stages after ``stages`` get depth 0 (an option of every stage but the first, which is always kept).
            enc = enc.at[..., self.space.index(s + "depth")].set(depths.index(pick(depths) if k <= stages else 0))
            for name in ("channels", "kernel", "expansion"):
                if s + name in self.space.names:
                    options = self.space[s + name].options
                    enc = enc.at[..., self.space.index(s + name)].set(options.index(pick(options)))
        return self.space.canonicalize(enc)

    def arch(self, enc: jax.Array) -> MacroArch:
        """Typed view of a valid conv-family ``enc`` [n_choices]; ValueError for other families."""
        arch = MacroArch.from_encoding(self.space, np.asarray(enc))
        if arch.family not in self.families:
            raise ValueError(
                f"encoding {self.space.to_string(np.asarray(enc))!r} is a {arch.family!r} architecture; "
                f"ConvSupernet handles only {self.families}"
            )
        return arch

    def layers(self, enc: jax.Array) -> list[tuple[int, int, int, bool, int, bool]]:
        """[(kernel, in_channels, out_channels, depthwise, output positions H * W, norm)] of the candidate's
        convolutions in order (stem first), the head last as a 1x1 "convolution" at one position."""
        arch = self.arch(enc)
        height, width = self.image_shape[:2]
        if self.stem_stride == 2:
            height, width = -(-height // 2), -(-width // 2)
        n = height * width
        layers = [(STEM_KERNEL, self.image_shape[2], self.stem_width, False, n, False)]
        ci = self.stem_width
        for k, stage in enumerate(arch.stages):
            n_in = n  # the resolution entering the stage (block 1 strides inside)
            if k > 0:
                height, width = -(-height // 2), -(-width // 2)
                n = height * width
            for j in range(stage.depth):
                layers += block_layers(BLOCK_FAMILIES[arch.family], j == 0, ci, stage.width, stage.kernel,
                                       stage.expansion or 1, stage.norm, (n_in if j == 0 else n, n))
                ci = stage.width
        layers.append((1, ci, self.num_classes, False, 1, False))
        return layers

    def param_count(self, enc: jax.Array) -> int:
        """Analytic parameter count: kernels, biases, BatchNorm scale + bias where on (running statistics are
        buffers, not parameters)."""
        total = 0
        for kk, ci, co, depthwise, _, norm in self.layers(enc):
            total += kk * kk * (1 if depthwise else ci) * co + co + (2 * co if norm else 0)
        return total

    def macs(self, enc: jax.Array) -> int:
        """Analytic multiply-accumulates per example (MACs) of every convolution and the head: output positions
        x kernel area x input channels per group x output channels. Element-wise work (bias, BatchNorm,
        activation, pooling) is not counted, as usual for MACs."""
        return sum(n * kk * kk * (1 if depthwise else ci) * co for kk, ci, co, depthwise, n, _ in self.layers(enc))

    # ------------------------------------------------------------------ twin
    def extract(self, params: dict, enc: jax.Array, bn_stats: dict | None = None) -> tuple[dict, TwinConvNet]:
        """The standalone twin of ``enc`` [n_choices]: ``(twin_params, twin)``.

        ``twin`` is a `TwinConvNet` holding the supernet weights sliced to the candidate's widths, kernels
        centre-cropped, inactive blocks left out, and ``bn_stats`` (from `recalibrate_bn` for this ``enc``) sliced
        into its BatchNorm running statistics; ``twin_params`` is its parameter state as a plain dict (what gets
        exported and counted). Its logits equal ``apply(params, enc, x, train=False, bn_stats=bn_stats)`` up to
        float summation order.
        """
        arch = self.arch(enc)
        if bn_stats is None and any(stage.norm for stage in arch.stages):
            raise ValueError(
                f"{self.space.to_string(np.asarray(enc))!r} uses BatchNorm, so its twin needs this subnet's "
                "statistics: pass bn_stats=supernet.recalibrate_bn(params, enc, x_batches)"
            )
        family = arch.family
        p = params[family]
        stats = None if bn_stats is None else bn_stats[family]
        twin = nnx.eval_shape(
            lambda: TwinConvNet(
                arch, self.image_shape[2], self.stem_width, self.num_classes, rngs=nnx.Rngs(0),
                stem_stride=self.stem_stride,
            )
        )
        blocks, block_stats = {}, {}
        ci = self.stem_width
        for k, stage in enumerate(arch.stages):
            co = stage.width
            for j in range(stage.depth):
                b, i = p["stages"][k][j], len(blocks)
                first = j == 0
                w = widths(ci, co, stage.expansion or 1)
                sliced = {}
                for layer in BLOCK_FAMILIES[family].layers(first):
                    kernel = b[layer.name]["kernel"]
                    own = kernel[own_slices(kernel.shape, layer.kernel_shape(stage.kernel, w))]
                    sliced[layer.name] = {"kernel": own, "bias": b[layer.name]["bias"][: own.shape[-1]]}
                norms = {name: w[width] for name, width in BLOCK_FAMILIES[family].norms(first).items()}
                if stage.norm:
                    sliced |= {name: {v: b[name][v][:c] for v in ("scale", "bias")} for name, c in norms.items()}
                    block_stats[i] = {
                        name: {v: stats["stages"][k][j][name][v][:c] for v in ("mean", "var")}
                        for name, c in norms.items()
                    }
                blocks[i] = sliced
                ci = co
        last = p["head"][len(arch.stages) - 1]
        head = {"kernel": last["kernel"][:ci], "bias": last["bias"]}
        state = nnx.state(twin, nnx.Param)
        state.replace_by_pure_dict({"stem": p["stem"], "blocks": blocks, "head": head})
        nnx.update(twin, state)
        if block_stats:
            running = nnx.state(twin, nnx.BatchStat)
            running.replace_by_pure_dict({"blocks": block_stats})
            nnx.update(twin, running)
        return state.to_pure_dict(), concrete_rngs(twin)

