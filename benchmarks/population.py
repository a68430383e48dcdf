"""A population as one program vs one network at a time: evaluation and training of P macro-space candidates.

Both sides run in this process on the embedded ``mnist5k`` dataset (validation split for evaluation, train
split for the training epoch), for P distinct architectures of each family in ``--families`` (default
``mlp,cnn``; ``resnet`` and ``mobilenet`` also run). The MLP family uses the full ``macro`` space's MLP options;
a conv family uses a CPU-sized `ConvSupernet` (28 x 28 MNIST, stem stride 2, channels (16, 32), kernels (3, 5),
<= 2 stages x <= 2 blocks, expansions (1, 2) for mobilenet; the "slices" formulation on CPU):

(a) evaluation with one set of shared supernet weights:
    - vmapped: `evaluate_shared` (MLP), or for a conv family the vmapped `recalibrate_bn` (per-subnet BatchNorm
      statistics from ``BN_BATCHES`` training batches) followed by `evaluate_population` of
      `ConvSupernet.apply_recalibrated`; one compile for the whole population. Its first call (compile included,
      paid once per search) and its steady state (every later population of the same size) are reported;
    - exact: `jaxnas.population.sized.evaluate_sized`, every candidate at its own sizes through layer programs compiled
      once per layer size (the CPU formulation; the search uses it in mode oneshot on CPU). Its first call
      compiles the layer programs the population needs; then a *new* population of P other architectures is
      timed once (only its unseen layer sizes compile: what a search's next generation costs), then the
      steady state;
    - per-architecture compile: `extract` the standalone twin and `jax.jit` it, per architecture, compile
      included (in a search every architecture is new, so every twin is a fresh compile); a conv twin takes its
      statistics from one jitted `recalibrate_bn` (compiled once, before timing);
    - PyTorch eager: the same sliced networks built from the shared weights and run one by one (how S-NAS and
      NNI evaluate); a conv network first recalibrates its own BatchNorm statistics on the same batches. Before
      timing, its logits are checked against the JAX twin's on a few architectures.
(b) training P candidates from the same initial weights for one epoch (same batches, Adam, same lr):
    - vmapped: `train_population` (one compile, reported separately from the steady-state epoch);
    - exact: `jaxnas.population.sized_train.train_population_sized`, every candidate at its real sizes in one program per
      population (its compile, paid once per population, reported as the first call);
    - PyTorch eager: the same networks trained one after another (BatchNorm with the batch's statistics, as
      `ConvSupernet.apply` trains, and as `train_population` validates: the same validation batches).
    Both sides score the validation split after the epoch; their final accuracies are printed to show the work
    was the same (dropout masks come from different generators, so they agree in distribution, not bitwise).

Useful FLOP/s counts each candidate's own MACs (``macs(enc)``, x 2 FLOPs; training x 3 for forward + backward;
the BatchNorm recalibration passes of (a) count as forward passes), not what the masked supernet computes, as a
fraction of the matmul peak measured here (a large f32 matmul in jnp and in torch). The padded fraction,
candidate MACs / max-width MACs, is the share of the vmapped program's work that is useful: masks compute every
block at the largest width (and every conv at the largest kernel).

Arms are interleaved within each repeat (A B C, A B C, ...); torch is warmed up on one architecture before
timing. XLA:CPU uses both cores; torch uses ``--torch-threads`` (default 1, its faster setting here, see below).

    python benchmarks/population.py                        # mlp and cnn, P = 16 and 64, 3 repeats
    python benchmarks/population.py --families cnn --populations 16 --repeats 5 --json population.json
    python benchmarks/population.py --families cnn --bucket --skip-training   # + the bucketed evaluation arm
    python benchmarks/population.py --quick                # P = 4, tiny subset, 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
import torch
import torch.nn.functional as F
from flax import nnx

from jaxnas.data import epoch_indices, load_dataset
from jaxnas.population import evaluate_population, evaluate_shared, init_population, tile_population, train_population
from jaxnas.population import sized_train
from jaxnas.population.sized import evaluate_sized
from jaxnas.spaces import macro_space
from jaxnas.supernet import ConvSupernet, MLPSupernet
from jaxnas.supernet.conv import NORM_EPSILON

# Measured on our loaded 2-core machine with XLA in the same process: torch eager at 2 threads ran these small
# networks 4-40x slower than at 1 (its OpenMP workers wait on descheduled peers), so the default gives torch its
# faster setting; ``--torch-threads 2`` matches XLA:CPU's thread count instead.
TORCH_THREADS = 1
TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": lambda z: F.gelu(z, approximate="tanh"),  # jax.nn.gelu defaults to the tanh approximation
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01 in both frameworks
}
FAMILIES = ("mlp", "cnn", "resnet", "mobilenet")
# The CPU-sized conv space (the full macro space's 3 stages x 3 blocks of up to 64 channels at 28 x 28 would
# take hours per arm on 2 cores); ``--quick`` shrinks it further.
CONV_SPACE = {"max_stages": 2, "max_depth": 2, "channels": (16, 32), "kernels": (3, 5), "expansions": (1, 2)}
QUICK_CONV_SPACE = {"max_stages": 2, "max_depth": 1, "channels": (4, 8), "kernels": (1, 3), "expansions": (1, 2)}
STEM_STRIDE = 2
BN_BATCHES = 4  # training batches (of --batch-size) for each subnet's BatchNorm statistics in (a)
EXACT_BATCH = 1000  # examples per batch of the exact arm (no padding skew: its statistics are recalibrated)
CONV_EVAL_BATCH = 125  # vmapped conv evaluation batch: P x batch x the largest patch matrix must fit in memory


# ---------------------------------------------------------------------------------------------- torch twins
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


# ---------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of ``fn()``; results are pulled to host inside ``fn`` so async dispatch is waited for."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summary(times: Sequence[float]) -> dict[str, float]:
    """median / min / mean and the Student-t 95% half-width of the mean (NaN for a single repeat), seconds."""
    t = np.asarray(times, float)
    half = float("nan")
    if t.size > 1:
        half = float(scipy.stats.t.ppf(0.975, t.size - 1) * t.std(ddof=1) / math.sqrt(t.size))
    return {
        "median": float(np.median(t)), "min": float(t.min()), "mean": float(t.mean()), "ci95": half, "n": int(t.size)
    }


def matmul_peak(n: int, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an [n, n] @ [n, n] f32 matmul (median of ``repeats`` after a warm-up), jnp and torch."""
    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    jax_times = [timed(lambda: mm(a, a).block_until_ready())[0] for _ in range(repeats)]
    b = torch.from_numpy(np.array(a))
    torch.mm(b, b)
    torch_times = [timed(lambda: torch.mm(b, b))[0] for _ in range(repeats)]
    return {"jax": flops / float(np.median(jax_times)), "torch": flops / float(np.median(torch_times))}


