"""Early exits for an exported conv twin: linear heads after its blocks, a confidence threshold per exit.

An exit after block ``k`` is a head ``pool(h_k) @ W_k + b_k`` (global average pool, one linear layer), trained on
the train split with the backbone frozen (the twin is never changed). At inference the batch runs to the first
exit; images whose softmax confidence reaches that exit's threshold leave with its prediction, the rest continue
to the next exit and, at last, the twin's own head. :meth:`EarlyExitNet.predict` (the reference) decides on the
host between segments and pads the remaining images to a power of two, so each segment compiles for a few static
shapes; :meth:`EarlyExitNet.predict_fused` routes the same way inside one jitted program (no host round trip): the
remaining images are compacted to the front and the next segment runs on a static bucket of rows picked by
``lax.switch`` (XLA runs only the taken branch, so the work really shrinks).

Thresholds are calibrated on validation only (:func:`calibrate_thresholds`): the thresholds that minimise the
average MACs while the whole policy keeps its accuracy drop within the guardrail on validation. ``avg_macs``
weighs each exit's MACs (backbone to that exit, and the heads evaluated on the way) by the fraction of images
leaving there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnas.adaptive.gated import GatedNet
from jaxnas.supernet.conv import TwinConvNet


def exit_points(twin: TwinConvNet) -> list[int]:
    """Block indices after which an exit is attached: every block but the last (the twin's own head is there)."""
    return list(range(len(twin.blocks) - 1))


@dataclasses.dataclass
class EarlyExitNet:
    """An exported twin with exit heads after ``exits`` (block indices) and thresholds (``inf``: never exit)."""

    twin: TwinConvNet
    exits: list[int]
    heads: list[dict]
    thresholds: list[float]
    buckets: int = 16  # fused segments run on multiples of B / buckets rows (fused_buckets)
    grid: int = 1  # exit heads read the features averaged over a grid x grid partition of the positions

    def __post_init__(self):
        self._graph, self._state = nnx.split(self.twin)
        self._leaves, self._treedef = jax.tree.flatten(self._state)
        self._bounds = [0, *(k + 1 for k in self.exits), len(self.twin.blocks)]
        self._fused: dict[tuple, object] = {}
        self.fused_traces = 0  # times a fused program was traced: one per threshold setting and batch shape

    @functools.cached_property
    def _segments(self):
        """Jitted ``(state, h, heads) -> (h, logits)`` per segment: blocks between exits, then that exit's head."""
        graph, treedef, bounds, grid = self._graph, self._treedef, self._bounds, self.grid

        def segment(index, state, h, head):
            twin = nnx.merge(graph, jax.tree.unflatten(treedef, state))
            if index == 0:
                h = jax.nn.relu(twin.stem(h))
            for block in list(twin.blocks)[bounds[index] : bounds[index + 1]]:
                h = block(h)
            logits = twin.head(h.mean((1, 2))) if head is None else exit_pool(h, grid) @ head["w"] + head["b"]
            return h, logits

        return [jax.jit(functools.partial(segment, i)) for i in range(len(bounds) - 1)]

    @functools.cached_property
    def _trunks(self):
        """Jitted ``(state, h) -> (h, pooled)`` per segment before an exit: its blocks only (no head)."""
        graph, treedef, bounds, grid = self._graph, self._treedef, self._bounds, self.grid

        def trunk(index, state, h):
            twin = nnx.merge(graph, jax.tree.unflatten(treedef, state))
            if index == 0:
                h = jax.nn.relu(twin.stem(h))
            for block in list(twin.blocks)[bounds[index] : bounds[index + 1]]:
                h = block(h)
            return h, exit_pool(h, grid)

        return [jax.jit(functools.partial(trunk, i)) for i in range(len(self.exits))]

    def features(self, x) -> list[jax.Array]:
        """Pooled ``[B, grid * grid * C_k]`` features at every exit (full batch, no exiting; see `exit_pool`)."""
        out, h = [], jnp.asarray(x, jnp.float32)
        for trunk in self._trunks:
            h, pooled = trunk(self._leaves, h)
            out.append(pooled)
        return out

    def all_logits(self, x) -> list[np.ndarray]:
        """Logits of every exit and the final head for every image (no exiting): ``[n_exits + 1] x [B, classes]``."""
        out, h = [], jnp.asarray(x, jnp.float32)
        for i, segment in enumerate(self._segments):
            h, logits = segment(self._leaves, h, self.heads[i] if i < len(self.exits) else None)
            out.append(np.asarray(logits))
        return out

    def predict(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(logits [B, classes], exit index [B])`` of one batch, images leaving at the first confident exit."""
        h = jnp.asarray(x, jnp.float32)
        n = h.shape[0]
        logits_out = np.zeros((n, self.twin.head.out_features), np.float32)
        where = np.full(n, len(self.exits), np.int32)
        alive = np.arange(n)
        for i, segment in enumerate(self._segments):
            last = i == len(self.exits)
            if not last and self.thresholds[i] == np.inf:  # nobody leaves here: no head, no look at the host
                h, _ = self._trunks[i](self._leaves, h)
                continue
            h, logits = segment(self._leaves, h, None if last else self.heads[i])
            logits = np.asarray(logits)[: len(alive)]
            if last:
                logits_out[alive] = logits
                break
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            leave = probs.max(-1) / probs.sum(-1) >= self.thresholds[i]
            logits_out[alive[leave]] = logits[leave]
            where[alive[leave]] = i
            stay = np.flatnonzero(~leave)
            alive = alive[stay]
            if not len(alive):
                break
            bucket = 1 << int(np.ceil(np.log2(len(stay))))  # a few static shapes per segment
            h = jnp.take(h, jnp.asarray(np.pad(stay, (0, bucket - len(stay)), mode="edge")), axis=0)
        return logits_out, where

    def predict_fused(self, x) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` in one jitted program: ``(logits [B, classes], exit index [B])``, the same routing."""
        logits, where = self.fused_forward(x)
        return np.asarray(logits), np.asarray(where)

    def fused_forward(self, x) -> tuple[jax.Array, jax.Array]:
        """:meth:`predict_fused` without the copy to the host (device arrays, dispatched asynchronously)."""
        return self.fused_program()(self._leaves, self.heads, jnp.asarray(x, jnp.float32))

    def fused_program(self):
        """The jitted ``(state leaves, heads, x [B, H, W, C]) -> (logits [B, classes], exit index [B] int32)`` of the
        current thresholds (cached per thresholds and buckets; jax re-traces it per batch shape)."""
        thresholds = tuple(float(t) for t in self.thresholds)
        if len(thresholds) != len(self.exits):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.exits)} exits {self.exits}")
        missing = [i for i, t in enumerate(thresholds) if t != np.inf and i >= len(self.heads)]
        if missing:
            raise ValueError(f"exits {missing} have finite thresholds but no trained head ({len(self.heads)} heads)")
        key = (thresholds, self.buckets)
        if key not in self._fused:
            self._fused[key] = jax.jit(functools.partial(self._fused_forward, thresholds, self.buckets))
        return self._fused[key]

    def _stages(self, thresholds: tuple[float, ...]) -> list[tuple[int, int, int | None]]:
        """``(first segment, end segment, exit)`` per stage: the segments up to the next exit with a finite
        threshold (``inf`` exits are skipped at trace time: no head, no decision); ``exit`` None: the twin's head."""
        stages, start = [], 0
        for i, t in enumerate(thresholds):
            if t != np.inf:
                stages.append((start, i + 1, i))
                start = i + 1
        return [*stages, (start, len(self.exits) + 1, None)]

    def _fused_forward(self, thresholds, buckets, state, heads, x):
        """Stage by stage (:meth:`_stages`): the rows still running are compacted to the front and each stage after
        the first runs on the smallest bucket holding them (``lax.switch``, padded back to ``B`` rows); the logits
        and exit of the images leaving are scattered back to batch order."""
        self.fused_traces += 1
        twin = nnx.merge(self._graph, jax.tree.unflatten(self._treedef, state))
        n_rows, last = x.shape[0], len(self.exits)
        sizes = fused_buckets(n_rows, buckets)
        rows = jnp.arange(n_rows)
        logits_out = jnp.zeros((n_rows, twin.head.out_features), jnp.float32)
        where = jnp.full(n_rows, last, jnp.int32)
        origin = rows  # the batch index of the image in each row: the remaining images are compacted to the front
        alive = n_rows  # rows [0, alive) hold images still running
        h, order = x, None
        for first, end, exit_ in self._stages(thresholds):

            def run(h, first=first, end=end, exit_=exit_):
                if first == 0:
                    h = jax.nn.relu(twin.stem(h))
                for block in list(twin.blocks)[self._bounds[first] : self._bounds[end]]:
                    h = block(h)
                if exit_ is None:
                    return None, twin.head(h.mean((1, 2)))
                return h, exit_pool(h, self.grid) @ heads[exit_]["w"] + heads[exit_]["b"]

            if order is None:  # the first stage: the whole batch
                h, logits = run(h)
            else:
                padded = jax.eval_shape(run, jax.ShapeDtypeStruct(h.shape, h.dtype))

                def branch(size, h, order, run=run, padded=padded):
                    if size == 0:
                        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), padded)
                    out = run(jnp.take(h, order[:size], axis=0))
                    return jax.tree.map(lambda a: jnp.pad(a, [(0, n_rows - size)] + [(0, 0)] * (a.ndim - 1)), out)

                bucket = jnp.searchsorted(jnp.asarray(sizes), alive)  # the smallest size >= alive
                h, logits = jax.lax.switch(bucket, [functools.partial(branch, s) for s in sizes], h, order)
            valid = rows < alive
            if exit_ is None:
                leave = valid
            else:  # the confidence as predict computes it on the host
                probs = jnp.exp(logits - logits.max(-1, keepdims=True))
                leave = valid & (probs.max(-1) / probs.sum(-1) >= thresholds[exit_])
            target = jnp.where(leave, origin, n_rows)  # out of bounds: dropped
            logits_out = logits_out.at[target].set(logits, mode="drop")
            where = where.at[target].set(last if exit_ is None else exit_, mode="drop")
            if exit_ is None:
                break
            stay = valid & ~leave
            order = jnp.nonzero(stay, size=n_rows, fill_value=0)[0]  # stable: the staying rows, in order
            origin, alive = origin[order], stay.sum()
        return logits_out, where

    def segment_macs(self, net: GatedNet, image_shape, *, deployed: bool = False) -> list[int]:
        """MACs of one image leaving at exit ``k`` (the last: the twin's head), heads on the way included.

        By default every exit's head counts (the thresholds are not known yet when the calibration needs these);
        ``deployed=True`` counts only the heads the current thresholds use (finite), as :meth:`fused_forward`
        computes: with every threshold ``inf`` the last entry is the twin's own MACs."""
        layers = net.layer_macs(net.full, image_shape)
        classes = self.twin.head.out_features
        used = [j for j in range(len(self.exits))
                if not deployed or (j < len(self.thresholds) and self.thresholds[j] != np.inf)]
        out = []
        for k in range(len(self._bounds) - 1):
            backbone = layers[0] + sum(layers[1 : self._bounds[k + 1] + 1])
            heads = sum(int(self.heads[j]["w"].shape[0]) * classes for j in used if j <= k)
            out.append(backbone + heads + (layers[-1] if k == len(self.exits) else 0))
        return out


