"""The MLP family of the macro space as one masked supernet, and its exact standalone twin.

Supernet layout (``Wmax`` = the space's largest ``units`` option, ``D`` = flattened input size)::

    x [B, H, W, C] -> flatten [B, D]
    stage k = 1 .. max_stages, block j = 1 .. max_depth:
        z = h @ kernel + bias                 kernel [D, Wmax] for stage 1 block 1, else [Wmax, Wmax]
        z = LayerNorm(z) over active units    (stage norm on)
        a = activation(z) * width_mask        (stage activation; units >= stage width are exactly 0)
        out = h + a                           (stage skip on and j >= 2: residual within a stage)
        h = out if j <= stage depth else h    (an inactive block is exactly the identity)
    dropout(h) (train only) -> head: h @ kernel [Wmax, classes] + bias

A stage's first block projects to the stage's width and is active whenever the stage exists; the skip of
a stage therefore acts on its blocks 2 .. depth, whose input and output widths always agree. Masked units
hold exact zeros, so they add exactly nothing to the next matmul: the masked supernet computes the
candidate's own function, which the twin (the same layers sliced to the real widths) reproduces.
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
from jaxnas.supernet.codes import ActivationCodes
from jaxnas.supernet.weights import concrete_rngs, lecun_init

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
}
NORM_EPSILON = 1e-5


class _Block(nnx.Module):
    def __init__(self, in_features: int, out_features: int, norm: bool, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, out_features, rngs=rngs)
        self.norm = (
            nnx.LayerNorm(out_features, epsilon=NORM_EPSILON, use_fast_variance=False, rngs=rngs) if norm else None
        )


class _SupernetWeights(nnx.Module):
    """Declares the supernet's parameters at the largest width; `MLPSupernet.init` takes its state."""

    def __init__(self, in_features: int, width: int, max_stages: int, max_depth: int, classes: int, rngs: nnx.Rngs):
        def block(k: int, j: int) -> _Block:
            return _Block(in_features if (k, j) == (0, 0) else width, width, True, rngs=rngs)

        self.stages = nnx.List([nnx.List([block(k, j) for j in range(max_depth)]) for k in range(max_stages)])
        self.head = nnx.Linear(width, classes, rngs=rngs)


