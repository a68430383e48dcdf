"""A population as one program vs one network at a time: evaluation and training of P macro-space candidates.

Both sides run in this process on the embedded ``mnist5k`` dataset (validation split for evaluation, train
split for the training epoch), for P distinct architectures of the ``macro`` space (MLP family):

(a) evaluation with one set of shared supernet weights:
    - vmapped: `evaluate_shared`, one compile for the whole population. Its first call (compile included,
      paid once per search) and its steady state (every later population of the same size) are reported;
    - per-architecture compile: `extract` the standalone twin and `jax.jit` it, per architecture, compile
      included (in a search every architecture is new, so every twin is a fresh compile);
    - PyTorch eager: the same sliced networks built from the shared weights and run one by one (how S-NAS and
      NNI evaluate). Before timing, its logits are checked against the JAX twin's on a few architectures.
(b) training P candidates from the same initial weights for one epoch (same batches, Adam, same lr):
    - vmapped: `train_population` (one compile, reported separately from the steady-state epoch);
    - PyTorch eager: the same networks trained one after another.
    Both sides score the validation split after the epoch; their final accuracies are printed to show the work
    was the same (dropout masks come from different generators, so they agree in distribution, not bitwise).

Useful FLOP/s counts each candidate's own MACs (``macs(enc)``, x 2 FLOPs; training x 3 for forward + backward),
not what the masked supernet computes, as a fraction of the matmul peak measured here (a large f32 matmul in
jnp and in torch). The padded fraction, candidate MACs / max-width MACs, is the share of the vmapped program's
work that is useful: masks compute every block at the largest width.

Arms are interleaved within each repeat (A B C, A B C, ...); torch is warmed up on one architecture before
timing. XLA:CPU uses both cores; torch uses ``--torch-threads`` (default 1, its faster setting here, see below).

    python benchmarks/population.py                        # P = 16 and 64, 3 repeats (~10 min on 2 cores)
    python benchmarks/population.py --repeats 5 --json population.json
    python benchmarks/population.py --quick                # P = 4, tiny subset, 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
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
from jaxnas.population import evaluate_shared, init_population, train_population
from jaxnas.spaces import macro_space
from jaxnas.supernet import MLPSupernet

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


# ---------------------------------------------------------------------------------------------- torch twin
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


def to_torch(tree):
    """A pytree of jax arrays as the same nested dicts of torch tensors (copied to host once)."""
    return jax.tree.map(lambda a: torch.from_numpy(np.array(a)), tree)


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


def flop_counts(supernet: MLPSupernet, encs: np.ndarray) -> dict[str, float]:
    """Useful MACs per example summed over the population, and the share of the padded (max-width) MACs."""
    useful = sum(supernet.macs(e) for e in encs)
    padded = sum(supernet.macs(np.asarray(supernet.largest(e))) for e in encs)
    return {"useful_macs": float(useful), "padded_macs": float(padded), "padded_fraction": useful / padded}


def twin_accuracies(supernet: MLPSupernet, params, encs, x: jax.Array, y: jax.Array) -> np.ndarray:
    """[P] accuracy of each candidate's standalone twin, each extracted and compiled on its own (as in a search)."""
    accuracies = []
    for enc in encs:
        _, twin = supernet.extract(params, enc)
        graphdef, state = nnx.split(twin)

        # A fresh function per architecture: its compile is part of what is measured.
        def correct(state, x, y, graphdef=graphdef):
            return jnp.sum(jnp.argmax(nnx.merge(graphdef, state)(x), -1) == y)

        accuracies.append(int(jax.jit(correct)(state, x, y)) / x.shape[0])
    return np.asarray(accuracies)