def exit_pool(h: jax.Array, grid: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, g * g * C]``: the mean over each cell of a ``g x g`` partition of the positions
    (``g = min(grid, H, W)``; cells as even as the sizes allow), cells in row-major order. ``grid=1`` is the
    global average pool."""
    g = max(1, min(grid, h.shape[1], h.shape[2]))
    if g == 1:
        return h.mean((1, 2))
    rows = np.linspace(0, h.shape[1], g + 1).round().astype(int)
    cols = np.linspace(0, h.shape[2], g + 1).round().astype(int)
    cells = [h[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean((1, 2)) for i in range(g) for j in range(g)]
    return jnp.concatenate(cells, axis=-1)


def fused_buckets(batch: int, steps: int = 16) -> tuple[int, ...]:
    """Row counts a fused segment may run on: 0 and the multiples of ``batch / steps`` rounded up.

    Evenly spaced rather than powers of two: most images usually run on past an exit, and the segments' cost is
    far from proportional to their rows (a fixed part per call), so a bucket just above the remaining count saves
    more than fine small buckets; 16 steps waste at most ``batch / 16`` rows per segment for 17 branches compiled
    per exit that decides (compile time grows with the steps)."""
    if batch < 1 or steps < 1:
        raise ValueError(f"fused buckets need batch >= 1 and steps >= 1, got batch={batch}, steps={steps}")
    return tuple(sorted({-(-k * batch // steps) for k in range(steps + 1)}))


def train_heads(net: EarlyExitNet, images: np.ndarray, labels: np.ndarray, *, epochs: int = 30,
                learning_rate: float = 0.01, batch_size: int = 256, seed: int = 0) -> list[dict]:
    """Exit heads trained on ``images`` (train split) with the backbone frozen: softmax cross-entropy, Adam."""
    feats = [np.concatenate([np.asarray(f) for f in _batched(net.features, images, batch_size, len(net.exits))[k]])
             for k in range(len(net.exits))]
    heads = []
    key = jax.random.key(seed)
    y = jnp.asarray(labels)
    classes = net.twin.head.out_features
    for k, f in enumerate(feats):
        f = jnp.asarray(f)
        params = {"w": jax.random.normal(jax.random.fold_in(key, k), (f.shape[1], classes)) / np.sqrt(f.shape[1]),
                  "b": jnp.zeros(classes)}
        opt = optax.adam(learning_rate)

        @jax.jit
        def epoch(params, state, order):
            def step(carry, idx):
                params, state = carry
                loss, grads = jax.value_and_grad(
                    lambda p: optax.softmax_cross_entropy_with_integer_labels(f[idx] @ p["w"] + p["b"], y[idx]).mean()
                )(params)
                updates, state = opt.update(grads, state)
                return (optax.apply_updates(params, updates), state), loss

            (params, state), _ = jax.lax.scan(step, (params, state), order)
            return params, state

        state = opt.init(params)
        rng = np.random.default_rng(seed + k)
        n_batches = max(1, len(labels) // batch_size)
        for _ in range(epochs):
            order = rng.permutation(len(labels))[: n_batches * batch_size].reshape(n_batches, batch_size)
            params, state = epoch(params, state, jnp.asarray(order))
        heads.append(params)
    return heads


def _batched(features, images, batch_size, n_exits):
    out = [[] for _ in range(n_exits)]
    for i in range(0, len(images), batch_size):
        for k, f in enumerate(features(images[i : i + batch_size])):
            out[k].append(f)
    return out


def policy_accuracy(
    all_logits: list[np.ndarray], labels: np.ndarray, thresholds: list[float]
) -> tuple[float, np.ndarray]:
    """Accuracy (points) and exit index per image of ``thresholds`` from precomputed logits of every exit."""
    n = len(labels)
    where = np.full(n, len(all_logits) - 1)
    undecided = np.ones(n, bool)
    for k, t in enumerate(thresholds):
        logits = all_logits[k]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        conf = probs.max(-1) / probs.sum(-1)
        leave = undecided & (conf >= t)
        where[leave] = k
        undecided &= ~leave
    preds = np.stack([a.argmax(-1) for a in all_logits])[where, np.arange(n)]
    return 100.0 * float(np.mean(preds == labels)), where


def _confidences(all_logits: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for logits in all_logits[:-1]:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(probs.max(-1) / probs.sum(-1))
    return out


def exit_rates(where: np.ndarray, n_exits: int) -> list[float]:
    """Fraction of images leaving at each of ``n_exits`` exits and at the twin's head (``where``: exit per image)."""
    return (np.bincount(where, minlength=n_exits + 1) / max(len(where), 1)).tolist()


