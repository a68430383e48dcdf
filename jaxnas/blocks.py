"""The conv block families of the macro space (cnn, resnet, mobilenet): one definition each, every form derived.

A family is declared once, here, as its convolutions (`Conv`: name, which widths it maps, kernel, stride,
depthwise, the BatchNorm after it) and one forward function written against `BlockOps`. Everything else is
derived from that declaration:

- the masked supernet (`jaxnas.supernet.conv`): weight shapes at the supernet's largest sizes, and the forward
  with `BlockOps` that mask channels and centre-crop kernels inside one vmappable program;
- the standalone twin (`TwinBlock`, in `jaxnas.supernet.conv`): one ``nnx.Conv`` / ``nnx.BatchNorm`` per
  declared layer, named as declared, run by the same forward;
- twin extraction: each layer's own slice of the supernet weights (first channels, centre kernel taps:
  `jaxnas.supernet.weights.own_slices`);
- the sized backend's layer programs (`jaxnas.population.sized.ConvBlock`): weights sliced to the candidate's own
  sizes inside the program, the same forward; its first convolution is shared between sibling candidates;
- analytic parameter and MAC counts (`layers`), and the weights a candidate owns (`own_shapes`);
- the macro space itself: the family is a ``family`` option, with the ``expansion`` choice if it uses one and the
  ``skip`` choice if its skip connection is optional (`jaxnas.spaces.macro`).

Adding a family is adding one `Family` to `FAMILIES` below (docs/architecture.md walks through an example).

Widths are named: ``"in"`` (the block's input channels), ``"out"`` (the stage's channels) and ``"hidden"``
(``in * expansion``, for families with an expansion). Block 1 of a stage changes the width and, after stage 1,
halves the resolution (``stride`` 2 for the layers declared ``strided``); ``first`` tells the forward which block
it is (ResNet's projection shortcut, MobileNetV2's missing residual).

This module imports neither jax nor flax: a family is a description, the forms above give it arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

RESERVED = ("family", "activation", "skip", "first", "normed")  # the twin block's own attributes
STAGE_KERNEL = "stage"  # a `Conv.kernel`: the stage's kernel choice (elastic: the centre of the largest)
WIDTHS = ("in", "out", "hidden")


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution of a block, with bias, optionally followed by a BatchNorm (when the stage's norm is on).

    Attributes:
      name: its weights' key in the block (and the twin's attribute).
      n_in / n_out: the widths it maps, ``"in"``, ``"out"`` or ``"hidden"``.
      kernel: `STAGE_KERNEL` (the stage's kernel, centre-cropped from the supernet's largest) or a fixed size.
      strided: it carries the block's stride (2 in block 1 of every stage after the first).
      depthwise: one filter per channel (``n_in`` must equal ``n_out``).
      norm: the name of the BatchNorm after it (its weights' key), or None.
    """

    name: str
    n_in: str = "in"
    n_out: str = "out"
    kernel: int | str = STAGE_KERNEL
    strided: bool = False
    depthwise: bool = False
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.n_in not in WIDTHS or self.n_out not in WIDTHS:
            raise ValueError(f"Conv {self.name!r}: n_in / n_out must be one of {WIDTHS}, got {self.n_in!r}, {self.n_out!r}")
        if self.kernel != STAGE_KERNEL and not (isinstance(self.kernel, int) and self.kernel % 2 == 1):
            raise ValueError(f"Conv {self.name!r}: kernel must be {STAGE_KERNEL!r} or an odd int, got {self.kernel!r}")
        if self.depthwise and self.n_in != self.n_out:
            raise ValueError(f"Conv {self.name!r}: a depthwise convolution maps a width to itself, got "
                             f"{self.n_in!r} -> {self.n_out!r}")

    def size(self, stage_kernel: int) -> int:
        """Its kernel size for a stage whose kernel choice is ``stage_kernel``."""
        return stage_kernel if self.kernel == STAGE_KERNEL else int(self.kernel)

    def kernel_shape(self, stage_kernel: int, widths: dict[str, int]) -> tuple[int, int, int, int]:
        """HWIO kernel shape at ``widths`` (depthwise: one input channel per filter)."""
        k = self.size(stage_kernel)
        return k, k, 1 if self.depthwise else widths[self.n_in], widths[self.n_out]