# ---------------------------------------------------------------------------------------------- population
def distinct_population(space, key: jax.Array, population: int) -> np.ndarray:
    """int32 [P, n_choices]: ``population`` distinct canonical architectures sampled from ``space``."""
    encs = np.asarray(space.sample(key, 4 * population))
    encs = encs[space.unique(encs)]
    if len(encs) < population:
        raise ValueError(f"the space gave only {len(encs)} distinct architectures; ask for P <= {len(encs)}")
    return encs[:population]


def flop_counts(supernet, encs: np.ndarray) -> dict[str, float]:
    """Useful MACs per example summed over the population, and the share of the padded (max-width) MACs."""
    useful = sum(supernet.macs(e) for e in encs)
    padded = sum(supernet.macs(np.asarray(supernet.largest(e))) for e in encs)
    return {"useful_macs": float(useful), "padded_macs": float(padded), "padded_fraction": useful / padded}


def eval_batch_size(supernet, n: int) -> int:
    """Evaluation batch: all ``n`` examples for the MLP; for conv nets the largest divisor of ``n`` up to
    ``CONV_EVAL_BATCH`` (no zero-padded batch: it would skew the batch statistics that validate training)."""
    if not isinstance(supernet, ConvSupernet):
        return n
    return max(d for d in range(1, min(n, CONV_EVAL_BATCH) + 1) if n % d == 0)


@functools.partial(jax.jit, static_argnames="supernet")
def recalibrate_population(supernet: ConvSupernet, params, encs, bn_x):
    """BatchNorm statistics of every candidate of ``encs`` [P, n_choices] with shared ``params`` (leaves [P, C])."""
    return jax.vmap(supernet.recalibrate_bn, in_axes=(None, 0, None))(params, encs, bn_x)


def vmapped_eval_accuracies(supernet, params, encs, x, y, bn_x) -> np.ndarray:
    """[P] accuracies of the whole population in one compiled program (plus, for conv nets, one compiled
    recalibration of every candidate's BatchNorm statistics on ``bn_x`` [n, B, H, W, C])."""
    batch = eval_batch_size(supernet, x.shape[0])
    if not isinstance(supernet, ConvSupernet):
        return np.asarray(evaluate_shared(supernet.apply, params, encs, x, y, batch_size=batch)["accuracy"])
    encs = jnp.asarray(encs)
    stats = recalibrate_population(supernet, params, encs, bn_x)
    variables = {"params": tile_population(params, len(encs)), "bn_stats": stats}
    return np.asarray(evaluate_population(supernet.apply_recalibrated, variables, encs, x, y, batch)["accuracy"])