def average_macs(where: np.ndarray, segment_macs: list[int]) -> float:
    """Mean MACs per image when image ``i`` leaves at exit ``where[i]``."""
    return float(np.mean(np.asarray(segment_macs)[where]))


def calibrate_thresholds(all_logits: list[np.ndarray], labels: np.ndarray, segment_macs: list[int], *,
                         max_drop: float, grid: int = 100, z: float = 0.0) -> list[float]:
    """Thresholds minimising the average MACs on these (validation) logits with the whole policy's accuracy drop
    <= ``max_drop`` points: the best threshold shared by every exit (of ``grid`` confidence quantiles), then each
    exit from the earliest lowered to the candidate that saves the most while the whole policy still holds.
    ``z > 0`` holds the drop's upper confidence bound instead (`jaxnas.adaptive.calibrate.drop_bound`)."""
    from jaxnas.adaptive.calibrate import drop_bound

    full_correct = all_logits[-1].argmax(-1) == labels
    confs = _confidences(all_logits)
    if not confs:
        return []
    candidates = np.unique(np.quantile(np.concatenate(confs), np.linspace(0, 1, grid + 1)))
    predictions = np.stack([a.argmax(-1) for a in all_logits])

    def cost(thresholds):
        _, where = policy_accuracy(all_logits, labels, thresholds)
        correct = predictions[where, np.arange(len(labels))] == labels
        return drop_bound(full_correct, correct, z)[1] <= max_drop + 1e-9, average_macs(where, segment_macs)

    best = [np.inf] * len(confs)
    best_macs = cost(best)[1]
    for t in candidates:
        holds, macs = cost([float(t)] * len(confs))
        if holds and macs < best_macs:
            best, best_macs = [float(t)] * len(confs), macs
    for k in range(len(confs)):
        for t in candidates:
            trial = best[:k] + [float(t)] + best[k + 1 :]
            holds, macs = cost(trial)
            if holds and macs < best_macs:
                best, best_macs = trial, macs
    return best


