"""How a generation's new candidates get their metrics, per evaluation mode, and the final retraining.

    TableEvaluator     mode table: a tabular benchmark lookup per candidate (one query each)
    TrainEvaluator     mode train: the candidates trained together by `train_population` (from scratch, or
                       warm-started from the supernet), then scored with recalibrated BatchNorm statistics
    OneShotEvaluator   mode oneshot: the supernet is trained once (`train_supernet`), candidates are scored with
                       inherited weights and their own recalibrated statistics

``evaluate(encs [m, n_choices] int32, generation) -> list of metric dicts`` (each with a ``status``). A batch
is padded to the strategy's population size P with copies of its first row, so one compiled program serves
every generation; the copies' results are dropped. (The sized backend needs no padding: `jaxnas.population.sized`
compiles per layer size, `jaxnas.population.sized_train` per population.)

Language models (space lm, a `jaxnas.data.text.TextDataset`): inputs are a split's windows[:, :-1], targets
windows[:, 1:]; rows carry ``val_ppl`` = exp(val_loss) (the mean validation token NLL) next to ``val_loss``, and
the final retraining's winner is the lowest mean validation loss instead of the best accuracy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnas import population as pop
from jaxnas import quant
from jaxnas.population import lm_sized, sized, sized_train
from jaxnas.population.common import batched
from jaxnas.config import RunConfig
from jaxnas.data.core import Dataset
from jaxnas.distributed import from_primary, to_host, tree_to_host
from jaxnas.search import halving
from jaxnas.search import objectives as obj
from jaxnas.search.models import SearchModel, is_lm
from jaxnas.status import Status
from jaxnas.tables import QueryCounter, Table


def _padded(encs: np.ndarray, size: int) -> np.ndarray:
    if len(encs) > size:
        raise ValueError(f"{len(encs)} candidates do not fit a population of {size}")
    return np.concatenate([encs, np.repeat(encs[:1], size - len(encs), 0)]).astype(np.int32)


def _mesh_for(population: int):
    """The mesh a population of ``population`` candidates is sharded over, or None to stay on one device.

    Every device; in a single process only the first ``population`` of them when there are more (padding a
    small population such as the final top-k to every device would only repeat work). Several processes always
    use every device, so that each process holds a shard of every sharded program.
    """
    devices = jax.devices()
    if jax.process_count() == 1:
        devices = devices[:population]
    return pop.population_mesh(devices) if len(devices) > 1 else None


@functools.lru_cache(maxsize=4)
def _load_table(path: str, space) -> Table:
    """Tables are immutable: runs in one process share a loaded one (the NB201 table takes ~1.5 s to parse)."""
    return Table.load(path, space)


class TableEvaluator:
    """Tabular lookups of ``table.signal`` and ``table.report``; every architecture looked up is one query."""

    metrics = ("signal", "report")

    def __init__(self, cfg: RunConfig, space, queries: int = 0):
        self.table = _load_table(cfg.table.path, space)
        for column in (cfg.table.signal, cfg.table.report):
            if column not in self.table.columns:
                raise ValueError(
                    f"table {self.table.source} has no column {column!r} (table.signal / table.report); its columns "
                    f"are {', '.join(self.table.columns)}"
                )
        self.counter = QueryCounter(self.table, cfg.search.budget, queries=queries)
        self.signal, self.report = cfg.table.signal, cfg.table.report

    def evaluate(self, encs: np.ndarray, generation: int) -> list[dict]:
        signal = self.counter.lookup(encs, self.signal)
        report = self.table.lookup(encs, self.report)  # the same query: one row read, both columns reported
        return [{"status": Status.OK, "signal": float(s), "report": float(r)} for s, r in zip(signal, report)]


@dataclasses.dataclass
class _Data:
    train_x: jax.Array
    train_y: jax.Array
    val_x: jax.Array
    val_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    bn_batches: jax.Array  # [n, B, H, W, C] training batches for BatchNorm recalibration


def split_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a split: (images, labels) of an image `Split`, (windows[:, :-1], windows[:, 1:]) of a
    `jaxnas.data.text.TextSplit` (token ids [N, seq_len] and their next tokens)."""
    if hasattr(split, "windows"):
        return np.ascontiguousarray(split.inputs), np.ascontiguousarray(split.targets)
    return split.images, split.labels


