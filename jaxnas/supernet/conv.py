"""The conv families of the macro space (cnn, resnet, mobilenet) as one masked supernet, and their exact twins.

Supernet layout per family (``C`` = largest ``channels`` option, ``K`` = largest kernel, ``E`` = largest
expansion, ``S`` = stem channels; images NHWC)::

    x [B, H, W, Cin] -> stem: 3x3 conv Cin -> S + bias, relu, stride 1 or 2   (fixed: not searched)
    stage k = 1 .. max_stages (stride 2 in the first block of every stage after the first), block j:
        cnn        conv KxK -> BN -> act; + h when skip on and j >= 2
        resnet     conv KxK -> BN -> act -> conv KxK -> BN, + shortcut, act
                   shortcut: 1x1 conv (stride, new width) in block 1, h in blocks 2 .. depth
        mobilenet  1x1 expand to in_width * expansion -> BN -> act -> depthwise KxK (stride) -> BN -> act
                   -> 1x1 project -> BN (linear bottleneck); + h in blocks 2 .. depth
        h = block(h) if j <= stage depth else h      (an inactive block is exactly the identity)
    global average pool of the last existing stage [B, C] -> dropout (train only) -> head [C, classes] (one head per
    number of stages: ``head[k]`` classifies networks of k + 1 stages)

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

from jaxnas.spaces import MacroArch, Space
from jaxnas.spaces.macro import CONV_FAMILIES
from jaxnas.supernet.codes import ActivationCodes
from jaxnas.supernet.mlp import ACTIVATION_FNS
from jaxnas.supernet.ops import FORMULATIONS, conv2d, depthwise_conv2d
from jaxnas.supernet.weights import lecun_init, own_slices

NORM_EPSILON = 1e-5
STEM_KERNEL = 3


# ---------------------------------------------------------------------------------------------- twin
def _conv(ci: int, co: int, k: int, stride: int, rngs: nnx.Rngs, groups: int = 1) -> nnx.Conv:
    p = (k - 1) // 2
    return nnx.Conv(
        ci, co, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), feature_group_count=groups, rngs=rngs
    )


def _bn(c: int, norm: bool, rngs: nnx.Rngs) -> nnx.BatchNorm | None:
    return nnx.BatchNorm(c, use_running_average=True, epsilon=NORM_EPSILON, rngs=rngs) if norm else None


def _normed(norm: nnx.BatchNorm | None, z: jax.Array) -> jax.Array:
    return z if norm is None else norm(z)


class _TwinCNNBlock(nnx.Module):
    def __init__(self, ci: int, co: int, k: int, stride: int, norm: bool, activation: str, skip: bool, rngs):
        self.conv = _conv(ci, co, k, stride, rngs)
        self.norm = _bn(co, norm, rngs)
        self.activation = activation
        self.skip = skip

    def __call__(self, h: jax.Array) -> jax.Array:
        a = ACTIVATION_FNS[self.activation](_normed(self.norm, self.conv(h)))
        return h + a if self.skip else a


class _TwinResidualBlock(nnx.Module):
    def __init__(self, ci: int, co: int, k: int, stride: int, norm: bool, activation: str, first: bool, rngs):
        self.conv1 = _conv(ci, co, k, stride, rngs)
        self.norm1 = _bn(co, norm, rngs)
        self.conv2 = _conv(co, co, k, 1, rngs)
        self.norm2 = _bn(co, norm, rngs)
        self.shortcut = _conv(ci, co, 1, stride, rngs) if first else None
        self.activation = activation

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATION_FNS[self.activation]
        z = _normed(self.norm2, self.conv2(act(_normed(self.norm1, self.conv1(h)))))
        return act(z + (h if self.shortcut is None else self.shortcut(h)))


class _TwinInvertedResidualBlock(nnx.Module):
    def __init__(self, ci: int, co: int, k: int, stride: int, expansion: int, norm: bool, activation: str, first, rngs):
        hidden = ci * expansion
        self.expand = _conv(ci, hidden, 1, 1, rngs)
        self.expand_norm = _bn(hidden, norm, rngs)
        self.depthwise = _conv(hidden, hidden, k, stride, rngs, groups=hidden)
        self.depthwise_norm = _bn(hidden, norm, rngs)
        self.project = _conv(hidden, co, 1, 1, rngs)
        self.project_norm = _bn(co, norm, rngs)
        self.activation = activation
        self.residual = not first

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATION_FNS[self.activation]
        a = act(_normed(self.expand_norm, self.expand(h)))
        a = act(_normed(self.depthwise_norm, self.depthwise(a)))
        z = _normed(self.project_norm, self.project(a))
        return h + z if self.residual else z


class TwinConvNet(nnx.Module):
    """The compact standalone model of one cnn / resnet / mobilenet architecture: real widths, cropped kernels,
    inactive blocks left out, BatchNorm in inference mode (running statistics = the recalibrated ones).

    ``twin(x [B, H, W, C]) -> logits [B, classes]``; dropout is active only after ``twin.train()``.
    """

    def __init__(
        self, arch: MacroArch, in_channels: int, stem_channels: int, num_classes: int, *, rngs: nnx.Rngs,
        stem_stride: int = 1,
    ):
        if arch.family not in CONV_FAMILIES:
            raise ValueError(f"TwinConvNet builds {CONV_FAMILIES} architectures, got family {arch.family!r}")
        self.stem = _conv(in_channels, stem_channels, STEM_KERNEL, stem_stride, rngs)
        blocks = []
        width = stem_channels
        for k, stage in enumerate(arch.stages):
            for j in range(stage.depth):
                stride = 2 if k > 0 and j == 0 else 1
                common = (width, stage.width, stage.kernel, stride)
                if arch.family == "cnn":
                    blocks.append(_TwinCNNBlock(*common, stage.norm, stage.activation, stage.skip and j > 0, rngs))
                elif arch.family == "resnet":
                    blocks.append(_TwinResidualBlock(*common, stage.norm, stage.activation, j == 0, rngs))
                else:
                    blocks.append(
                        _TwinInvertedResidualBlock(*common, stage.expansion, stage.norm, stage.activation, j == 0, rngs)
                    )
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
        if self.given is None:
            mean = z.mean((0, 1, 2))
            var = jnp.square(z - mean).mean((0, 1, 2))
        else:
            mean, var = self.given[name]["mean"], self.given[name]["var"]
        self.recorded[name] = {"mean": mean, "var": var}
        # The order of operations of flax's BatchNorm, so the twin agrees to the last bits it can.
        y = (z - mean) * (jax.lax.rsqrt(var + NORM_EPSILON) * self.params[name]["scale"]) + self.params[name]["bias"]
        return jnp.where(self.on, y, z)


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
                f"ConvSupernet needs a macro space with a conv family {CONV_FAMILIES}, got {self.space!r}; "
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
        return tuple(f for f in self.space["family"].options if f in CONV_FAMILIES)

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
        return max(self.space["stage1.expansion"].options) if "mobilenet" in self.families else 1

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

        def conv(k, ci, co, groups=1):
            return {"kernel": f32(k, k, ci // groups, co), "bias": f32(co)}

        def norm(c):
            return {"scale": f32(c), "bias": f32(c)}

        c, kk, e = self.max_width, self.max_kernel, self.max_expansion

        def block(family, ci, first):
            if family == "cnn":
                return {"conv": conv(kk, ci, c), "norm": norm(c)}
            if family == "resnet":
                shortcut = {"shortcut": conv(1, ci, c)} if first else {}
                convs = {"conv1": conv(kk, ci, c), "conv2": conv(kk, c, c)}
                return convs | {"norm1": norm(c), "norm2": norm(c)} | shortcut
            hidden = ci * e
            return {
                "expand": conv(1, ci, hidden),
                "expand_norm": norm(hidden),
                "depthwise": conv(kk, hidden, hidden, groups=hidden),
                "depthwise_norm": norm(hidden),
                "project": conv(1, hidden, c),
                "project_norm": norm(c),
            }

        def network(family):
            stages = {
                k: {j: block(family, self.stem_width if (k, j) == (0, 0) else c, j == 0) for j in range(self.max_depth)}
                for k in range(self.max_stages)
            }
            stem = conv(STEM_KERNEL, self.image_shape[2], self.stem_width)
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
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"inputs must be [B, H, W, C] = [B, {', '.join(map(str, self.image_shape))}], got shape {x.shape}; "
                f"build ConvSupernet(space, image_shape={tuple(x.shape[1:])}, ...) for these images"
            )
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
        space, fmt = self.space, self.conv_formulation
        stem = conv2d(x, p["stem"]["kernel"], self.stem_stride, fmt) + p["stem"]["bias"]
        if codes is not None:
            codes.add(stem)
        h = jax.nn.relu(stem)
        channel = jnp.arange(self.max_width)
        centre = jnp.abs(jnp.arange(self.max_kernel) - (self.max_kernel - 1) // 2)
        in_width = self.stem_width
        stats, pooled = {}, None
        for k in range(self.max_stages):
            s = f"stage{k + 1}."
            depth = space.value(enc, s + "depth")
            width = space.value(enc, s + "channels")
            mask = channel < width
            inside = centre <= (space.value(enc, s + "kernel") - 1) // 2
            kernel_mask = (inside[:, None] & inside[None, :])[:, :, None, None]
            branches = [ACTIVATION_FNS[name] for name in space[s + "activation"].options]
            act_index = enc[space.index(s + "activation")]

            def act(z, valid, act_index=act_index, branches=branches):
                if codes is not None:
                    codes.add(z, valid)
                return jax.lax.switch(act_index, branches, z)

            def conv(h, layer, stride=1, elastic=False, depthwise=False):
                kernel = jnp.where(kernel_mask, layer["kernel"], 0.0) if elastic else layer["kernel"]
                op = depthwise_conv2d if depthwise else conv2d
                return op(h, kernel, stride, fmt) + layer["bias"]

            stats[k] = {}
            for j in range(self.max_depth):
                b = p["stages"][k][j]
                norms = _Norms(b, None if given is None else given["stages"][k][j], space.value(enc, s + "norm"))
                stride = 2 if k > 0 and j == 0 else 1
                first = j == 0
                active = j < depth  # stage 1's first block always (depth >= 1); a later stage's only if it exists
                if family == "cnn":
                    z = norms("norm", conv(h, b["conv"], stride, elastic=True))
                    a = jnp.where(mask, act(z, mask & active), 0.0)
                    out = a if first else jnp.where(space.value(enc, s + "skip"), h + a, a)
                elif family == "resnet":
                    z = norms("norm1", conv(h, b["conv1"], stride, elastic=True))
                    a = jnp.where(mask, act(z, mask & active), 0.0)
                    z = norms("norm2", conv(a, b["conv2"], elastic=True))
                    out = jnp.where(mask, act(z + (conv(h, b["shortcut"], stride) if first else h), mask & active), 0.0)
                else:
                    # Hidden units beyond in_width * expansion are zero, matching the twin's sliced hidden layer.
                    n_hidden = (in_width if first else width) * space.value(enc, s + "expansion")
                    hidden = jnp.arange(b["expand"]["kernel"].shape[-1]) < n_hidden
                    a = jnp.where(hidden, act(norms("expand_norm", conv(h, b["expand"])), hidden & active), 0.0)
                    a = conv(a, b["depthwise"], stride, elastic=True, depthwise=True)
                    a = jnp.where(hidden, act(norms("depthwise_norm", a), hidden & active), 0.0)
                    z = jnp.where(mask, norms("project_norm", conv(a, b["project"])), 0.0)
                    out = z if first else h + z
                stats[k][j] = norms.recorded
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
            n_in = n  # the resolution entering the stage: mobilenet's first expansion runs before the stride
            if k > 0:
                height, width = -(-height // 2), -(-width // 2)
                n = height * width
            co, kk, norm = stage.width, stage.kernel, stage.norm
            for j in range(stage.depth):
                if arch.family == "cnn":
                    layers.append((kk, ci, co, False, n, norm))
                elif arch.family == "resnet":
                    layers += [(kk, ci, co, False, n, norm), (kk, co, co, False, n, norm)]
                    layers += [(1, ci, co, False, n, False)] if j == 0 else []
                else:
                    hidden = ci * stage.expansion
                    layers += [
                        (1, ci, hidden, False, n_in if j == 0 else n, norm),
                        (kk, hidden, hidden, True, n, norm),
                        (1, hidden, co, False, n, norm),
                    ]
                ci = co
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
                hidden = ci * (stage.expansion or 1)

                def conv(name, n_in, n_out, elastic=False, b=b, k=stage.kernel):
                    kernel = b[name]["kernel"]
                    size = k if elastic else kernel.shape[0]
                    own = kernel[own_slices(kernel.shape, (size, size, n_in, n_out))]
                    return {"kernel": own, "bias": b[name]["bias"][:n_out]}

                if family == "cnn":
                    sliced, norms = {"conv": conv("conv", ci, co, True)}, {"norm": co}
                elif family == "resnet":
                    sliced = {"conv1": conv("conv1", ci, co, True), "conv2": conv("conv2", co, co, True)}
                    sliced |= {"shortcut": conv("shortcut", ci, co)} if j == 0 else {}
                    norms = {"norm1": co, "norm2": co}
                else:
                    sliced = {
                        "expand": conv("expand", ci, hidden),
                        "depthwise": conv("depthwise", 1, hidden, True),
                        "project": conv("project", hidden, co),
                    }
                    norms = {"expand_norm": hidden, "depthwise_norm": hidden, "project_norm": co}
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
        return state.to_pure_dict(), twin

