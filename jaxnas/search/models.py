"""One surface over the supernets of a search space, as the run loop needs it.

`SearchModel` wraps the family supernets of a space (macro: `MLPSupernet` and / or `ConvSupernet`, selected per
candidate by its family) behind the population functions' signature:

    model.init(key) -> params                                   (one candidate, or the shared supernet)
    model.apply(params, enc, x, *, train, key) -> logits [B, classes]      (training; BatchNorm on batch stats)
    model.statistics(params_P, encs [P, n], x_batches) -> per-candidate BatchNorm statistics (or None)
    model.apply_eval(variables, enc, x, *, train, key)          variables = {"params", "bn_stats"}
    model.param_count(enc), model.macs(enc)                     analytic, per example
    model.extract(params, enc, bn_stats) -> (twin_state, twin)  the compact standalone twin (an nnx.Module)

`LMModel` (space lm) is the same surface over `LMSupernet`: x is token ids [B, T] int32, the logits are
[B, T, vocab], ``macs`` counts per token, and ``image_shape`` / ``num_classes`` are (seq_len,) / the vocabulary.

Everything is a frozen dataclass, so bound methods are hashable static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnas.config import SpaceConfig
from jaxnas.spaces import lm_space, macro_space, nb201_space, transformer_space
from jaxnas.spaces.core import Space
from jaxnas.spaces.macro import CONV_FAMILIES
from jaxnas.supernet import ConvSupernet, LMSupernet, MLPSupernet, NB201Supernet, TransformerSupernet


def build_space(cfg: SpaceConfig) -> Space:
    """The `Space` a `SpaceConfig` describes."""
    if cfg.name == "macro":
        return macro_space(
            families=cfg.families,
            max_stages=cfg.max_stages,
            max_depth=cfg.max_depth,
            channels=cfg.channels,
            units=cfg.units,
            kernels=cfg.kernels,
            expansions=cfg.expansions,
            activations=cfg.activations,
            dropouts=cfg.dropouts,
            norms=cfg.batchnorm,
            skips=cfg.skip,
        )
    if cfg.name == "nb201":
        return nb201_space()
    if cfg.name == "lm":
        return lm_space(
            max_layers=cfg.max_layers, hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads,
            ffn_mults=cfg.ffn_mults, norms=cfg.norms, activations=cfg.lm_activations, mixers=cfg.mixers,
            positions=cfg.positions,
        )
    return transformer_space(
        max_layers=cfg.max_layers, hidden=cfg.hidden, heads=cfg.heads, ffn_mults=cfg.ffn_mults, norms=cfg.norms,
        activations=cfg.transformer_activations, positions=cfg.positions,
    )


@dataclasses.dataclass(frozen=True)
class SearchModel:
    """The macro space's supernets for one dataset (see the module docstring).

    Attributes:
      space: a `macro_space`.
      image_shape: (H, W, C) of the inputs.
      num_classes: number of logits.
      stem_stride: stride of the conv families' fixed stem.
    """

    space: Space
    image_shape: tuple[int, int, int]
    num_classes: int
    stem_stride: int = 1

    @functools.cached_property
    def mlp(self) -> MLPSupernet | None:
        if "mlp" not in self.space["family"].options:
            return None
        return MLPSupernet(self.space, int(np.prod(self.image_shape)), self.num_classes)

    @functools.cached_property
    def conv(self) -> ConvSupernet | None:
        if not any(f in CONV_FAMILIES for f in self.space["family"].options):
            return None
        return ConvSupernet(self.space, tuple(self.image_shape), self.num_classes, stem_stride=self.stem_stride)

    @property
    def uses_batchnorm(self) -> bool:
        """Whether candidates may carry BatchNorm (conv families): evaluation then needs recalibrated statistics."""
        return self.conv is not None

    has_activation_kernel = True  # NASWOT (`activation_kernel`) for every family

    def _parts(self) -> dict:
        return {name: part for name, part in (("mlp", self.mlp), ("conv", self.conv)) if part is not None}

    def _family_index(self, enc: jax.Array) -> jax.Array:
        return enc[self.space.index("family")]

    def family(self, enc) -> str:
        return self.space["family"].options[int(np.asarray(enc)[self.space.index("family")])]

    def _part_for(self, enc):
        return self.mlp if self.family(enc) == "mlp" else self.conv

    # ------------------------------------------------------------------ population signature
    def init(self, key: jax.Array) -> dict:
        """``{"mlp": ..., "conv": ...}``: parameters of every family present (one flat draw each)."""
        keys = jax.random.split(key, 2)
        return {name: part.init(k) for (name, part), k in zip(self._parts().items(), keys)}

    def apply(self, params: dict, enc: jax.Array, x: jax.Array, *, train: bool, key=None, bn_stats=None) -> jax.Array:
        """logits [B, classes] of candidate ``enc`` [n_choices]; with both parts, each computes and the family picks."""
        out = {}
        if self.mlp is not None:
            out["mlp"] = self.mlp.apply(params["mlp"], enc, x, train=train, key=key)
        if self.conv is not None:
            out["conv"] = self.conv.apply(params["conv"], enc, x, train=train, key=key, bn_stats=bn_stats)
        if len(out) == 1:
            return next(iter(out.values()))
        is_mlp = self._family_index(enc) == self.space["family"].options.index("mlp")
        return jnp.where(is_mlp, out["mlp"], out["conv"])

    def apply_eval(self, variables: dict, enc: jax.Array, x: jax.Array, *, train: bool, key=None) -> jax.Array:
        """`apply` with ``variables = {"params", "bn_stats"}`` (the statistics of this candidate, or None)."""
        return self.apply(variables["params"], enc, x, train=train, key=key, bn_stats=variables["bn_stats"])

    def activation_kernel(self, params: dict, enc: jax.Array, x: jax.Array) -> jax.Array:
        """NASWOT's kernel [B, B] of candidate ``enc`` on ``x`` (`jaxnas.supernet.codes`)."""
        out = {name: part.activation_kernel(params[name], enc, x) for name, part in self._parts().items()}
        if len(out) == 1:
            return next(iter(out.values()))
        is_mlp = self._family_index(enc) == self.space["family"].options.index("mlp")
        return jnp.where(is_mlp, out["mlp"], out["conv"])

    def statistics(self, params, encs: jax.Array, x_batches: jax.Array, *, shared: bool):
        """BatchNorm statistics of every candidate (leaves [P, ...]), or None without conv families.

        ``params`` are one shared supernet (``shared=True``) or per-candidate params_P; ``x_batches`` is
        [n, B, H, W, C] training batches.
        """
        if self.conv is None:
            return None
        fn = _recalibrate_shared if shared else _recalibrate_population
        return fn(self.conv, params["conv"], jnp.asarray(encs, jnp.int32), x_batches)

    # ------------------------------------------------------------------ analytic objectives and twins
    def param_count(self, enc) -> int:
        return int(self._part_for(enc).param_count(np.asarray(enc)))

    def macs(self, enc) -> int:
        return int(self._part_for(enc).macs(np.asarray(enc)))

    def extract(self, params: dict, enc, bn_stats=None) -> tuple[dict, nnx.Module]:
        """(the twin's full state as a pure dict - parameters and BatchNorm statistics -, the twin)."""
        enc = np.asarray(enc)
        if self.family(enc) == "mlp":
            _, twin = self.mlp.extract(params["mlp"], enc)
        else:
            _, twin = self.conv.extract(params["conv"], enc, bn_stats)
        return nnx.state(twin).to_pure_dict(), twin