def _device_data(dataset: Dataset, n_bn: int, batch: int, seed: int) -> _Data:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        split_arrays(s) for s in (dataset.train, dataset.validation, dataset.test))
    n = len(train_y)
    rows = np.random.default_rng(seed).permutation(n)[: n_bn * batch]
    if len(rows) < n_bn * batch:
        rows = np.resize(rows, n_bn * batch)
    return _Data(
        jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(val_x), jnp.asarray(val_y),
        jnp.asarray(test_x), jnp.asarray(test_y),
        jnp.asarray(train_x[rows].reshape(n_bn, batch, *train_x.shape[1:])),
    )


class _Trained:
    """What the train and oneshot evaluators share: the data on device and scoring with recalibrated statistics."""

    metrics = ("val_accuracy", "val_loss")

    def __init__(self, cfg: RunConfig, model: SearchModel, dataset: Dataset):
        self.cfg, self.model, self.dataset = cfg, model, dataset
        self.lm = is_lm(model)
        self.population = cfg.search.population
        self.data = _device_data(dataset, cfg.supernet.bn_batches, cfg.supernet.batch_size, cfg.seed)
        self.optimizer = optax.adam(cfg.train.learning_rate)
        self.sized = _sized_scoring(cfg.population.backend, model)  # each candidate at its own sizes where it applies
        self.exits = obj.needs_exits(cfg)  # avg_macs: early exits fitted to every scored candidate

    def score(self, params, encs, x, y, *, shared: bool) -> dict[str, np.ndarray]:
        """{"accuracy", "loss"} [P] of candidates with their own recalibrated BatchNorm statistics.

        With several devices (local, or global in a multi-process run) the candidates are sharded across them.
        """
        population = len(encs)
        mesh = _mesh_for(population)
        if self.sized and mesh is None:  # on one CPU device: each candidate at its own sizes
            return self._score_sized(params, encs, x, y, shared=shared)
        encs = jnp.asarray(encs, jnp.int32)
        if mesh is not None:
            if shared:
                (encs, _), params = pop.shard_population(encs, mesh), pop.replicate(params, mesh)
            else:
                (encs, params), _ = pop.shard_population((encs, params), mesh)
        out = self._score(params, encs, x, y, shared=shared)
        return {k: v[:population] for k, v in out.items()}

    def _score_sized(self, params, encs, x, y, *, shared: bool) -> dict[str, np.ndarray]:
        """`_score` through `jaxnas.population.sized` (the same scores to float tolerance; no masks, no padded
        FLOPs)."""
        return sized.evaluate_sized(
            self.model, params, np.asarray(encs), x, y, bn_batches=self.data.bn_batches, batch_size=SIZED_BATCH,
            shared=shared,
        )

    def _score(self, params, encs, x, y, *, shared: bool) -> dict[str, np.ndarray]:
        stats = self.model.statistics(params, encs, self.data.bn_batches, shared=shared)
        params_P = pop.tile_population(params, len(encs)) if shared else params
        out = pop.evaluate_population(self.model.apply_eval, {"params": params_P, "bn_stats": stats}, encs, x, y)
        return {k: to_host(v) for k, v in out.items()}

    def train_candidates(self, encs: np.ndarray, epochs: int, patience, seed: int, start=None):
        """Train the rows of ``encs`` [P, n] together; returns (PopulationResult, validation scores).

        With several devices (local, or global in a multi-process run) the population axis is sharded across
        them (`_mesh_for`; padded to a multiple of the device count, the padding dropped from the results).
        """
        P = len(encs)
        if start is None:
            params_P = pop.init_population(self.model.init, jax.random.key(seed), P)
        else:
            params_P = pop.tile_population(start, P)
        keys = pop.candidate_keys(jax.random.key(seed), P)
        encs_j = jnp.asarray(encs, jnp.int32)
        mesh = _mesh_for(P)
        if mesh is not None:
            (encs_j, params_P, keys), _ = pop.shard_population((encs_j, params_P, keys), mesh)
        d = self.data
        trained_sized = _sized_training(self.cfg.population.backend, self.model, mesh)
        if trained_sized and self.lm:
            result = lm_sized.train_lm_sized(
                self.model, params_P, encs_j, self.optimizer, d.train_x, d.train_y, d.val_x, d.val_y,
                epochs=epochs, batch_size=self.cfg.train.batch_size, seed=seed, patience=patience, keys=keys,
            )
        elif trained_sized:
            result = sized_train.train_population_sized(
                self.model, params_P, encs_j, self.optimizer, d.train_x, d.train_y, d.val_x, d.val_y,
                epochs=epochs, batch_size=self.cfg.train.batch_size, seed=seed, patience=patience, keys=keys,
                shift=self.cfg.train.augment_shift,
            )
        else:
            result = pop.train_population(
                self.model.apply, params_P, encs_j, self.optimizer, d.train_x, d.train_y, d.val_x, d.val_y,
                epochs=epochs, batch_size=self.cfg.train.batch_size, seed=seed, patience=patience, keys=keys,
                shift=self.cfg.train.augment_shift, monitor="loss" if self.lm else "accuracy",
            )
        score = self._score_sized if trained_sized and self.sized else self._score
        scores = {k: v[:P] for k, v in score(result.params, encs_j, d.val_x, d.val_y, shared=False).items()}
        if len(encs_j) != P:
            result = dataclasses.replace(
                result,
                params=jax.tree.map(lambda a: a[:P], result.params),
                opt_state=jax.tree.map(lambda a: a[:P], result.opt_state),
                status=result.status[:P], best_epoch=result.best_epoch[:P], best_accuracy=result.best_accuracy[:P],
                history=result.history[:, :P], train_loss=result.train_loss[:, :P],
            )
        return result, scores

    def _rows(self, result_status, scores, m: int) -> list[dict]:
        rows = []
        for i in range(m):
            status = str(result_status[i]) if result_status is not None else Status.OK
            acc, loss = float(scores["accuracy"][i]), float(scores["loss"][i])
            if status == pop.STATUS_FAILED or not np.isfinite(loss):
                status, acc, loss = pop.STATUS_FAILED, float("nan"), float("nan")
            rows.append({"status": status, "val_accuracy": acc, "val_loss": loss})
            if self.lm:
                rows[-1]["val_ppl"] = perplexity(loss)
        return rows

    def add_avg_macs(self, rows: list[dict], params, encs: np.ndarray, *, shared: bool) -> list[dict]:
        """``rows`` with ``avg_macs`` (`objectives.exit_avg_macs`) for candidates ``encs`` when the run names it:
        each scored candidate's twin (its weights - ``params`` per candidate, or the ``shared`` supernet's - and
        recalibrated statistics) gets exits trained on objectives.exit_train_images training images (a seeded
        draw) and calibrated on validation; failed candidates get nan."""
        if not self.exits:
            return rows
        train_xy, validation = self.exit_data()
        for i, row in enumerate(rows):
            if not np.isfinite(row.get("val_loss", np.nan)):
                row["avg_macs"] = float("nan")
                continue
            p = params if shared else tree_to_host(jax.tree.map(lambda a: a[i], params))
            enc = np.asarray(encs[i])
            stats = self.model.statistics(p, jnp.asarray(enc[None], jnp.int32), self.data.bn_batches, shared=True)
            stats = None if stats is None else jax.tree.map(lambda a: a[0], stats)
            _, twin = self.model.extract(p, enc, stats)
            # process 0's value everywhere: every process must tell the strategy the same numbers
            row["avg_macs"] = from_primary(obj.exit_avg_macs(self.model, twin, enc, train_xy, validation, self.cfg))
        return rows

    def exit_data(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(train, validation) images and labels of exit fitting: objectives.exit_train_images of the train split
        (a draw seeded by the run's seed) and the whole validation split."""
        train = self.dataset.train
        draw = np.random.default_rng(self.cfg.seed).permutation(len(train.labels))[: self.cfg.objectives.exit_train_images]
        return (train.images[draw], train.labels[draw]), (self.dataset.validation.images, self.dataset.validation.labels)

    def signal(self, row: dict) -> float:
        """What ranks trained candidates (maximised): validation accuracy, or -validation loss for a language
        model."""
        return -row["val_loss"] if self.lm else row["val_accuracy"]

    def final(self, encs: np.ndarray, seeds: int = 1, contenders: int | None = None) -> dict:
        """Retrain ``encs`` [k, n] from scratch ``seeds`` times (train split, early stopping on validation), score
        validation and test with recalibrated statistics, and return everything plus the winner.

        The winner is the row among the first ``contenders`` (default: all) with the best mean validation
        accuracy over the seeds; the rows after them (baselines, control samples) are trained and reported
        alike but never win. Per-seed lists are [seeds][k]; ``params`` / ``bn_stats`` are the winner's from
        the first seed (what gets exported; its test accuracy is ``test_accuracy[0][winner]``).
        """
        cfg = self.cfg.final
        contenders = len(encs) if contenders is None else contenders
        if not 1 <= contenders <= len(encs) or seeds < 1:
            raise ValueError(f"final: need 1 <= contenders <= {len(encs)} and seeds >= 1, got {contenders}, {seeds}")
        d = self.data
        out = {"status": [], "epochs_run": [], "val_accuracy": [], "val_loss": [], "test_accuracy": [], "test_loss": []}
        first = None
        for s in range(seeds):
            result, val = self.train_candidates(encs, cfg.epochs, cfg.patience, self.cfg.seed + 7919 + 1_000_003 * s)
            test = self.score(result.params, encs, d.test_x, d.test_y, shared=False)
            failed = result.status == pop.STATUS_FAILED
            out["status"].append([str(x) for x in result.status])
            out["epochs_run"].append([int(result.history.shape[0])] * len(encs))
            out["val_accuracy"].append(np.where(failed, np.nan, val["accuracy"]).tolist())
            out["val_loss"].append(np.where(failed, np.nan, val["loss"]).tolist())
            out["test_accuracy"].append(np.where(failed, np.nan, test["accuracy"]).tolist())
            out["test_loss"].append(np.where(failed, np.nan, test["loss"]).tolist())
            if first is None:
                first = result.params
            del result
        ranked = -np.asarray(out["val_loss"], float) if self.lm else np.asarray(out["val_accuracy"], float)
        val_mean = np.nanmean(ranked[:, :contenders], axis=0)
        winner = int(np.argmax(np.where(np.isfinite(val_mean), val_mean, -np.inf)))
        params = tree_to_host(jax.tree.map(lambda a: a[winner], first))  # every process holds the winner
        stats = self.model.statistics(params, jnp.asarray(encs[winner : winner + 1]), d.bn_batches, shared=True)
        stats = None if stats is None else jax.tree.map(lambda a: a[0], stats)
        return {**out, "winner": winner, "params": params, "bn_stats": stats}


class TrainEvaluator(_Trained):
    """Mode train: each generation's new candidates trained together (fast mode in early generations)."""

    def __init__(self, cfg: RunConfig, model: SearchModel, dataset: Dataset, supernet_params=None):
        super().__init__(cfg, model, dataset)
        self.start = supernet_params if cfg.train.warm_start else None

    def evaluate(self, encs: np.ndarray, generation: int) -> list[dict]:
        t = self.cfg.train
        epochs = t.fast_epochs if generation < t.fast_generations else t.epochs
        # Padding keeps one masked program for every generation; sized training compiles per population anyway,
        # so it trains only the real candidates (each one's keys and results are the same either way).
        seed = self.cfg.seed * 100_003 + generation
        if t.fidelity != "full" and generation >= t.fast_generations:
            def train(indices, rung_epochs):
                rows = self._train_rows(encs[list(indices)], rung_epochs, seed)
                return [(self.signal(r), {**r, "epochs": rung_epochs}) for r in rows]

            schedule = halving.hyperband if t.fidelity == "hyperband" else halving.successive_halving
            done = schedule(len(encs), train, max_epochs=epochs, eta=t.eta, min_epochs=t.min_epochs)
            return list(done.rows)
        return [{**r, "epochs": epochs} for r in self._train_rows(encs, epochs, seed)]

    def _train_rows(self, encs: np.ndarray, epochs: int, seed: int) -> list[dict]:
        per_size = _sized_training(self.cfg.population.backend, self.model, _mesh_for(len(encs)))
        batch = np.asarray(encs, np.int32) if per_size else _padded(encs, self.population)
        result, scores = self.train_candidates(batch, epochs, self.cfg.train.patience, seed, self.start)
        return self.add_avg_macs(self._rows(result.status, scores, len(encs)), result.params, encs, shared=False)


class OneShotEvaluator(_Trained):
    """Mode oneshot: inherited supernet weights, per-candidate recalibrated BatchNorm statistics."""

    def __init__(self, cfg: RunConfig, model: SearchModel, dataset: Dataset, supernet_params):
        super().__init__(cfg, model, dataset)
        self.params = supernet_params

    def evaluate(self, encs: np.ndarray, generation: int) -> list[dict]:
        if self.sized:  # every candidate at its own sizes; no padding to P needed (nothing is recompiled)
            scores = self._score_sized(self.params, encs, self.data.val_x, self.data.val_y, shared=True)
        else:
            scores = self.score(self.params, _padded(encs, self.population), self.data.val_x, self.data.val_y,
                                shared=True)
        return self.add_avg_macs(self._rows(None, scores, len(encs)), self.params, encs, shared=True)


def perplexity(loss: float) -> float:
    """exp of a mean token NLL (nan stays nan; inf past float's range)."""
    return float(np.exp(np.float64(loss))) if np.isfinite(loss) else float("nan")


def twin_lm_loss(twin, x, y, batch_size: int = 64) -> float:
    """Mean token NLL of a language-model twin (`TwinLM`) on token windows x [N, T] with next tokens y [N, T]."""
    (xb, weight), (yb, _) = batched(jnp.asarray(x), batch_size), batched(jnp.asarray(y, jnp.int32), batch_size)
    return float(lm_sized.twin_nll_sum(twin, xb, yb, weight)) / int(x.shape[0])


def lm_quantised(model, enc, params, precision: str, x, y) -> dict:
    """The twin of ``enc`` (from candidate ``params``) with its weights stored at ``precision`` (`jaxnas.quant`),
    measured: {"precision", "size_bytes", "fp32_size_bytes", "test_ppl" (dequantised weights), "fp32_test_ppl"
    (the twin as it is), "params": the `quant.QuantizedParams`} on windows x, y."""
    _, twin = model.extract(params, enc)
    twin.eval()
    state = nnx.state(twin, nnx.Param)
    weights = state.to_pure_dict()
    stored = quant.quantize(weights, precision)
    fp32_loss = twin_lm_loss(twin, x, y)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, quant.dequantize(stored)))
    nnx.update(twin, state)
    return {
        "precision": precision, "size_bytes": quant.size_bytes(stored), "fp32_size_bytes": quant.size_bytes(weights),
        "test_ppl": perplexity(twin_lm_loss(twin, x, y)), "fp32_test_ppl": perplexity(fp32_loss), "params": stored,
    }