def torch_eval_accuracies(supernet: MLPSupernet, weights: dict, encs, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """[P] accuracy of each candidate built from the shared torch weights and run eagerly, one by one."""
    accuracies = []
    with torch.no_grad():
        for enc in encs:
            model = torch_mlp(supernet, weights, enc).eval()
            accuracies.append(float((model(x).argmax(-1) == y).float().mean()))
    return np.asarray(accuracies)


def check_torch_matches_twin(supernet: MLPSupernet, params, weights: dict, encs, x: np.ndarray) -> float:
    """Max |logit difference| between the torch and the JAX twins of ``encs``; AssertionError when they differ."""
    worst = 0.0
    with torch.no_grad():
        for enc in encs:
            _, twin = supernet.extract(params, enc)
            expected = np.asarray(twin(jnp.asarray(x)))
            got = torch_mlp(supernet, weights, enc).eval()(torch.from_numpy(x)).numpy()
            diff = float(np.abs(expected - got).max())
            scale = max(1.0, float(np.abs(expected).max()))
            if diff > 1e-3 * scale or not (expected.argmax(-1) == got.argmax(-1)).all():
                raise AssertionError(
                    f"torch twin of {supernet.space.to_string(enc)} differs from the JAX twin (max |diff| {diff:.2e}): "
                    "the PyTorch arm would not evaluate the same network"
                )
            worst = max(worst, diff)
    return worst


def torch_train(
    supernet, init_weights: Sequence[dict], encs, x, y, val_x, val_y, index: np.ndarray, lr: float, steps=None
) -> np.ndarray:
    """[P] validation accuracy after training each candidate from its own init weights, one after another.

    ``index`` [n_batches, B] are the batches (the vmapped side's); ``steps`` limits them (warm-up).
    """
    accuracies = []
    for weights, enc in zip(init_weights, encs, strict=True):
        model = torch_mlp(supernet, weights, enc, trainable=True).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for rows in index[:steps]:
            rows = torch.from_numpy(rows)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracies.append(float((model(val_x).argmax(-1) == val_y).float().mean()))
    return np.asarray(accuracies)


# ---------------------------------------------------------------------------------------------- benchmarks
def bench_evaluation(supernet, params, encs, val, repeats: int, peak: float) -> dict:
    """(a): vmapped shared-weight evaluation vs per-architecture compiled twins vs torch eager, interleaved."""
    x, y = jnp.asarray(val.images), jnp.asarray(val.labels)
    n = x.shape[0]
    apply = supernet.apply

    def vmapped():
        return np.asarray(evaluate_shared(apply, params, encs, x, y, batch_size=n)["accuracy"])

    weights = to_torch(params)
    tx, ty = torch.from_numpy(val.images), torch.from_numpy(val.labels).long()
    first, acc_vmapped = timed(vmapped)
    max_diff = check_torch_matches_twin(supernet, params, weights, encs[:3], val.images[:64])  # also torch's warm-up
    times = {"vmapped": [], "twin": [], "torch": []}
    for _ in range(repeats):
        t, _ = timed(vmapped)
        times["vmapped"].append(t)
        t, acc_twin = timed(lambda: twin_accuracies(supernet, params, encs, x, y))
        times["twin"].append(t)
        t, acc_torch = timed(lambda: torch_eval_accuracies(supernet, weights, encs, tx, ty))
        times["torch"].append(t)
    flops = flop_counts(supernet, encs)
    useful = 2 * flops["useful_macs"] * n
    result = {
        "examples": n,
        "first_call_s": first,
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy_mean": {
            "vmapped": float(acc_vmapped.mean()), "twin": float(acc_twin.mean()), "torch": float(acc_torch.mean())
        },
        "accuracy_max_abs_diff": float(np.abs(acc_vmapped - np.stack([acc_twin, acc_torch])).max()),
        "torch_vs_twin_max_logit_diff": max_diff,
        **flops,
        "useful_flops": useful,
    }
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["useful_flops_per_s"]["vmapped_first_call"] = useful / first
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

    def vmapped():
        result = train_population(
            supernet.apply, params_P, encs, optimizer, x, y, vx, vy, epochs=1, batch_size=batch_size, seed=seed
        )
        return result.history[-1]

    init_weights = [to_torch(jax.tree.map(lambda a, p=p: a[p], params_P)) for p in range(len(encs))]
    tx, ty = torch.from_numpy(train.images), torch.from_numpy(train.labels).long()
    tvx, tvy = torch.from_numpy(val.images), torch.from_numpy(val.labels).long()

    def sequential():
        return torch_train(supernet, init_weights, encs, tx, ty, tvx, tvy, index, lr)

    torch_train(supernet, init_weights[:1], encs[:1], tx, ty, tvx, tvy, index, lr, steps=5)  # warm-up, one arch
    first, acc_vmapped = timed(vmapped)
    times = {"vmapped": [], "torch": []}
    for _ in range(repeats):
        t, acc_vmapped = timed(vmapped)
        times["vmapped"].append(t)
        t, acc_torch = timed(sequential)
        times["torch"].append(t)
    flops = flop_counts(supernet, encs)
    trained = index.size
    # Forward + backward of a dense layer is 3 matmuls of its size; the validation pass after the epoch is 1.
    useful = 2 * flops["useful_macs"] * (3 * trained + val.images.shape[0])
    result = {
        "train_examples": int(trained),
        "steps": int(index.shape[0]),
        "batch_size": batch_size,
        "lr": lr,
        "first_call_s": first,
        "compile_s": first - summary(times["vmapped"])["median"],
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy": {"vmapped": acc_vmapped.tolist(), "torch": acc_torch.tolist()},
        "accuracy_mean": {"vmapped": float(acc_vmapped.mean()), "torch": float(acc_torch.mean())},
        "accuracy_max_abs_diff": float(np.abs(acc_vmapped - acc_torch).max()),
        **flops,
        "useful_flops": useful,
    }
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["peak_fraction"] = {arm: v / peak for arm, v in result["useful_flops_per_s"].items()}
    return result


# ---------------------------------------------------------------------------------------------- printing
def row(label: str, s: dict) -> str:
    ci = "" if math.isnan(s["ci95"]) else f"{s['mean']:.3f} ± {s['ci95']:.3f}"
    return f"  {label:<44} {s['median']:>9.3f} {s['min']:>9.3f}   {ci}"