@functools.partial(jax.jit, static_argnames="supernet")
def _recalibrate_shared(supernet, params, encs, x_batches):
    return jax.vmap(supernet.recalibrate_bn, in_axes=(None, 0, None))(params, encs, x_batches)


@functools.partial(jax.jit, static_argnames="supernet")
def _recalibrate_population(supernet, params_P, encs, x_batches):
    return jax.vmap(supernet.recalibrate_bn, in_axes=(0, 0, None))(params_P, encs, x_batches)


@dataclasses.dataclass(frozen=True)
class SingleModel:
    """One supernet (transformer on image patches, or NB201 cells) behind `SearchModel`'s surface.

    ``supernet`` needs init / apply / param_count / macs / extract / largest / smallest; with ``batchnorm``
    it also has ``recalibrate_bn`` and takes ``bn_stats`` in apply and extract (as NB201Supernet does).
    """

    supernet: object
    image_shape: tuple[int, int, int]
    num_classes: int
    batchnorm: bool = False

    @property
    def space(self) -> Space:
        return self.supernet.space

    @property
    def uses_batchnorm(self) -> bool:
        return self.batchnorm

    def init(self, key: jax.Array) -> dict:
        return self.supernet.init(key)

    def apply(self, params, enc, x, *, train: bool, key=None, bn_stats=None) -> jax.Array:
        if self.batchnorm:
            return self.supernet.apply(params, enc, x, train=train, key=key, bn_stats=bn_stats)
        return self.supernet.apply(params, enc, x, train=train, key=key)

    def apply_eval(self, variables: dict, enc, x, *, train: bool, key=None) -> jax.Array:
        return self.apply(variables["params"], enc, x, train=train, key=key, bn_stats=variables["bn_stats"])

    @property
    def has_activation_kernel(self) -> bool:
        return hasattr(self.supernet, "activation_kernel")

    def activation_kernel(self, params, enc, x) -> jax.Array:
        return self.supernet.activation_kernel(params, enc, x)

    def statistics(self, params, encs, x_batches, *, shared: bool):
        if not self.batchnorm:
            return None
        fn = _recalibrate_shared if shared else _recalibrate_population
        return fn(self.supernet, params, jnp.asarray(encs, jnp.int32), x_batches)

    def param_count(self, enc) -> int:
        return int(self.supernet.param_count(np.asarray(enc)))

    def macs(self, enc) -> int:
        return int(self.supernet.macs(np.asarray(enc)))

    def extract(self, params: dict, enc, bn_stats=None) -> tuple[dict, nnx.Module]:
        if self.batchnorm:
            _, twin = self.supernet.extract(params, np.asarray(enc), bn_stats)
        else:
            _, twin = self.supernet.extract(params, np.asarray(enc))
        return nnx.state(twin).to_pure_dict(), twin

    @property
    def mlp(self):
        return None

    @property
    def conv(self):
        return None