@dataclasses.dataclass(frozen=True)
class Bucket:
    """The candidates ``rows`` [n] of a population whose widths and kernels fit a smaller supernet: ``supernet``
    (the same space with channels <= the bucket's widest stage and kernels <= its largest kernel) and ``encs``
    [n, n_choices] (their encodings in its space)."""

    supernet: ConvSupernet
    rows: np.ndarray
    encs: np.ndarray


def width_buckets(supernet: ConvSupernet, space_options: dict, encs: np.ndarray) -> list[Bucket]:
    """``encs`` grouped by (widest stage, largest kernel): each group runs at its own padded size instead of the
    largest candidate's (one compile per bucket and bucket size)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, enc in enumerate(encs):
        stages = supernet.arch(enc).stages
        groups.setdefault((max(s.width for s in stages), max(s.kernel for s in stages)), []).append(i)
    buckets = []
    for (width, kernel), rows in sorted(groups.items()):
        options = space_options | {
            "channels": tuple(c for c in space_options["channels"] if c <= width),
            "kernels": tuple(k for k in space_options["kernels"] if k <= kernel),
        }
        space = macro_space(families=supernet.families, **options)
        small = dataclasses.replace(supernet, space=space, stem_channels=supernet.stem_width)
        small_encs = np.stack([space.from_string(supernet.space.to_string(encs[i])) for i in rows])
        buckets.append(Bucket(small, np.asarray(rows), small_encs))
    return buckets


def sliced_params(params, small: ConvSupernet):
    """The shared supernet ``params`` cut to ``small``'s shapes: channel axes keep their first entries, conv
    kernels their centre (what the masks of the big supernet would leave), so ``small`` computes the same logits."""

    def cut(a, shape):
        index = [
            slice((n - m) // 2, (n + m) // 2) if a.ndim == 4 and axis < 2 else slice(0, m)
            for axis, (n, m) in enumerate(zip(a.shape, shape.shape, strict=True))
        ]
        return a[tuple(index)]

    return jax.tree.map(cut, params, jax.eval_shape(small.init, jax.random.key(0)))


def bucketed_eval_accuracies(buckets: Sequence[Bucket], params, x, y, bn_x) -> np.ndarray:
    """[P] accuracies, each bucket recalibrated and evaluated by its own compiled program (params sliced here)."""
    accuracies = np.empty(sum(len(b.rows) for b in buckets))
    for b in buckets:
        small_params = sliced_params(params, b.supernet)
        accuracies[b.rows] = vmapped_eval_accuracies(b.supernet, small_params, b.encs, x, y, bn_x)
    return accuracies


def jax_twin(supernet, params, enc, recalibrate=None, bn_x=None) -> nnx.Module:
    """The standalone JAX twin of ``enc``; a conv twin gets its statistics from ``recalibrate(params, enc, bn_x)``."""
    if isinstance(supernet, ConvSupernet):
        return supernet.extract(params, enc, recalibrate(params, jnp.asarray(enc), bn_x))[1]
    return supernet.extract(params, enc)[1]


def twin_accuracies(supernet, params, encs, x: jax.Array, y: jax.Array, recalibrate=None, bn_x=None) -> np.ndarray:
    """[P] accuracy of each candidate's standalone twin, each extracted and compiled on its own (as in a search)."""
    accuracies = []
    for enc in encs:
        graphdef, state = nnx.split(jax_twin(supernet, params, enc, recalibrate, bn_x))

        # A fresh function per architecture: its compile is part of what is measured.
        def correct(state, x, y, graphdef=graphdef):
            return jnp.sum(jnp.argmax(nnx.merge(graphdef, state)(x), -1) == y)

        accuracies.append(int(jax.jit(correct)(state, x, y)) / x.shape[0])
    return np.asarray(accuracies)


def torch_eval_net(supernet, weights: dict, enc, bn_x: Sequence[torch.Tensor]) -> torch.nn.Module:
    """The torch twin of ``enc`` in eval mode, a conv net with its own statistics recalibrated on ``bn_x``."""
    model = torch_net(supernet, weights, enc).eval()
    if isinstance(model, TorchConvNet):
        model.recalibrate(bn_x)
    return model


def torch_eval_accuracies(supernet, weights: dict, encs, x: torch.Tensor, y: torch.Tensor, bn_x) -> np.ndarray:
    """[P] accuracy of each candidate built from the shared torch weights and run eagerly, one by one."""
    accuracies = []
    with torch.no_grad():
        for enc in encs:
            model = torch_eval_net(supernet, weights, enc, bn_x)
            accuracies.append(float((model(x).argmax(-1) == y).float().mean()))
    return np.asarray(accuracies)


