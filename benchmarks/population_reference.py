"""PyTorch eager re-implementations of the macro-space candidates: the eager peer of `benchmarks/population.py`.

`torch_net` slices one candidate out of the shared supernet weights (converted once by `torch_weights`) exactly
as `MLPSupernet.extract` / `ConvSupernet.extract` do, as views for evaluation or independent leaves for training,
so a network costs no initialisation. The benchmark checks their logits against the JAX twins before timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F

from jaxnas.supernet import ConvSupernet, MLPSupernet
from jaxnas.supernet.conv import NORM_EPSILON

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": lambda z: F.gelu(z, approximate="tanh"),  # jax.nn.gelu defaults to the tanh approximation
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01 in both frameworks
}


class TorchMLP(torch.nn.Module):
    """PyTorch eager twin of one MLP candidate, the layout of `TwinMLP`: ``h = act(LN(h @ W + b))`` per block.

    ``blocks``: per dense layer ``{"kernel": [in, out], "bias": [out]}`` plus ``"scale"`` / ``"shift"`` [out] when
    the block normalises. Tensors are kept as given (views of shared weights for evaluation; independent leaf
    parameters for training), so building a network costs no initialisation.
    """

    def __init__(self, blocks, head, activations, skips, dropout: float):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for block in blocks:
            module = torch.nn.Module()
            for name, tensor in block.items():
                setattr(module, name, torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad))
            self.blocks.append(module)
        self.head_kernel = torch.nn.Parameter(head["kernel"], requires_grad=head["kernel"].requires_grad)
        self.head_bias = torch.nn.Parameter(head["bias"], requires_grad=head["bias"].requires_grad)
        self.activations = [TORCH_ACTIVATIONS[a] for a in activations]
        self.skips = skips
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for block, activation, skip in zip(self.blocks, self.activations, self.skips, strict=True):
            z = torch.addmm(block.bias, h, block.kernel)
            if hasattr(block, "scale"):
                z = F.layer_norm(z, z.shape[-1:], block.scale, block.shift, eps=1e-5)
            a = activation(z)
            h = h + a if skip else a
        return torch.addmm(self.head_bias, self.dropout(h), self.head_kernel)


def torch_mlp(supernet: MLPSupernet, weights: dict, enc, *, trainable: bool = False) -> TorchMLP:
    """The candidate ``enc`` as a `TorchMLP` sliced from ``weights`` (supernet params as torch tensors).

    ``trainable``: independent copies that require grad (training); otherwise views of the shared weights.
    """
    arch = supernet.arch(enc)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.clone().requires_grad_(True) if trainable else t

    blocks, activations, skips = [], [], []
    width = supernet.in_features
    for k, stage in enumerate(arch.stages):
        for j in range(stage.depth):
            w = weights["stages"][k][j]
            block = {
                "kernel": take(w["dense"]["kernel"][:width, : stage.width]),
                "bias": take(w["dense"]["bias"][: stage.width]),
            }
            if stage.norm:
                block["scale"] = take(w["norm"]["scale"][: stage.width])
                block["shift"] = take(w["norm"]["bias"][: stage.width])
            blocks.append(block)
            activations.append(stage.activation)
            skips.append(stage.skip and j > 0)
            width = stage.width
    head = {"kernel": take(weights["head"]["kernel"][:width]), "bias": take(weights["head"]["bias"])}
    return TorchMLP(blocks, head, activations, skips, arch.dropout)


class TorchConvNet(torch.nn.Module):
    """PyTorch eager twin of one cnn / resnet / mobilenet candidate, the layout of `TwinConvNet`, on NCHW inputs.

    ``tensors``: ``"<layer>_w"`` OIHW conv kernels (padding (k - 1) // 2 on every side, as `jaxnas.supernet.ops`)
    and ``"<layer>_b"`` biases, ``"<norm>_scale"`` / ``"<norm>_shift"`` for BatchNorm, ``"head_w"`` [C, classes] /
    ``"head_b"``; kept as given (views of the shared weights, or independent leaves for training). ``blocks``: per
    block ``{"name", "stride", "activation", "norm", "skip", "first"}``.

    BatchNorm normalises with ``self.stats`` (norm name -> (mean, var)) once `recalibrate` has set them, and with
    the batch's own statistics (biased variance) otherwise: `ConvSupernet.apply` in training, and in evaluation
    without statistics (how `train_population` validates).
    """

    def __init__(self, family: str, tensors: dict, blocks: list[dict], stem_stride: int, dropout: float):
        super().__init__()
        self.family, self.blocks, self.stem_stride = family, blocks, stem_stride
        self.weights = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(t, requires_grad=t.requires_grad) for name, t in tensors.items()}
        )
        self.dropout = torch.nn.Dropout(dropout)
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._recorded: dict[str, list[torch.Tensor]] | None = None

    def _conv(self, name: str, h: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w = self.weights[name + "_w"]
        return F.conv2d(h, w, self.weights[name + "_b"], stride, (w.shape[-1] - 1) // 2, groups=groups)

    def _norm(self, name: str, z: torch.Tensor, on: bool) -> torch.Tensor:
        if not on:
            return z
        scale, shift = self.weights[name + "_scale"], self.weights[name + "_shift"]
        if self._recorded is not None:
            var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
            sums = self._recorded.setdefault(name, [0.0, 0.0])
            sums[0], sums[1] = sums[0] + mean, sums[1] + var
        if self.stats is None:
            return F.batch_norm(z, None, None, scale, shift, True, 0.0, NORM_EPSILON)
        mean, var = self.stats[name]
        return F.batch_norm(z, mean, var, scale, shift, False, 0.0, NORM_EPSILON)

    @torch.no_grad()
    def recalibrate(self, batches: Sequence[torch.Tensor]) -> TorchConvNet:
        """Set ``stats`` to the mean over ``batches`` of each batch's per-channel mean and variance, as
        `ConvSupernet.recalibrate_bn` does (the network then normalises with them)."""
        self.stats, self._recorded = None, {}
        for x in batches:
            self(x)
        self.stats = {name: (m / len(batches), v / len(batches)) for name, (m, v) in self._recorded.items()}
        self._recorded = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self._conv("stem", x, self.stem_stride))
        for b in self.blocks:
            act, name, stride, on = TORCH_ACTIVATIONS[b["activation"]], b["name"], b["stride"], b["norm"]
            if self.family == "cnn":
                a = act(self._norm(name + "_norm", self._conv(name + "_conv", h, stride), on))
                h = h + a if b["skip"] else a
            elif self.family == "resnet":
                a = act(self._norm(name + "_norm1", self._conv(name + "_conv1", h, stride), on))
                z = self._norm(name + "_norm2", self._conv(name + "_conv2", a), on)
                h = act(z + (self._conv(name + "_shortcut", h, stride) if b["first"] else h))
            else:
                a = act(self._norm(name + "_expand_norm", self._conv(name + "_expand", h), on))
                a = self._conv(name + "_depthwise", a, stride, groups=a.shape[1])
                a = act(self._norm(name + "_depthwise_norm", a, on))
                z = self._norm(name + "_project_norm", self._conv(name + "_project", a), on)
                h = z if b["first"] else h + z
        pooled = self.dropout(h.mean((2, 3)))
        return torch.addmm(self.weights["head_b"], pooled, self.weights["head_w"])


def torch_convnet(supernet: ConvSupernet, weights: dict, enc, *, trainable: bool = False) -> TorchConvNet:
    """The candidate ``enc`` as a `TorchConvNet` sliced from ``weights`` (`torch_weights` of the supernet params):
    real widths, kernels centre-cropped, inactive blocks left out, exactly as `ConvSupernet.extract` slices.

    ``trainable``: independent copies that require grad (training); otherwise views of the shared weights.
    """
    arch = supernet.arch(enc)
    p = weights[arch.family]
    tensors = {"stem_w": p["stem"]["kernel"], "stem_b": p["stem"]["bias"]}
    blocks = []
    big, ci = supernet.max_kernel, supernet.stem_width
    for k, stage in enumerate(arch.stages):
        co = stage.width
        crop = slice((big - stage.kernel) // 2, (big + stage.kernel) // 2)
        for j in range(stage.depth):
            b, name = p["stages"][k][j], f"b{len(blocks)}"
            hidden = ci * (stage.expansion or 1)

            def conv(layer, n_in, n_out, elastic=False, b=b, name=name, crop=crop):
                w = b[layer]["kernel"][:n_out, :n_in]
                tensors[f"{name}_{layer}_w"] = w[:, :, crop, crop] if elastic else w
                tensors[f"{name}_{layer}_b"] = b[layer]["bias"][:n_out]

            def norm(layer, c, b=b, name=name, on=stage.norm):
                if on:
                    tensors[f"{name}_{layer}_scale"] = b[layer]["scale"][:c]
                    tensors[f"{name}_{layer}_shift"] = b[layer]["bias"][:c]

            if arch.family == "cnn":
                conv("conv", ci, co, elastic=True)
                norm("norm", co)
            elif arch.family == "resnet":
                conv("conv1", ci, co, elastic=True)
                conv("conv2", co, co, elastic=True)
                if j == 0:
                    conv("shortcut", ci, co)
                norm("norm1", co)
                norm("norm2", co)
            else:
                conv("expand", ci, hidden)
                conv("depthwise", 1, hidden, elastic=True)
                conv("project", hidden, co)
                norm("expand_norm", hidden)
                norm("depthwise_norm", hidden)
                norm("project_norm", co)
            blocks.append({
                "name": name, "stride": 2 if k > 0 and j == 0 else 1, "activation": stage.activation,
                "norm": stage.norm, "skip": stage.skip and j > 0, "first": j == 0,
            })
            ci = co
    head = p["head"][len(arch.stages) - 1]  # one head per number of stages
    tensors |= {"head_w": head["kernel"][:ci], "head_b": head["bias"]}
    if trainable:
        tensors = {name: t.clone().requires_grad_(True) for name, t in tensors.items()}
    return TorchConvNet(arch.family, tensors, blocks, supernet.stem_stride, arch.dropout)


def torch_net(supernet, weights: dict, enc, *, trainable: bool = False) -> torch.nn.Module:
    """The torch twin of ``enc`` for either supernet kind."""
    build = torch_convnet if isinstance(supernet, ConvSupernet) else torch_mlp
    return build(supernet, weights, enc, trainable=trainable)


def to_torch(tree):
    """A pytree of jax arrays as the same nested dicts of torch tensors (copied to host once)."""
    return jax.tree.map(lambda a: torch.from_numpy(np.array(a)), tree)


def torch_weights(supernet, params) -> dict:
    """``params`` as torch tensors; conv kernels go from HWIO to torch's OIHW (one contiguous copy, so slicing a
    candidate from them is a view)."""
    weights = to_torch(params)
    if not isinstance(supernet, ConvSupernet):
        return weights

    def layout(path, t):
        return t.permute(3, 2, 0, 1).contiguous() if path[-1].key == "kernel" and t.ndim == 4 else t

    return jax.tree_util.tree_map_with_path(layout, weights)


def torch_images(supernet, images: np.ndarray) -> torch.Tensor:
    """images [N, H, W, C] as the torch twin's input: NCHW for conv nets, as they are for the MLP (it flattens
    NHWC, as `MLPSupernet` does)."""
    t = torch.from_numpy(images)
    return t.permute(0, 3, 1, 2).contiguous() if isinstance(supernet, ConvSupernet) else t