@dataclasses.dataclass(frozen=True)
class LMModel(SingleModel):
    """An `LMSupernet` behind `SingleModel`'s surface: ``image_shape`` is (seq_len,), ``num_classes`` the
    vocabulary; inputs are token ids [B, T], logits [B, T, vocab]; ``macs`` is `LMSupernet.macs_per_token`."""

    is_lm = True

    @property
    def vocab_size(self) -> int:
        return self.num_classes

    @property
    def seq_len(self) -> int:
        return self.image_shape[0]

    def macs(self, enc) -> int:
        return int(self.supernet.macs_per_token(np.asarray(enc)))

    def kv_bytes_per_token(self, enc) -> int:
        return int(self.supernet.kv_bytes_per_token(np.asarray(enc)))

    def state_bytes(self, enc) -> int:
        return int(self.supernet.state_bytes(np.asarray(enc)))


def is_lm(model) -> bool:
    """Whether ``model`` is a language model (`LMModel`): token windows in, next-token logits out."""
    return getattr(model, "is_lm", False)


def model_for(space: Space, cfg: SpaceConfig, image_shape: tuple[int, ...], num_classes: int):
    """The model (supernets behind one surface) of ``space`` for images of ``image_shape`` (H, W, C); for the lm
    space ``image_shape`` is (seq_len,) and ``num_classes`` the vocabulary size."""
    shape = tuple(int(s) for s in image_shape)
    if space.name == "lm":
        return LMModel(LMSupernet(space, vocab_size=int(num_classes), seq_len=shape[0]), shape, int(num_classes))
    if space.name == "macro":
        return SearchModel(space, shape, int(num_classes), cfg.stem_stride)
    if space.name == "transformer":
        if shape[0] % cfg.patch or shape[1] % cfg.patch:
            raise ValueError(
                f"space.patch={cfg.patch} does not divide the images' {shape[0]}x{shape[1]}; choose a divisor "
                f"(e.g. space.patch={next(p for p in (7, 4, 2, 1) if shape[0] % p == 0 and shape[1] % p == 0)})"
            )
        supernet = TransformerSupernet(space, int(num_classes), input="patches", image_shape=shape, patch=cfg.patch)
        return SingleModel(supernet, shape, int(num_classes))
    supernet = NB201Supernet(space, shape, int(num_classes), channels=cfg.cell_channels, cells=cfg.cells)
    return SingleModel(supernet, shape, int(num_classes), batchnorm=True)