def check_torch_matches_twin(
    supernet, params, weights: dict, encs, x: np.ndarray, recalibrate=None, bn_x=None, torch_bn_x=None
) -> float:
    """Max |logit difference| between the torch and the JAX twins of ``encs``; AssertionError when they differ by
    more than 1e-4 x max(1, max |logit|) or predict a different class anywhere."""
    worst = 0.0
    with torch.no_grad():
        for enc in encs:
            expected = np.asarray(jax_twin(supernet, params, enc, recalibrate, bn_x)(jnp.asarray(x)))
            got = torch_eval_net(supernet, weights, enc, torch_bn_x)(torch_images(supernet, x)).numpy()
            diff = float(np.abs(expected - got).max())
            scale = max(1.0, float(np.abs(expected).max()))
            if diff > 1e-4 * scale or not (expected.argmax(-1) == got.argmax(-1)).all():
                raise AssertionError(
                    f"torch twin of {supernet.space.to_string(enc)} differs from the JAX twin (max |diff| {diff:.2e}): "
                    "the PyTorch arm would not evaluate the same network"
                )
            worst = max(worst, diff)
    return worst


def torch_train(
    supernet, init_weights: Sequence[dict], encs, x, y, val_x, val_y, index: np.ndarray, lr: float, eval_batch: int,
    steps=None,
) -> np.ndarray:
    """[P] validation accuracy after training each candidate from its own init weights, one after another.

    ``index`` [n_batches, B] are the batches (the vmapped side's); ``steps`` limits them (warm-up). Validation
    runs in batches of ``eval_batch`` (conv nets normalise with each batch's statistics, as `train_population`).
    """
    accuracies = []
    for weights, enc in zip(init_weights, encs, strict=True):
        model = torch_net(supernet, weights, enc, trainable=True).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for rows in index[:steps]:
            rows = torch.from_numpy(rows)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(vx).argmax(-1) == vy).sum()) for vx, vy in
                          zip(val_x.split(eval_batch), val_y.split(eval_batch), strict=True))
        accuracies.append(correct / len(val_y))
    return np.asarray(accuracies)


# ---------------------------------------------------------------------------------------------- benchmarks
def bn_batches(train, batch_size: int) -> np.ndarray:
    """[BN_BATCHES, B, H, W, C]: the first training images, the batches every arm recalibrates BatchNorm on."""
    n = BN_BATCHES * batch_size
    if len(train) < n:
        raise ValueError(f"BatchNorm recalibration needs {n} training examples, got {len(train)}")
    return train.images[:n].reshape(BN_BATCHES, batch_size, *train.images.shape[1:])