@dataclasses.dataclass
class ExitCalibration:
    """An early-exit network with validation-calibrated thresholds, the MACs of leaving at each exit (heads the
    thresholds use only) and what validation said of the whole policy (`fit_exits`)."""

    net: EarlyExitNet
    segment_macs: list[int]
    validation: dict


def logits_by_exit(net: EarlyExitNet, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every exit's logits of ``images`` (the last: the twin's head), ``batch_size`` images at a time."""
    parts = [net.all_logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [np.concatenate(p) for p in zip(*parts)]


def fit_exits(twin: TwinConvNet, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], *,
              epochs: int, grid: int, max_drop: float, z: float, batch_size: int = 256, seed: int = 0,
              net: GatedNet | None = None) -> ExitCalibration:
    """Exit heads after every block but the last trained on ``train`` (backbone frozen, `train_heads`), thresholds
    chosen on ``validation`` (`calibrate_thresholds`, the drop's bound ``z``) and the whole policy checked there.

    ``validation["avg_macs"]`` is what the calibrated network computes per validation image on average (the heads
    whose threshold is ``inf`` are not run; where the exits would save no MACs every threshold becomes ``inf``, so
    a network no exit helps costs exactly the twin's MACs). ``net``: a
    `GatedNet` of ``twin`` if one exists (it counts the layers' MACs)."""
    from jaxnas.adaptive.calibrate import accuracy, drop_bound

    gated = GatedNet(twin) if net is None else net
    image_shape = tuple(int(v) for v in validation[0].shape[1:])
    exit_net = EarlyExitNet(twin, exit_points(twin), [], [], grid=grid)
    exit_net.heads = train_heads(exit_net, *train, epochs=epochs, batch_size=batch_size, seed=seed)
    logits = logits_by_exit(exit_net, validation[0], batch_size)
    exit_net.thresholds = calibrate_thresholds(logits, validation[1], exit_net.segment_macs(gated, image_shape),
                                               max_drop=max_drop, z=z)
    segment_macs = exit_net.segment_macs(gated, image_shape, deployed=True)
    labels = validation[1]
    acc, where = policy_accuracy(logits, labels, exit_net.thresholds)
    if average_macs(where, segment_macs) >= gated.macs(gated.full, image_shape):  # the heads cost what exits save
        exit_net.thresholds = [np.inf] * len(exit_net.exits)
        segment_macs = exit_net.segment_macs(gated, image_shape, deployed=True)
        acc, where = policy_accuracy(logits, labels, exit_net.thresholds)
    predictions = np.stack([lg.argmax(-1) for lg in logits])[where, np.arange(len(where))]
    drop, bound = drop_bound(logits[-1].argmax(-1) == labels, predictions == labels, z)
    return ExitCalibration(exit_net, segment_macs, dict(
        accuracy_full=accuracy(logits[-1].argmax(-1), labels), accuracy=acc, accuracy_drop=drop, drop_bound=bound,
        holds=bound <= max_drop + 1e-9, head_accuracy=[accuracy(lg.argmax(-1), labels) for lg in logits[:-1]],
        avg_macs=average_macs(where, segment_macs),
        exit_rates=exit_rates(where, len(exit_net.exits)),
    ))


__all__ = ["EarlyExitNet", "ExitCalibration", "average_macs", "calibrate_thresholds", "exit_pool", "exit_points",
           "exit_rates", "fit_exits", "fused_buckets", "logits_by_exit", "policy_accuracy", "train_heads"]