class TwinMLP(nnx.Module):
    """The compact standalone model of one MLP architecture: real widths, no masks, inactive blocks left out.

    ``twin(x [B, H, W, C] or [B, D]) -> logits [B, classes]``; dropout is active only after ``twin.train()``.
    """

    def __init__(self, arch: MacroArch, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        if arch.family != "mlp":
            raise ValueError(f"TwinMLP builds MLP architectures, got family {arch.family!r}; use that family's twin")
        blocks, activations, skips = [], [], []
        width = in_features
        for stage in arch.stages:
            for j in range(stage.depth):
                blocks.append(_Block(width, stage.width, stage.norm, rngs=rngs))
                activations.append(stage.activation)
                skips.append(stage.skip and j > 0)
                width = stage.width
        self.blocks = nnx.List(blocks)
        self.activations = tuple(activations)
        self.skips = tuple(skips)
        self.dropout = nnx.Dropout(arch.dropout, deterministic=True, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for block, activation, skip in zip(self.blocks, self.activations, self.skips, strict=True):
            z = block.dense(h)
            if block.norm is not None:
                z = block.norm(z)
            a = ACTIVATION_FNS[activation](z)
            h = h + a if skip else a
        return self.head(self.dropout(h))


@dataclasses.dataclass(frozen=True)
class MLPSupernet:
    """Weight-sharing supernet of the macro space's MLP family (layout in the module docstring).

    Hashable, so its bound ``apply`` can be a static argument of `jax.jit` (the population functions do this).

    Attributes:
      space: a `macro_space` that includes the ``mlp`` family; ``apply`` reads only MLP-family encodings.
      in_features: D, the flattened input size (H * W * C).
      num_classes: number of logits.
    """

    space: Space
    in_features: int
    num_classes: int

    def __post_init__(self) -> None:
        if "family" not in self.space.names or "mlp" not in self.space["family"].options:
            raise ValueError(
                f"MLPSupernet needs a macro space with the 'mlp' family, got {self.space!r}; "
                "build one with macro_space(families=('mlp', ...))"
            )
        if self.in_features < 1 or self.num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {self.in_features} and {self.num_classes}")

    @property
    def max_stages(self) -> int:
        return sum(1 for n in self.space.names if n.endswith(".depth"))

    @property
    def max_depth(self) -> int:
        return max(self.space["stage1.depth"].options)

    @property
    def max_width(self) -> int:
        return max(self.space["stage1.units"].options)

    def init(self, key: jax.Array) -> dict:
        """Supernet parameters, a plain dict pytree (``{"stages": {k: {j: {"dense", "norm"}}}, "head"}``).

        Initialised like flax's Linear / LayerNorm (kernels LeCun-normal, biases 0, norm scales 1), but from
        one flat random draw: XLA:CPU compiles one draw far faster than one per layer, which matters under
        ``jax.vmap(supernet.init)(keys [P])`` (P independent candidates, see `init_population`).
        """
        return self._compiled_init()(key)

    @functools.cache  # noqa: B019 - the supernet is a small frozen value; one compiled init per distinct supernet
    def _compiled_init(self) -> Callable[[jax.Array], dict]:
        # Compiled, because eagerly every op of the random draw would compile on its own (seconds on CPU).
        shapes = nnx.state(
            nnx.eval_shape(
                lambda: _SupernetWeights(
                    self.in_features, self.max_width, self.max_stages, self.max_depth, self.num_classes, nnx.Rngs(0)
                )
            ),
            nnx.Param,
        ).to_pure_dict()
        return jax.jit(functools.partial(lecun_init, shapes=shapes))

    def apply(
        self, params: dict, enc: jax.Array, x: jax.Array, *, train: bool, key: jax.Array | None,
        codes: ActivationCodes | None = None,
    ) -> jax.Array:
        """logits [B, classes] float32 of the subnet ``enc`` int32 [n_choices] on ``x`` [B, H, W, C] (or [B, D]).

        Pure and jit/vmap-able over (params, enc). ``key`` drives dropout and is needed only when ``train``.
        ``codes`` records the activation codes of the candidate's units (`activation_kernel`).
        """
        space = self.space
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.in_features:
            raise ValueError(
                f"inputs flatten to {h.shape[1]} features, but this supernet was built for in_features="
                f"{self.in_features}; build MLPSupernet(space, in_features={h.shape[1]}, ...)"
            )
        units = jnp.arange(self.max_width)
        for k in range(self.max_stages):
            s = f"stage{k + 1}."
            depth = space.value(enc, s + "depth")
            width = space.value(enc, s + "units")
            width_mask = units < width
            norm = space.value(enc, s + "norm")
            skip = space.value(enc, s + "skip")
            act_index = enc[space.index(s + "activation")]
            branches = [ACTIVATION_FNS[name] for name in space[s + "activation"].options]
            for j in range(self.max_depth):
                block = params["stages"][k][j]
                z = h @ block["dense"]["kernel"] + block["dense"]["bias"]
                z = jnp.where(norm, _masked_layer_norm(z, width_mask, width, block["norm"]), z)
                if codes is not None:
                    codes.add(z, width_mask & ((k, j) == (0, 0) or j < depth))
                a = jnp.where(width_mask, jax.lax.switch(act_index, branches, z), 0.0)
                if j == 0:
                    out = a
                else:
                    out = jnp.where(skip, h + a, a)
                # Stage 1 block 1 always exists (stage1.depth >= 1) and alone changes the feature size.
                h = out if (k, j) == (0, 0) else jnp.where(j < depth, out, h)
        if train:
            if key is None:
                raise ValueError("apply(..., train=True) needs a PRNG key for dropout; pass key=jax.random.key(seed)")
            rate = space.value(enc, "dropout")
            keep = jax.random.uniform(key, h.shape) >= rate
            h = jnp.where(keep, h / (1.0 - rate), 0.0)
        return h @ params["head"]["kernel"] + params["head"]["bias"]

    def activation_kernel(self, params: dict, enc: jax.Array, x: jax.Array) -> jax.Array:
        """NASWOT's kernel [B, B] of the candidate ``enc`` on ``x`` (`jaxnas.supernet.codes`); jit/vmap-able."""
        codes = ActivationCodes(x.shape[0])
        self.apply(params, enc, x, train=False, key=None, codes=codes)
        return codes.kernel

    def largest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: ``enc`` with every stage at its largest depth and width (other choices kept).

        Jit-able; the "largest" end of the sandwich rule. Stages that ``enc`` left out take option index 0 for
        their other choices (the inactive placeholder, itself a valid option).
        """
        return self._with_size(enc, depth=max, width=max, stages=self.max_stages)

    def smallest(self, enc: jax.Array) -> jax.Array:
        """int32 [..., n_choices]: one block of the smallest width (stage-1 choices kept), the sandwich's small end."""
        return self._with_size(enc, depth=min, width=min, stages=1)

    def _with_size(self, enc, depth, width, stages):
        enc = jnp.asarray(enc, jnp.int32)
        for k in range(1, self.max_stages + 1):
            s = f"stage{k}."
            depths = self.space[s + "depth"].options
            # Stages after ``stages`` get depth 0 (an option of every stage but the first, which is always kept).
            enc = enc.at[..., self.space.index(s + "depth")].set(depths.index(depth(depths) if k <= stages else 0))
            units = self.space[s + "units"].options
            enc = enc.at[..., self.space.index(s + "units")].set(units.index(width(units)))
        return self.space.canonicalize(enc)

    def arch(self, enc: jax.Array) -> MacroArch:
        """Typed view of a valid MLP-family ``enc`` [n_choices]; ValueError for other families."""
        arch = MacroArch.from_encoding(self.space, np.asarray(enc))
        if arch.family != "mlp":
            raise ValueError(
                f"encoding {self.space.to_string(np.asarray(enc))!r} is a {arch.family!r} architecture; "
                "MLPSupernet handles only the 'mlp' family"
            )
        return arch

    def layer_sizes(self, enc: jax.Array) -> list[tuple[int, int, bool]]:
        """[(in_features, out_features, norm)] of the candidate's dense layers in order, the head last (norm False)."""
        sizes = []
        width = self.in_features
        for stage in self.arch(enc).stages:
            for _ in range(stage.depth):
                sizes.append((width, stage.width, stage.norm))
                width = stage.width
        sizes.append((width, self.num_classes, False))
        return sizes

    def param_count(self, enc: jax.Array) -> int:
        """Analytic parameter count of the candidate: kernels, biases, and LayerNorm scale + bias where on."""
        return sum(i * o + o + (2 * o if norm else 0) for i, o, norm in self.layer_sizes(enc))

    def macs(self, enc: jax.Array) -> int:
        """Analytic multiply-accumulates per example (MACs) of the candidate's dense layers and head.

        Element-wise work (bias, norm, activation) is not counted, as usual for MACs.
        """
        return sum(i * o for i, o, _ in self.layer_sizes(enc))

    def extract(self, params: dict, enc: jax.Array) -> tuple[dict, TwinMLP]:
        """The standalone twin of ``enc`` [n_choices]: ``(twin_params, twin)``.

        ``twin`` is a `TwinMLP` holding the supernet weights sliced to the candidate's widths (inactive blocks
        left out); ``twin_params`` is its parameter state as a plain dict (what gets exported and counted).
        Its logits equal ``apply(params, enc, x, train=False)`` up to float summation order.
        """
        arch = self.arch(enc)
        # Built abstractly (no random init to throw away), then filled with the sliced weights.
        twin = nnx.eval_shape(lambda: TwinMLP(arch, self.in_features, self.num_classes, rngs=nnx.Rngs(0)))
        blocks = {}
        width = self.in_features
        for k, stage in enumerate(arch.stages):
            for j in range(stage.depth):
                block = params["stages"][k][j]
                sliced = {
                    "dense": {
                        "kernel": block["dense"]["kernel"][:width, : stage.width],
                        "bias": block["dense"]["bias"][: stage.width],
                    }
                }
                if stage.norm:
                    sliced["norm"] = {name: v[: stage.width] for name, v in block["norm"].items()}
                blocks[len(blocks)] = sliced
                width = stage.width
        head = {"kernel": params["head"]["kernel"][:width], "bias": params["head"]["bias"]}
        state = nnx.state(twin, nnx.Param)
        state.replace_by_pure_dict({"blocks": blocks, "head": head})
        nnx.update(twin, state)
        return state.to_pure_dict(), concrete_rngs(twin)


def _masked_layer_norm(z: jax.Array, mask: jax.Array, width: jax.Array, norm: dict) -> jax.Array:
    """LayerNorm of z [B, Wmax] whose statistics use only the ``width`` active units (mask bool [Wmax]).

    Matches flax's LayerNorm (use_fast_variance=False) on the sliced units, so the twin agrees.
    """
    n = width.astype(z.dtype)
    mean = jnp.sum(jnp.where(mask, z, 0.0), -1, keepdims=True) / n
    centred = jnp.where(mask, z - mean, 0.0)
    var = jnp.sum(centred * centred, -1, keepdims=True) / n
    return centred * jax.lax.rsqrt(var + NORM_EPSILON) * norm["scale"] + norm["bias"]