def bench_evaluation(
    supernet, params, encs, val, bn_images: np.ndarray, repeats: int, peak: float, buckets: Sequence[Bucket] = (),
    fresh: np.ndarray | None = None,
) -> dict:
    """(a): vmapped shared-weight evaluation vs per-architecture compiled twins vs torch eager, interleaved; with
    ``buckets``, also the population evaluated bucket by bucket (`width_buckets`)."""
    x, y = jnp.asarray(val.images), jnp.asarray(val.labels)
    n = x.shape[0]
    conv = isinstance(supernet, ConvSupernet)
    bn_x = jnp.asarray(bn_images)
    torch_bn_x = [torch_images(supernet, b) for b in bn_images] if conv else None
    # One compile of the single-subnet recalibration serves every twin (the encoding is traced).
    recalibrate = jax.jit(supernet.recalibrate_bn) if conv else None

    def vmapped():
        return vmapped_eval_accuracies(supernet, params, encs, x, y, bn_x)

    weights = torch_weights(supernet, params)
    tx, ty = torch_images(supernet, val.images), torch.from_numpy(val.labels).long()
    def bucketed():
        return bucketed_eval_accuracies(buckets, params, x, y, bn_x)

    def exact(population=encs):
        bn = bn_x if conv else None
        return evaluate_sized(supernet, params, population, x, y, bn_batches=bn, batch_size=EXACT_BATCH)["accuracy"]

    first, acc_vmapped = timed(vmapped)
    first_exact, acc_exact = timed(exact)  # compiles the layer programs this population needs
    # A new population of other architectures, as a search's next generation: only layer programs of
    # configurations not seen yet compile.
    fresh_exact = None
    if fresh is not None:
        fresh_exact, _ = timed(lambda: exact(fresh))
    if buckets:
        first_bucketed, acc_bucketed = timed(bucketed)
    # Also the warm-up of torch and of the twins' recalibration.
    max_diff = check_torch_matches_twin(
        supernet, params, weights, encs[:3], val.images[:64], recalibrate, bn_x, torch_bn_x
    )
    times = {"vmapped": [], "exact": [], "twin": [], "torch": []} | ({"bucketed": []} if buckets else {})
    for _ in range(repeats):
        t, _ = timed(vmapped)
        times["vmapped"].append(t)
        t, acc_exact = timed(exact)
        times["exact"].append(t)
        if buckets:
            t, acc_bucketed = timed(bucketed)
            times["bucketed"].append(t)
        t, acc_twin = timed(lambda: twin_accuracies(supernet, params, encs, x, y, recalibrate, bn_x))
        times["twin"].append(t)
        t, acc_torch = timed(lambda: torch_eval_accuracies(supernet, weights, encs, tx, ty, torch_bn_x))
        times["torch"].append(t)
    flops = flop_counts(supernet, encs)
    recalibrated = bn_images.shape[0] * bn_images.shape[1] if conv else 0
    useful = 2 * flops["useful_macs"] * (n + recalibrated)
    result = {
        "examples": n,
        "bn_recalibration_examples": recalibrated,
        "first_call_s": first,
        "exact_first_call_s": first_exact,
        "exact_new_population_s": fresh_exact,
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy": {
            "vmapped": acc_vmapped.tolist(), "exact": acc_exact.tolist(), "twin": acc_twin.tolist(),
            "torch": acc_torch.tolist(),
        },
        "accuracy_mean": {
            "vmapped": float(acc_vmapped.mean()), "exact": float(acc_exact.mean()), "twin": float(acc_twin.mean()),
            "torch": float(acc_torch.mean()),
        },
        "accuracy_max_abs_diff": float(np.abs(acc_vmapped - np.stack([acc_exact, acc_twin, acc_torch])).max()),
        "torch_vs_twin_max_logit_diff": max_diff,
        **flops,
        "useful_flops": useful,
    }
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["useful_flops_per_s"]["vmapped_first_call"] = useful / first
    result["useful_flops_per_s"]["exact_first_call"] = useful / first_exact
    if buckets:
        padded = sum(b.supernet.macs(np.asarray(b.supernet.largest(e))) for b in buckets for e in b.encs)
        result["bucketed"] = {
            "buckets": [
                {"max_width": b.supernet.max_width, "max_kernel": b.supernet.max_kernel, "size": len(b.rows)}
                for b in buckets
            ],
            "first_call_s": first_bucketed,
            "padded_fraction": flops["useful_macs"] / padded,
            "accuracy_max_abs_diff_vs_vmapped": float(np.abs(acc_bucketed - acc_vmapped).max()),
        }
    result["peak_fraction"] = {arm: v / peak for arm, v in result["useful_flops_per_s"].items()}
    return result


def bench_training(supernet, encs, data, repeats: int, batch_size: int, lr: float, peak: float, seed: int) -> dict:
    """(b): one epoch of P candidates, vmapped `train_population` vs the same networks trained one by one in torch."""
    train, val = data
    params_P = init_population(supernet.init, jax.random.key(seed), len(encs))
    optimizer = optax.adam(lr)  # one object: it is a static argument of the compiled epoch, reused across calls
    x, y = jnp.asarray(train.images), jnp.asarray(train.labels)
    vx, vy = jnp.asarray(val.images), jnp.asarray(val.labels)
    index = epoch_indices(x.shape[0], batch_size, seed, 0)
    eval_batch = eval_batch_size(supernet, vx.shape[0])

    def vmapped():
        result = train_population(
            supernet.apply, params_P, encs, optimizer, x, y, vx, vy, epochs=1, batch_size=batch_size, seed=seed,
            eval_batch_size=eval_batch,
        )
        return result.history[-1]

    init_weights = [torch_weights(supernet, jax.tree.map(lambda a, p=p: a[p], params_P)) for p in range(len(encs))]
    tx, ty = torch_images(supernet, train.images), torch.from_numpy(train.labels).long()
    tvx, tvy = torch_images(supernet, val.images), torch.from_numpy(val.labels).long()

    def sequential(weights=init_weights, encs=encs, steps=None):
        return torch_train(supernet, weights, encs, tx, ty, tvx, tvy, index, lr, eval_batch, steps)

    def exact():
        result = sized_train.train_population_sized(
            supernet, params_P, encs, optimizer, x, y, vx, vy, epochs=1, batch_size=batch_size, seed=seed,
            eval_batch_size=eval_batch,
        )
        return result.history[-1]

    arms = {"vmapped": vmapped, "torch": sequential}
    if sized_train.supports(supernet):
        arms = {"vmapped": vmapped, "exact": exact, "torch": sequential}
    sequential(init_weights[:1], encs[:1], steps=5)  # warm-up, one architecture
    first, accuracy = {}, {}
    for arm in ("vmapped", "exact"):
        if arm in arms:
            first[arm], accuracy[arm] = timed(arms[arm])
    times = {arm: [] for arm in arms}
    for _ in range(repeats):
        for arm, fn in arms.items():
            t, accuracy[arm] = timed(fn)
            times[arm].append(t)
    flops = flop_counts(supernet, encs)
    trained = index.size
    # Forward + backward of a layer is 3 convolutions / matmuls of its size; the validation pass after the epoch is 1.
    useful = 2 * flops["useful_macs"] * (3 * trained + val.images.shape[0])
    result = {
        "train_examples": int(trained),
        "steps": int(index.shape[0]),
        "batch_size": batch_size,
        "lr": lr,
        "first_call_s": first["vmapped"],
        "compile_s": first["vmapped"] - summary(times["vmapped"])["median"],
        "first_call": first,
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy": {arm: acc.tolist() for arm, acc in accuracy.items()},
        "accuracy_mean": {arm: float(acc.mean()) for arm, acc in accuracy.items()},
        "accuracy_max_abs_diff": float(np.abs(accuracy["vmapped"] - accuracy["torch"]).max()),
        **flops,
        "useful_flops": useful,
    }
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["peak_fraction"] = {arm: v / peak for arm, v in result["useful_flops_per_s"].items()}
    return result