SIZED_BATCH = 500  # validation examples per batch of sized scoring (activations of one tree path stay small)


def _sized_training(backend: str, model, mesh) -> bool:
    """Whether candidates train through `jaxnas.population.sized_train` (language models: `lm_sized`) (see
    ``population.backend``)."""
    if is_lm(model):
        alone = lm_sized.supports(model) and mesh is None and jax.process_count() == 1
        return alone and (backend == "sized" or (backend == "auto" and jax.default_backend() == "cpu"))
    if backend == "auto":
        macro = isinstance(model, SearchModel) and sized_train.supports(model)
        return macro and jax.default_backend() == "cpu" and jax.process_count() == 1 and mesh is None
    return backend == "sized"


def _sized_scoring(backend: str, model) -> bool:
    """Whether candidates are scored through `jaxnas.population.sized` (see ``population.backend``); language
    models are scored by the masked program (a forward pass only)."""
    if is_lm(model):
        return False
    if backend == "auto":
        return sized.supports(model) and jax.default_backend() == "cpu" and jax.process_count() == 1
    return backend == "sized"


def train_supernet(cfg: RunConfig, model: SearchModel, dataset: Dataset):
    """The shared supernet weights after ``supernet.epochs`` of weight-sharing training; (params, mean loss per epoch)."""
    s = cfg.supernet
    sampler = pop.SubnetSampler(
        model.space, s.subnets, s.sampler,
        Ends(model, "largest") if s.sampler == "sandwich" else None,
        Ends(model, "smallest") if s.sampler == "sandwich" else None,
    )
    params = model.init(jax.random.key(cfg.seed))
    train_x, train_y = split_arrays(dataset.train)
    params, _, losses = pop.train_supernet(
        model.apply, params, optax.adam(supernet_schedule(s, len(train_y))), sampler,
        jnp.asarray(train_x), jnp.asarray(train_y),
        epochs=s.epochs, batch_size=s.batch_size, seed=cfg.seed, distill=s.distill, shift=s.augment_shift,
    )
    return params, losses.mean(axis=(1, 2)).tolist()


def supernet_schedule(s, n_train: int):
    """The supernet's learning rate: a float (constant) or an optax schedule over its steps (see SupernetConfig)."""
    if s.schedule == "constant":
        return s.learning_rate
    steps_per_epoch = n_train // s.batch_size
    total = max(1, s.epochs * steps_per_epoch)
    warmup = min(int(round(s.warmup_epochs * steps_per_epoch)), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, warmup, total, end_value=0.0)


@dataclasses.dataclass(frozen=True)
class Ends:
    """The sandwich rule's largest / smallest map over every family of the model (each family's own map)."""

    model: SearchModel
    end: str

    def __call__(self, encs: jax.Array) -> jax.Array:
        single = getattr(self.model, "supernet", None)
        parts = [single] if single is not None else [p for p in (self.model.mlp, self.model.conv) if p is not None]
        out = getattr(parts[0], self.end)(encs)
        if len(parts) == 2:
            family = encs[:, self.model.space.index("family")]
            mlp_index = self.model.space["family"].options.index("mlp")
            out = jnp.where((family == mlp_index)[:, None], out, getattr(parts[1], self.end)(encs))
        return out
