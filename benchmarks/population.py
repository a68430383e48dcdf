"""A population as one program vs one network at a time: evaluation and training of P macro-space candidates.

Both sides run in this process on the embedded ``mnist5k`` dataset (validation split for evaluation, train
split for the training epoch), for P distinct architectures of each family in ``--families`` (default
``mlp,cnn``; ``resnet`` and ``mobilenet`` also run). The MLP family uses the full ``macro`` space's MLP options;
a conv family uses a CPU-sized `ConvSupernet` (28 x 28 MNIST, stem stride 2, channels (16, 32), kernels (3, 5),
<= 2 stages x <= 2 blocks, expansions (1, 2) for mobilenet; the "slices" formulation on CPU):

(a) evaluation with one set of shared supernet weights:
    - masked: `evaluate_shared` (MLP), or for a conv family the vmapped `recalibrate_bn` (per-subnet BatchNorm
      statistics from ``BN_BATCHES`` training batches) followed by `evaluate_population` of
      `ConvSupernet.apply_recalibrated`; one masked vmapped program, one compile for the whole population. Its
      first call (compile included, paid once per search) and its steady state (every later population of the
      same size) are reported;
    - sized: `jaxnas.population.sized.evaluate_sized`, every candidate at its own sizes through layer programs
      compiled once per layer size (``population.backend=sized``, what mode oneshot uses on CPU). Its first call
      compiles the layer programs the population needs; then a *new* population of P other architectures is
      timed once (only its unseen layer sizes compile: what a search's next generation costs), then the
      steady state;
    - per-architecture compile (twin): `extract` the standalone twin and `jax.jit` it, per architecture, compile
      included (in a search every architecture is new, so every twin is a fresh compile); a conv twin takes its
      statistics from one jitted `recalibrate_bn` (compiled once, before timing);
    - PyTorch eager (torch): the same sliced networks (`population_reference`) built from the shared weights and
      run one by one (how S-NAS and NNI evaluate); a conv network first recalibrates its own BatchNorm statistics
      on the same batches. Before timing, its logits are checked against the JAX twin's on a few architectures.
(b) training P candidates from the same initial weights for one epoch (same batches, Adam, same lr):
    - masked: `train_population` (one compile, reported separately from the steady-state epoch);
    - sized: `jaxnas.population.sized_train.train_population_sized`, every candidate at its real sizes in one
      program per population (its compile, paid once per population, reported as the first call);
    - PyTorch eager (torch): the same networks trained one after another (BatchNorm with the batch's statistics,
      as `ConvSupernet.apply` trains, and as `train_population` validates: the same validation batches).
    Every arm scores the validation split after the epoch; their final accuracies are printed to show the work
    was the same (dropout masks come from different generators, so they agree in distribution, not bitwise).

Useful FLOP/s counts each candidate's own MACs (``macs(enc)``, x 2 FLOPs; training x 3 for forward + backward;
the BatchNorm recalibration passes of (a) count as forward passes), not what the masked supernet computes, as a
fraction of the matmul peak measured here (a large f32 matmul in jnp and in torch). The padded fraction,
candidate MACs / max-width MACs, is the share of the masked program's work that is useful: masks compute every
block at the largest width (and every conv at the largest kernel).

Arms are interleaved within each repeat (A B C, A B C, ...); torch is warmed up on one architecture before
timing. XLA:CPU uses both cores; torch uses ``--torch-threads`` (default 1, see ``TORCH_THREADS``). Every
number printed is also in the ``--json`` file: per arm ``times`` (median / min / mean / ci95 s), the first
calls, ``ratios`` (the printed "ratio A vs B" lines: B's time / A's), accuracies and FLOP/s.

    python benchmarks/population.py                        # mlp and cnn, P = 16 and 64, 3 repeats
    python benchmarks/population.py --families cnn --populations 16 --repeats 5 --json population.json
    python benchmarks/population.py --families cnn --bucket --skip-training   # + the bucketed evaluation arm
    python benchmarks/population.py --quick                # P = 4, tiny subset, 1 repeat: a smoke run

The PyTorch networks are in `population_reference.py`, the timing helpers in `population_timing.py` (next to
this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from population_reference import TorchConvNet, torch_images, torch_net, torch_weights
from population_timing import matmul_peak, summary, timed

from jaxnas.data import epoch_indices, load_dataset
from jaxnas.population import evaluate_population, evaluate_shared, init_population, tile_population, train_population
from jaxnas.population import sized_train
from jaxnas.population.sized import evaluate_sized
from jaxnas.spaces import macro_space
from jaxnas.supernet import ConvSupernet, MLPSupernet

# Torch eager on these small networks runs fastest on 1 thread here (docs/benchmarks.md); ``--torch-threads 2``
# matches XLA:CPU's thread count instead.
TORCH_THREADS = 1
FAMILIES = ("mlp", "cnn", "resnet", "mobilenet")
# The CPU-sized conv space (the full macro space at 28 x 28 is far too slow per arm on a small CPU); ``--quick``
# shrinks it further, and the MLP space too (<= 2 stages x 1 block of 16 or 32 units: its masked and sized programs
# compile in a fraction of the full MLP space's time; every arm still runs).
CONV_SPACE = {"max_stages": 2, "max_depth": 2, "channels": (16, 32), "kernels": (3, 5), "expansions": (1, 2)}
QUICK_MLP_SPACE = {"max_stages": 2, "max_depth": 1, "units": (16, 32)}
QUICK_CONV_SPACE = {"max_stages": 2, "max_depth": 1, "channels": (4, 8), "kernels": (1, 3), "expansions": (1, 2)}
STEM_STRIDE = 2
BN_BATCHES = 4  # training batches (of --batch-size) for each subnet's BatchNorm statistics in (a)
SIZED_BATCH = 1000  # examples per batch of the sized arm (no padding skew: its statistics are recalibrated)
CONV_EVAL_BATCH = 125  # masked conv evaluation batch: P x batch x the largest patch matrix must fit in memory


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


def masked_eval_accuracies(supernet, params, encs, x, y, bn_x) -> np.ndarray:
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
        accuracies[b.rows] = masked_eval_accuracies(b.supernet, small_params, b.encs, x, y, bn_x)
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

    ``index`` [n_batches, B] are the batches (the JAX arms'); ``steps`` limits them (warm-up). Validation
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
    """(a): masked and sized shared-weight evaluation vs per-architecture compiled twins vs torch eager,
    interleaved; with ``buckets``, also the population evaluated bucket by bucket (`width_buckets`)."""
    x, y = jnp.asarray(val.images), jnp.asarray(val.labels)
    n = x.shape[0]
    conv = isinstance(supernet, ConvSupernet)
    bn_x = jnp.asarray(bn_images)
    torch_bn_x = [torch_images(supernet, b) for b in bn_images] if conv else None
    # One compile of the single-subnet recalibration serves every twin (the encoding is traced).
    recalibrate = jax.jit(supernet.recalibrate_bn) if conv else None

    def masked():
        return masked_eval_accuracies(supernet, params, encs, x, y, bn_x)

    weights = torch_weights(supernet, params)
    tx, ty = torch_images(supernet, val.images), torch.from_numpy(val.labels).long()
    def bucketed():
        return bucketed_eval_accuracies(buckets, params, x, y, bn_x)

    def sized(population=encs):
        bn = bn_x if conv else None
        return evaluate_sized(supernet, params, population, x, y, bn_batches=bn, batch_size=SIZED_BATCH)["accuracy"]

    first, acc_masked = timed(masked)
    first_sized, acc_sized = timed(sized)  # compiles the layer programs this population needs
    # A new population of other architectures, as a search's next generation: only layer programs of
    # configurations not seen yet compile.
    fresh_sized = None
    if fresh is not None:
        fresh_sized, _ = timed(lambda: sized(fresh))
    if buckets:
        first_bucketed, acc_bucketed = timed(bucketed)
    # Also the warm-up of torch and of the twins' recalibration.
    max_diff = check_torch_matches_twin(
        supernet, params, weights, encs[:3], val.images[:64], recalibrate, bn_x, torch_bn_x
    )
    times = {"masked": [], "sized": [], "twin": [], "torch": []} | ({"bucketed": []} if buckets else {})
    for _ in range(repeats):
        t, _ = timed(masked)
        times["masked"].append(t)
        t, acc_sized = timed(sized)
        times["sized"].append(t)
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
    accuracy = {"masked": acc_masked, "sized": np.asarray(acc_sized), "twin": acc_twin, "torch": acc_torch}
    result = {
        "examples": n,
        "bn_recalibration_examples": recalibrated,
        "masked_first_call_s": first,
        "sized_first_call_s": first_sized,
        "sized_new_population_s": fresh_sized,
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy": {arm: acc.tolist() for arm, acc in accuracy.items()},
        "accuracy_mean": {arm: float(acc.mean()) for arm, acc in accuracy.items()},
        "accuracy_max_abs_diff": float(np.abs(acc_masked - np.stack([acc_sized, acc_twin, acc_torch])).max()),
        "torch_vs_twin_max_logit_diff": max_diff,
        **flops,
        "useful_flops": useful,
    }
    median = {arm: s["median"] for arm, s in result["times"].items()}
    result["ratios"] = {  # "A vs B": B's time / A's (how many times faster A is)
        "masked (steady) vs per-arch compile": median["twin"] / median["masked"],
        "masked (first call) vs per-arch compile": median["twin"] / first,
        "masked (steady) vs PyTorch eager": median["torch"] / median["masked"],
        "masked (first call) vs PyTorch eager": median["torch"] / first,
        "sized (steady) vs masked (steady)": median["masked"] / median["sized"],
        "sized (steady) vs per-arch compile": median["twin"] / median["sized"],
        "sized (first call) vs per-arch compile": median["twin"] / first_sized,
    }
    if fresh_sized is not None:
        result["ratios"]["sized (new population) vs per-arch compile"] = median["twin"] / fresh_sized
    result["ratios"]["sized (steady) vs PyTorch eager"] = median["torch"] / median["sized"]
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["useful_flops_per_s"]["masked_first_call"] = useful / first
    result["useful_flops_per_s"]["sized_first_call"] = useful / first_sized
    if buckets:
        padded = sum(b.supernet.macs(np.asarray(b.supernet.largest(e))) for b in buckets for e in b.encs)
        result["bucketed"] = {
            "buckets": [
                {"max_width": b.supernet.max_width, "max_kernel": b.supernet.max_kernel, "size": len(b.rows)}
                for b in buckets
            ],
            "first_call_s": first_bucketed,
            "padded_fraction": flops["useful_macs"] / padded,
            "accuracy_max_abs_diff_vs_masked": float(np.abs(acc_bucketed - acc_masked).max()),
            "ratios": {
                "bucketed (steady) vs masked (steady)": median["masked"] / median["bucketed"],
                "bucketed (steady) vs per-arch compile": median["twin"] / median["bucketed"],
                "bucketed (steady) vs PyTorch eager": median["torch"] / median["bucketed"],
            },
        }
    result["peak_fraction"] = {arm: v / peak for arm, v in result["useful_flops_per_s"].items()}
    return result


def bench_training(supernet, encs, data, repeats: int, batch_size: int, lr: float, peak: float, seed: int) -> dict:
    """(b): one epoch of P candidates, masked `train_population` and (where supported) `train_population_sized` vs
    the same networks trained one by one in torch."""
    train, val = data
    params_P = init_population(supernet.init, jax.random.key(seed), len(encs))
    optimizer = optax.adam(lr)  # one object: it is a static argument of the compiled epoch, reused across calls
    x, y = jnp.asarray(train.images), jnp.asarray(train.labels)
    vx, vy = jnp.asarray(val.images), jnp.asarray(val.labels)
    index = epoch_indices(x.shape[0], batch_size, seed, 0)
    eval_batch = eval_batch_size(supernet, vx.shape[0])

    def masked():
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

    def sized():
        result = sized_train.train_population_sized(
            supernet, params_P, encs, optimizer, x, y, vx, vy, epochs=1, batch_size=batch_size, seed=seed,
            eval_batch_size=eval_batch,
        )
        return result.history[-1]

    arms = {"masked": masked, "torch": sequential}
    if sized_train.supports(supernet):
        arms = {"masked": masked, "sized": sized, "torch": sequential}
    sequential(init_weights[:1], encs[:1], steps=5)  # warm-up, one architecture
    first, accuracy = {}, {}
    for arm in ("masked", "sized"):
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
        **{f"{arm}_first_call_s": s for arm, s in first.items()},
        "masked_compile_s": first["masked"] - summary(times["masked"])["median"],
        "times": {arm: summary(ts) for arm, ts in times.items()},
        "accuracy": {arm: np.asarray(acc).tolist() for arm, acc in accuracy.items()},
        "accuracy_mean": {arm: float(np.mean(acc)) for arm, acc in accuracy.items()},
        "accuracy_max_abs_diff": float(np.abs(accuracy["masked"] - accuracy["torch"]).max()),
        **flops,
        "useful_flops": useful,
    }
    median = {arm: s["median"] for arm, s in result["times"].items()}
    result["ratios"] = {  # "A vs B": B's time / A's (how many times faster A is)
        "masked (steady) vs PyTorch sequential": median["torch"] / median["masked"],
        "masked (first call) vs PyTorch sequential": median["torch"] / first["masked"],
    }
    if "sized" in arms:
        result["ratios"] |= {
            "sized (steady) vs PyTorch sequential": median["torch"] / median["sized"],
            "sized (first call) vs PyTorch sequential": median["torch"] / first["sized"],
            "sized (steady) vs masked (steady)": median["masked"] / median["sized"],
        }
    result["useful_flops_per_s"] = {arm: useful / result["times"][arm]["median"] for arm in times}
    result["peak_fraction"] = {arm: v / peak for arm, v in result["useful_flops_per_s"].items()}
    return result


# ---------------------------------------------------------------------------------------------- printing
LABEL = 58  # width of the arm column


def row(label: str, s: dict) -> str:
    ci = "" if s["ci95"] is None else f"{s['mean']:.3f} ± {s['ci95']:.3f}"
    return f"  {label:<{LABEL}} {s['median']:>9.3f} {s['min']:>9.3f}   {ci}"


def print_ratios(ratios: dict[str, float]) -> None:
    for name, value in ratios.items():
        print(f"  ratio {name}: {value:.2f}x")


def print_evaluation(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(a) evaluation, shared weights, P = {p}, {r['examples']} validation examples "
        "(median / min s, mean ± 95% CI)"
    )
    conv = r["bn_recalibration_examples"] > 0
    masked = "masked recalibrate_bn + evaluate_population" if conv else "masked evaluate_shared"
    first = r["masked_first_call_s"]
    print(f"  {masked + ', first call':<{LABEL}} {first:>9.3f}   (compile included, once per search)")
    print(row(masked + ", steady state", t["masked"]))
    print(f"  {'sized evaluate_sized, first call':<{LABEL}} {r['sized_first_call_s']:>9.3f}   (compiles "
          "this population's new layer programs)")
    if r["sized_new_population_s"] is not None:
        print(f"  {'sized, then a new population of P others':<{LABEL}} {r['sized_new_population_s']:>9.3f}   "
              "(its unseen layer configurations compile)")
    print(row("sized evaluate_sized, steady state", t["sized"]))
    print(row("per-arch compiled twin (extract + jit)", t["twin"]))
    print(row("PyTorch eager, one by one", t["torch"]))
    if r["bn_recalibration_examples"]:
        print(
            f"  (every arm includes each subnet's BatchNorm recalibration on {r['bn_recalibration_examples']} "
            "training images)"
        )
    print_ratios(r["ratios"])
    acc = r["accuracy_mean"]
    print(
        f"  accuracy mean: masked {acc['masked']:.4f}, sized {acc['sized']:.4f}, twin {acc['twin']:.4f}, "
        f"torch {acc['torch']:.4f} "
        f"(max |diff| {r['accuracy_max_abs_diff']:.4f}; "
        f"torch vs JAX twin logits {r['torch_vs_twin_max_logit_diff']:.1e})"
    )
    if "bucketed" in r:
        b, tb = r["bucketed"], t["bucketed"]
        sizes = ", ".join(f"w{x['max_width']} k{x['max_kernel']}: {x['size']}" for x in b["buckets"])
        print(f"  bucketed by (widest stage, largest kernel), {len(b['buckets'])} buckets ({sizes}):")
        print(f"  {'masked bucketed, first call':<{LABEL}} {b['first_call_s']:>9.3f}   (one compile per bucket)")
        print(row("masked bucketed, steady state", tb))
        print_ratios(b["ratios"])
        print(
            f"  bucketed padded fraction: {b['padded_fraction']:.3f}; accuracies vs masked max |diff| "
            f"{b['accuracy_max_abs_diff_vs_masked']:.4f}"
        )
    print_flops(r)


def print_training(p: int, r: dict) -> None:
    t = r["times"]
    print(
        f"\n(b) training, one epoch, P = {p}, {r['steps']} steps of {r['batch_size']} + validation "
        f"(Adam lr {r['lr']}; median / min s, mean ± 95% CI)"
    )
    print(f"  {'masked train_population, first call':<{LABEL}} {r['masked_first_call_s']:>9.3f}   "
          f"(compile ≈ {r['masked_compile_s']:.3f} s)")
    print(row("masked train_population, steady epoch", t["masked"]))
    if "sized" in t:
        print(f"  {'sized train_population_sized, first call (compiles)':<{LABEL}} {r['sized_first_call_s']:>9.3f}")
        print(row("sized train_population_sized, steady epoch", t["sized"]))
    print(row("PyTorch eager, one after another", t["torch"]))
    print_ratios(r["ratios"])
    acc = r["accuracy_mean"]
    means = ", ".join(f"{arm} {v:.4f}" for arm, v in acc.items())
    print(f"  final accuracy mean: {means} (masked vs torch max |diff| per candidate {r['accuracy_max_abs_diff']:.4f})")
    print_flops(r)


def print_flops(r: dict) -> None:
    rates = ", ".join(
        f"{arm} {v / 1e9:.2f} GFLOP/s ({100 * r['peak_fraction'][arm]:.1f}%)"
        for arm, v in r["useful_flops_per_s"].items()
    )
    print(f"  useful FLOP/s (% of matmul peak): {rates}")
    executed = r["peak_fraction"]["masked"] / r["padded_fraction"]
    print(
        f"  padded fraction (candidate MACs / max-width MACs): {r['padded_fraction']:.3f}; "
        f"masked executed (padded) FLOP/s: {100 * executed:.1f}% of peak"
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
        help="P = 4, 256 train / 200 validation examples, 1 repeat, smaller MLP and conv spaces",
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
            mlp_space = macro_space(families=("mlp",), **(QUICK_MLP_SPACE if args.quick else {}))
            supernet = MLPSupernet(mlp_space, int(np.prod(ds.info.image_shape)), ds.info.num_classes)
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