# ---------------------------------------------------------------------------------------------- printing
LABEL = 58  # width of the arm column


def row(label: str, s: dict) -> str:
    ci = "" if math.isnan(s["ci95"]) else f"{s['mean']:.3f} ± {s['ci95']:.3f}"
    return f"  {label:<{LABEL}} {s['median']:>9.3f} {s['min']:>9.3f}   {ci}"


def print_evaluation(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(a) evaluation, shared weights, P = {p}, {r['examples']} validation examples "
        "(median / min s, mean ± 95% CI)"
    )
    first = r["first_call_s"]
    conv = r["bn_recalibration_examples"] > 0
    vmapped = "vmapped recalibrate_bn + evaluate_population" if conv else "vmapped evaluate_shared"
    print(f"  {vmapped + ', first call':<{LABEL}} {first:>9.3f}   (compile included, once per search)")
    print(row(vmapped + ", steady state", t["vmapped"]))
    print(f"  {'exact layer programs, first call':<{LABEL}} {r['exact_first_call_s']:>9.3f}   (compiles "
          "this population's new layer programs)")
    if r["exact_new_population_s"] is not None:
        print(f"  {'exact, then a new population of P others':<{LABEL}} {r['exact_new_population_s']:>9.3f}   "
              "(its unseen layer configurations compile)")
    print(row("exact layer programs, steady state", t["exact"]))
    print(row("per-arch compiled twin (extract + jit)", t["twin"]))
    print(row("PyTorch eager, one by one", t["torch"]))
    if r["bn_recalibration_examples"]:
        print(
            f"  (every arm includes each subnet's BatchNorm recalibration on {r['bn_recalibration_examples']} "
            "training images)"
        )
    vm = t["vmapped"]["median"]
    print(f"  ratio vmapped (steady) vs per-arch compile: {t['twin']['median'] / vm:.2f}x")
    print(f"  ratio vmapped (first call) vs per-arch compile: {t['twin']['median'] / first:.2f}x")
    print(f"  ratio vmapped (steady) vs PyTorch eager: {t['torch']['median'] / vm:.2f}x")
    print(f"  ratio vmapped (first call) vs PyTorch eager: {t['torch']['median'] / first:.2f}x")
    ex, first_ex = t["exact"]["median"], r["exact_first_call_s"]
    print(f"  ratio exact (steady) vs vmapped (steady): {vm / ex:.2f}x")
    print(f"  ratio exact (steady) vs per-arch compile: {t['twin']['median'] / ex:.2f}x")
    print(f"  ratio exact (first call) vs per-arch compile: {t['twin']['median'] / first_ex:.2f}x")
    if r["exact_new_population_s"] is not None:
        print(f"  ratio exact (new population) vs per-arch compile: "
              f"{t['twin']['median'] / r['exact_new_population_s']:.2f}x")
    print(f"  ratio exact (steady) vs PyTorch eager: {t['torch']['median'] / ex:.2f}x")
    acc = r["accuracy_mean"]
    print(
        f"  accuracy mean: vmapped {acc['vmapped']:.4f}, exact {acc['exact']:.4f}, twin {acc['twin']:.4f}, "
        f"torch {acc['torch']:.4f} "
        f"(max |diff| {r['accuracy_max_abs_diff']:.4f}; "
        f"torch vs JAX twin logits {r['torch_vs_twin_max_logit_diff']:.1e})"
    )
    if "bucketed" in r:
        b, tb = r["bucketed"], t["bucketed"]
        sizes = ", ".join(f"w{x['max_width']} k{x['max_kernel']}: {x['size']}" for x in b["buckets"])
        print(f"  bucketed by (widest stage, largest kernel), {len(b['buckets'])} buckets ({sizes}):")
        print(f"  {'vmapped bucketed, first call':<{LABEL}} {b['first_call_s']:>9.3f}   (one compile per bucket)")
        print(row("vmapped bucketed, steady state", tb))
        print(f"  ratio bucketed (steady) vs vmapped (steady): {vm / tb['median']:.2f}x")
        print(f"  ratio bucketed (steady) vs per-arch compile: {t['twin']['median'] / tb['median']:.2f}x")
        print(f"  ratio bucketed (steady) vs PyTorch eager: {t['torch']['median'] / tb['median']:.2f}x")
        print(
            f"  bucketed padded fraction: {b['padded_fraction']:.3f}; accuracies vs vmapped max |diff| "
            f"{b['accuracy_max_abs_diff_vs_vmapped']:.4f}"
        )
    print_flops(r)