def print_evaluation(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(a) evaluation, shared weights, P = {p}, {r['examples']} validation examples "
        "(median / min s, mean ± 95% CI)"
    )
    first = r["first_call_s"]
    print(f"  {'vmapped evaluate_shared, first call':<44} {first:>9.3f}   (compile included, once per search)")
    print(row("vmapped evaluate_shared, steady state", t["vmapped"]))
    print(row("per-arch compiled twin (extract + jit)", t["twin"]))
    print(row("PyTorch eager, one by one", t["torch"]))
    vm = t["vmapped"]["median"]
    print(f"  ratio vmapped (steady) vs per-arch compile: {t['twin']['median'] / vm:.1f}x")
    print(f"  ratio vmapped (first call) vs per-arch compile: {t['twin']['median'] / first:.1f}x")
    print(f"  ratio vmapped (steady) vs PyTorch eager: {t['torch']['median'] / vm:.1f}x")
    print(f"  ratio vmapped (first call) vs PyTorch eager: {t['torch']['median'] / first:.1f}x")
    acc = r["accuracy_mean"]
    print(
        f"  accuracy mean: vmapped {acc['vmapped']:.4f}, twin {acc['twin']:.4f}, torch {acc['torch']:.4f} "
        f"(max |diff| {r['accuracy_max_abs_diff']:.4f}; "
        f"torch vs JAX twin logits {r['torch_vs_twin_max_logit_diff']:.1e})"
    )
    print_flops(r)


def print_training(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(b) training, one epoch, P = {p}, {r['steps']} steps of {r['batch_size']} + validation "
        f"(Adam lr {r['lr']}; median / min s, mean ± 95% CI)"
    )
    first = r["first_call_s"]
    print(f"  {'vmapped train_population, first call':<44} {first:>9.3f}   (compile ≈ {r['compile_s']:.3f} s)")
    print(row("vmapped train_population, steady epoch", t["vmapped"]))
    print(row("PyTorch eager, one after another", t["torch"]))
    print(f"  ratio vmapped (steady) vs PyTorch sequential: {t['torch']['median'] / t['vmapped']['median']:.1f}x")
    print(f"  ratio vmapped (first call) vs PyTorch sequential: {t['torch']['median'] / first:.1f}x")
    acc = r["accuracy_mean"]
    print(
        f"  final accuracy mean: vmapped {acc['vmapped']:.4f}, torch {acc['torch']:.4f} "
        f"(max |diff| per candidate {r['accuracy_max_abs_diff']:.4f})"
    )
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
    parser.add_argument("--populations", type=int, nargs="+", default=[16, 64], help="population sizes P")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per arm (>= 3 for a CI)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--val-examples", type=int, default=None, help="use the first N validation examples")
    parser.add_argument("--torch-threads", type=int, default=TORCH_THREADS, help="torch.set_num_threads")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] @ [n, n] peak matmul")
    parser.add_argument("--quick", action="store_true", help="P = 4, 256 train / 200 validation examples, 1 repeat")
    parser.add_argument("--json", metavar="PATH", help="save every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.populations, args.repeats, args.train_examples, args.val_examples, args.peak_size = [4], 1, 256, 200, 512
    if args.repeats < 1 or min(args.populations) < 1:
        parser.error("--repeats and every population size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    ds = load_dataset("mnist5k")
    train, val = ds.train, ds.validation
    if args.train_examples:
        train = type(train)(train.images[: args.train_examples], train.labels[: args.train_examples])
    if args.val_examples:
        val = type(val)(val.images[: args.val_examples], val.labels[: args.val_examples])
    space = macro_space(families=("mlp",))
    supernet = MLPSupernet(space, int(np.prod(ds.info.image_shape)), ds.info.num_classes)
    params = supernet.init(jax.random.key(args.seed))
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
    print(f"data: mnist5k, {len(train)} train / {len(val)} validation examples; space: {space!r}")
    results = {"machine": {"cores": os.cpu_count(), "load_average": os.getloadavg(), "matmul_peak_flops": peaks},
               "args": vars(args), "mlp": {}}
    for p in args.populations:
        encs = distinct_population(space, jax.random.fold_in(jax.random.key(args.seed), p), p)
        print(f"\n=== MLP family, P = {p} ===")
        evaluation = bench_evaluation(supernet, params, encs, val, args.repeats, peak)
        print_evaluation(p, evaluation)
        training = bench_training(supernet, encs, (train, val), args.repeats, args.batch_size, args.lr, peak, args.seed)
        print_training(p, training)
        results["mlp"][str(p)] = {"evaluation": evaluation, "training": training,
                                  "architectures": [space.to_string(e) for e in encs]}
    print(
        "\nCNN arms: pending (ConvSupernet's arms need a PyTorch twin of the conv families with its per-subnet "
        "BatchNorm statistics, not written yet)"
    )
    results["machine"]["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