class BlockOps(Protocol):
    """What a family's forward computes with; each form (masked, sized, twin) provides its own.

    ``conv(name, h)``: the declared convolution ``name`` (bias included, stride where declared) of ``h``.
    ``norm(name, z)``: the BatchNorm ``name`` of ``z`` (``z`` itself where the stage's norm is off).
    ``act(z, width)``: the stage's activation of ``z``, whose channels are the width ``width`` (the masked form
      zeroes channels beyond it and records NASWOT codes there).
    ``keep(z, width)``: ``z`` without an activation, channels beyond ``width`` zeroed in the masked form.
    ``skip(h, a)``: ``h + a`` where the stage's optional skip is on, else ``a`` (families with ``optional_skip``).
    """

    def conv(self, name: str, h: Any) -> Any: ...
    def norm(self, name: str, z: Any) -> Any: ...
    def act(self, z: Any, width: str) -> Any: ...
    def keep(self, z: Any, width: str) -> Any: ...
    def skip(self, h: Any, a: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A conv block family: its layers (by ``first``: block 1 of a stage or a later one) and its forward.

    Attributes:
      name: the ``family`` option of the macro space.
      layers: ``first -> (Conv, ...)`` in the order they run (the first is the block's first convolution of its
        input, shared between sibling candidates by the sized backend).
      forward: ``(ops, h, first) -> out``, the block's computation through `BlockOps`.
      expansion: the family uses the stage's ``expansion`` choice (``hidden = in * expansion``).
      optional_skip: the stage's ``skip`` choice applies (``ops.skip``); otherwise residuals are the forward's own.
    """

    name: str
    layers: Callable[[bool], tuple[Conv, ...]]
    forward: Callable[[BlockOps, Any, bool], Any]
    expansion: bool = False
    optional_skip: bool = False

    def convs(self, first: bool) -> dict[str, Conv]:
        """The declared convolutions of a block by name, in order; checked once per call."""
        layers = self.layers(first)
        names = [c.name for c in layers] + [c.norm for c in layers if c.norm]
        if not layers or len(set(names)) != len(names) or set(names) & set(RESERVED):
            raise ValueError(f"family {self.name!r}: layers need at least one Conv and distinct names, none of "
                             f"{RESERVED}; got {names}")
        if layers[0].n_in != "in":
            raise ValueError(f"family {self.name!r}: the first layer must read the block's input ('in')")
        return {c.name: c for c in layers}

    def norms(self, first: bool) -> dict[str, str]:
        """{BatchNorm name: the width it normalises} of a block."""
        return {c.norm: c.n_out for c in self.layers(first) if c.norm}


def widths(ci: int, co: int, expansion: int = 1) -> dict[str, int]:
    """The named widths of a block reading ``ci`` channels in a stage of ``co`` channels."""
    return {"in": ci, "out": co, "hidden": ci * expansion}


def layers(
    family: Family, first: bool, ci: int, co: int, kernel: int, expansion: int, norm: bool, positions: tuple[int, int]
) -> list[tuple[int, int, int, bool, int, bool]]:
    """[(kernel, in, out, depthwise, output positions, norm)] of one block: what parameter and MAC counts need.

    ``positions``: (H * W entering the block, H * W leaving it); a layer runs at the input resolution until the
    first strided layer (MobileNetV2's expansion runs before its strided depthwise convolution)."""
    w = widths(ci, co, expansion)
    out, strided_yet = [], False
    for c in family.layers(first):
        strided_yet |= c.strided
        n = positions[1] if strided_yet else positions[0]
        out.append((c.size(kernel), w[c.n_in], w[c.n_out], c.depthwise, n, norm and c.norm is not None))
    return out


# ---------------------------------------------------------------------------------------------- the families
def _cnn_layers(first: bool) -> tuple[Conv, ...]:
    return (Conv("conv", strided=True, norm="norm"),)


def _cnn(ops: BlockOps, h, first: bool):
    """conv -> BN -> act, + h where the stage's skip is on (blocks 2 .. depth)."""
    a = ops.act(ops.norm("norm", ops.conv("conv", h)), "out")
    return a if first else ops.skip(h, a)


def _resnet_layers(first: bool) -> tuple[Conv, ...]:
    convs = (Conv("conv1", strided=True, norm="norm1"), Conv("conv2", "out", "out", norm="norm2"))
    return (*convs, Conv("shortcut", kernel=1, strided=True)) if first else convs


def _resnet(ops: BlockOps, h, first: bool):
    """conv -> BN -> act -> conv -> BN, + shortcut, act; the shortcut is a 1x1 projection in block 1 (He et al.'s
    option B: the width and resolution change there), the identity after."""
    a = ops.act(ops.norm("norm1", ops.conv("conv1", h)), "out")
    z = ops.norm("norm2", ops.conv("conv2", a))
    return ops.act(z + (ops.conv("shortcut", h) if first else h), "out")


def _mobilenet_layers(first: bool) -> tuple[Conv, ...]:
    return (
        Conv("expand", "in", "hidden", kernel=1, norm="expand_norm"),
        Conv("depthwise", "hidden", "hidden", strided=True, depthwise=True, norm="depthwise_norm"),
        Conv("project", "hidden", "out", kernel=1, norm="project_norm"),
    )


def _mobilenet(ops: BlockOps, h, first: bool):
    """MobileNetV2's inverted residual: 1x1 expand -> BN -> act -> depthwise (stride) -> BN -> act -> 1x1 project
    -> BN (a linear bottleneck), + h in blocks 2 .. depth (block 1 changes the width: no residual)."""
    a = ops.act(ops.norm("expand_norm", ops.conv("expand", h)), "hidden")
    a = ops.act(ops.norm("depthwise_norm", ops.conv("depthwise", a)), "hidden")
    z = ops.keep(ops.norm("project_norm", ops.conv("project", a)), "out")
    return z if first else h + z


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("cnn", _cnn_layers, _cnn, optional_skip=True),
        Family("resnet", _resnet_layers, _resnet),
        Family("mobilenet", _mobilenet_layers, _mobilenet, expansion=True),
    )
}
"""Every conv block family by name, in the order the macro space lists them."""