def print_training(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(b) training, one epoch, P = {p}, {r['steps']} steps of {r['batch_size']} + validation "
        f"(Adam lr {r['lr']}; median / min s, mean ± 95% CI)"
    )
    first = r["first_call_s"]
    print(f"  {'vmapped train_population, first call':<{LABEL}} {first:>9.3f}   (compile ≈ {r['compile_s']:.3f} s)")
    print(row("vmapped train_population, steady epoch", t["vmapped"]))
    if "exact" in t:
        ex_first = r["first_call"]["exact"]
        print(f"  {'exact train_population_sized, first call (compiles)':<{LABEL}} {ex_first:>9.3f}")
        print(row("exact train_population_sized, steady epoch", t["exact"]))
    print(row("PyTorch eager, one after another", t["torch"]))
    print(f"  ratio vmapped (steady) vs PyTorch sequential: {t['torch']['median'] / t['vmapped']['median']:.2f}x")
    print(f"  ratio vmapped (first call) vs PyTorch sequential: {t['torch']['median'] / first:.2f}x")
    if "exact" in t:
        print(f"  ratio exact (steady) vs PyTorch sequential: {t['torch']['median'] / t['exact']['median']:.2f}x")
        print(f"  ratio exact (first call) vs PyTorch sequential: {t['torch']['median'] / ex_first:.2f}x")
        print(f"  ratio exact (steady) vs vmapped (steady): {t['vmapped']['median'] / t['exact']['median']:.2f}x")
    acc = r["accuracy_mean"]
    means = ", ".join(f"{arm} {v:.4f}" for arm, v in acc.items())
    print(f"  final accuracy mean: {means} (vmapped vs torch max |diff| per candidate {r['accuracy_max_abs_diff']:.4f})")
    print_flops(r)


def print_flops(r: dict) -> None:
    rates = ", ".join(
        f"{arm} {v / 1e9:.2f} GFLOP/s ({100 * r['peak_fraction'][arm]:.1f}%)"
        for arm, v in r["useful_flops_per_s"].items()
    )
    print(f"  useful FLOP/s (% of matmul peak): {rates}")
    executed = r["peak_fraction"]["vmapped"] / r["padded_fraction"]
    print(
        f"  padded fraction (candidate MACs / max-width MACs): {r['padded_fraction']:.3f}; "
        f"vmapped executed (padded) FLOP/s: {100 * executed:.1f}% of peak"
    )


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families", default="mlp,cnn", help=f"comma-separated families to benchmark, of {', '.join(FAMILIES)}"
    )
    parser.add_argument("--populations", type=int, nargs="+", default=[16, 64], help="population sizes P")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per arm (>= 3 for a CI)")
    parser.add_argument("--batch-size", type=int, default=64, help="training (and BatchNorm recalibration) batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--val-examples", type=int, default=None, help="use the first N validation examples")
    parser.add_argument("--torch-threads", type=int, default=TORCH_THREADS, help="torch.set_num_threads")
    parser.add_argument(
        "--conv-formulation", default="auto", choices=("auto", "slices", "lax"),
        help="ConvSupernet's convolutions (auto: slices on CPU)",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] @ [n, n] peak matmul")
    parser.add_argument(
        "--quick", action="store_true",
        help="P = 4, 256 train / 200 validation examples, 1 repeat, a smaller conv space",
    )
    parser.add_argument(
        "--bucket", action="store_true",
        help="conv families: also evaluate the population bucket by bucket (widest stage, largest kernel)",
    )
    parser.add_argument("--skip-training", action="store_true", help="run the evaluation arms (a) only")
    parser.add_argument("--json", metavar="PATH", help="save every number to this JSON file")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        parser.error(f"--families takes a comma-separated subset of {','.join(FAMILIES)}, got {unknown or 'none'}")
    if args.quick:
        args.populations, args.repeats, args.train_examples, args.val_examples, args.peak_size = [4], 1, 256, 200, 512
    if args.repeats < 1 or min(args.populations) < 1:
        parser.error("--repeats and every population size must be >= 1")
    return args


def conv_supernet(family: str, info, options: dict, formulation: str) -> ConvSupernet:
    """The CPU-sized single-family conv supernet (one per family: mixed families would compute all of them)."""
    space = macro_space(families=(family,), **options)
    return ConvSupernet(space, info.image_shape, info.num_classes, formulation=formulation, stem_stride=STEM_STRIDE)


def describe(supernet) -> str:
    """One line naming the benchmarked space."""
    if not isinstance(supernet, ConvSupernet):
        return f"space: {supernet.space!r}, MLP family (flattened images)"
    s = supernet.space
    h, w, _ = supernet.image_shape
    extra = f", expansions {s['stage1.expansion'].options}" if "stage1.expansion" in s.names else ""
    return (
        f"space: {h}x{w} MNIST, stem stride {supernet.stem_stride} (stem {supernet.stem_width} channels), "
        f"channels {s['stage1.channels'].options}, kernels {s['stage1.kernel'].options}{extra}, <= "
        f"{supernet.max_stages} stages x <= {supernet.max_depth} blocks, activations "
        f"{len(s['stage1.activation'].options)}, formulation {supernet.conv_formulation!r}"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    ds = load_dataset("mnist5k")
    train, val = ds.train, ds.validation
    if args.train_examples:
        train = type(train)(train.images[: args.train_examples], train.labels[: args.train_examples])
    if args.val_examples:
        val = type(val)(val.images[: args.val_examples], val.labels[: args.val_examples])
    peaks = matmul_peak(args.peak_size)
    peak = max(peaks.values())
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"matmul peak f32 [{args.peak_size}]^2: jnp {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} "
        f"GFLOP/s (peak = {peak / 1e9:.1f})"
    )
    print(f"data: mnist5k, {len(train)} train / {len(val)} validation examples")
    results = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg(), "matmul_peak_flops": peaks},
               "args": vars(args)}
    bn_images = bn_batches(train, args.batch_size)
    for family in args.families:
        if family == "mlp":
            supernet = MLPSupernet(
                macro_space(families=("mlp",)), int(np.prod(ds.info.image_shape)), ds.info.num_classes
            )
        else:
            options = QUICK_CONV_SPACE if args.quick else CONV_SPACE
            supernet = conv_supernet(family, ds.info, options, args.conv_formulation)
        params = supernet.init(jax.random.key(args.seed))
        results[family] = {"space": describe(supernet)}
        for p in args.populations:
            encs = distinct_population(supernet.space, jax.random.fold_in(jax.random.key(args.seed), p), p)
            print(f"\n=== {family.upper() if family in ('mlp', 'cnn') else family} family, P = {p} ===")
            print(describe(supernet))
            buckets = width_buckets(supernet, options, encs) if args.bucket and family != "mlp" else ()
            # Disjoint from encs: sampled from another key, rows already in encs dropped.
            others = distinct_population(supernet.space, jax.random.fold_in(jax.random.key(args.seed + 1), p), 2 * p)
            seen = {supernet.space.to_string(e) for e in encs}
            fresh = [e for e in others if supernet.space.to_string(e) not in seen][:p]
            fresh = np.stack(fresh) if fresh else None
            evaluation = bench_evaluation(
                supernet, params, encs, val, bn_images, args.repeats, peak, buckets, fresh=fresh
            )
            print_evaluation(p, evaluation)
            results[family][str(p)] = {"evaluation": evaluation,
                                       "architectures": [supernet.space.to_string(e) for e in encs]}
            if not args.skip_training:
                training = bench_training(
                    supernet, encs, (train, val), args.repeats, args.batch_size, args.lr, peak, args.seed
                )
                print_training(p, training)
                results[family][str(p)]["training"] = training
    results["machine"]["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
