"""The search run: ask a generation, filter by cheap objectives, evaluate what is new, tell, checkpoint.

    for generation g = 0, 1, ...:                                 (until search.budget distinct evaluations)
        encs [P, n]  = strategy.ask(fold_in(key(seed), g + 1), state)
        repeats      -> the cached metrics (counted as cache hits, never evaluated twice)
        cheap        -> params / MACs / size (analytic), then latency on the twin if asked for; a violated
                        constraint marks the row infeasible: it is not trained and is told -inf
        new rows     -> the mode's evaluator (table lookup, population training, or the oneshot supernet)
        state        = strategy.tell(state, encs, fitness)        (nsga2: all objectives and the violation)
        checkpoint g + 1 (Orbax), then history.csv / generations.csv rewritten from the archive

Every random choice derives from ``seed`` and the generation number, so a run resumed from its last checkpoint
ends exactly as the same run left alone. Afterwards (modes oneshot, train) the top-k architectures are retrained
from scratch and scored on the test split, the best by validation accuracy is exported, and the report is written.

Language models (space.name=lm on text data) run the same loop: the data is a `jaxnas.data.text.TextDataset`,
the metrics are `objectives.metric_names("lm")` (val_ppl, macs_per_token, ...), the final winner is the lowest mean
validation perplexity, and best.json's final record holds the test perplexity and the winner's perplexity with
its weights quantised to objectives.quant (measured on the dequantised twin).

Mode differentiable runs epochs instead of generations (`jaxnas.search.differentiable`): one history row, one
checkpoint (weights, architecture parameters, optimiser states, key) per epoch; its answer, the cell derived at
the end, is retrained, tested and exported the same way.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from interop._atomic import atomic_write_text
from interop.config import dump_config, read_yaml, to_dict
from interop.jsonsafe import json_safe
from jaxnas import distributed
from jaxnas.compiled import release_if_crowded
from jaxnas import population as pop
from jaxnas.config import RunConfig
from jaxnas.status import EVALUATED, REUSED, TOLD_WORST, Status
from jaxnas.data import load_dataset, load_text
from jaxnas.search import objectives as obj
from jaxnas.search.checkpoint import RunCheckpoints, load_arrays, save_arrays
from jaxnas.search import differentiable, fidelity, proxies
from jaxnas.search.archive import Archive
from jaxnas.search.evaluate import (
    Ends,
    OneShotEvaluator,
    TableEvaluator,
    TrainEvaluator,
    lm_quantised,
    perplexity,
    train_supernet,
)
from jaxnas.search.export import export_model
from jaxnas.search.models import build_space, model_for
from jaxnas.search.pareto import default_reference, hypervolume, knee_point, pareto_mask
from jaxnas.search.report import write_report
from jaxnas.search.runfolder import (
    RESUMABLE_KEYS,
    RunError,
    RunLock,
    check_output,
    clean_stale_temporaries,
    config_changes,
    held_interrupt,
)
from jaxnas.search.strategies import build_strategy
from jaxnas.strategies import option_entropy

GENERATION_COLUMNS = ["generation", "evaluations", "cache_hits", "best_fitness", "mean_fitness", "diversity",
                      "hypervolume", "front_size"]


def _signed(value: float, direction: str) -> float:
    return value if direction == "max" else -value


class SearchRun:
    """One run folder's search; `run` executes it (fresh or resumed) and returns the summary dict."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, log=print):
        self.cfg, self.resume, self.log = cfg, resume, log
        self.out = Path(cfg.output)
        self.space = build_space(cfg.space)
        self.lm = cfg.space.name == "lm"
        self.trained_names, self.cheap_names, self.measured_names = obj.metric_names(cfg.space.name)
        allowed = obj.TABLE if cfg.mode == "table" else (*self.trained_names, *self.cheap_names, *self.measured_names,
                                                         *(() if self.lm else (obj.EXITS,)))
        self.objectives = obj.parse_objectives(cfg.objectives.objectives, allowed)
        self.constraints = tuple(obj.parse_constraint(c, allowed) for c in cfg.objectives.constraints)
        self.latency_name = self.measured_names[0]  # latency_ms, or latency_ms_per_token for a language model
        self.needs_latency = any(m == self.latency_name for m in [o.name for o in self.objectives] + [
            c.metric for c in self.constraints])
        self.by_gradient = cfg.mode == "differentiable"  # epochs of a differentiable search, not generations
        self.strategy = None if self.by_gradient else build_strategy(cfg, self.space, len(self.objectives))
        self.multi = cfg.search.strategy == "nsga2"
        self._proxy_inputs = None

    # ------------------------------------------------------------------ set-up
    def _check_folder(self) -> None:
        check_output(self.out, self.resume)
        if self.resume:
            saved = read_yaml(self.out / "config.yaml")
            changed = config_changes(saved, to_dict(self.cfg))
            if changed:
                raise RunError(
                    f"--resume {self.out}: the config differs from the run's own config.yaml ({'; '.join(changed)}); "
                    "resume with exactly that config (python -m jaxnas.search --resume <folder> reads it) or start a "
                    "new output="
                )

    def _prepare(self) -> None:
        """Load and check everything the run needs (data or table, model, memory) before anything is written."""
        cfg = self.cfg
        if cfg.mode == "table":
            self.model, self.dataset = None, None
            self._table = TableEvaluator(cfg, self.space, 0)
            return
        if self.lm:
            self.dataset = load_text(cfg.data.text_config())
            info = self.dataset.info
            self.model = model_for(self.space, cfg.space, (info.seq_len,), info.vocab_size)
        else:
            self.dataset = load_dataset(cfg.data)
            info = self.dataset.info
            self.model = model_for(self.space, cfg.space, info.image_shape, info.num_classes)
        largest = fidelity.largest_architecture(self.space, Ends(self.model, "largest"))
        params = self.model.param_count(largest)
        need = cfg.search.population * params * 16  # weights, gradients and Adam's two moments, float32
        have = _physical_memory()
        if have and need > 0.8 * have:
            most = max(1, int(0.8 * have // (params * 16)))
            raise RunError(
                f"search.population={cfg.search.population} would need about {need / 2**30:.1f} GiB for the "
                f"population's weights and optimiser state ({cfg.search.population} x {params:,} parameters of the "
                f"largest network x 16 bytes) on a machine with {have / 2**30:.1f} GiB; use search.population <= {most}"
            )

    def _setup_evaluator(self):
        cfg = self.cfg
        if cfg.mode == "table":
            return self._table
        supernet = None
        if cfg.mode == "oneshot" or cfg.train.warm_start:
            supernet = self._supernet()
        if cfg.mode == "oneshot":
            return OneShotEvaluator(cfg, self.model, self.dataset, supernet)
        return TrainEvaluator(cfg, self.model, self.dataset, supernet)

    def _supernet(self):
        folder = self.out / "supernet"
        like = self.model.init(jax.random.key(self.cfg.seed))
        saved = (folder / "params").exists() and (folder / "losses.json").is_file()
        distributed.barrier("jaxnas-supernet-checked")  # every process decided before any writes
        if saved:
            self.log(f"supernet: loaded from {folder}")
            return load_arrays(folder / "params", like)
        start = time.perf_counter()
        params, losses = train_supernet(self.cfg, self.model, self.dataset)
        save_arrays(folder / "params", params)  # every process takes part (Orbax's multi-host rules)
        _write(folder / "losses.json", json.dumps({"mean_loss_per_epoch": losses}) + "\n")
        self.log(f"supernet: {self.cfg.supernet.epochs} epochs in {time.perf_counter() - start:.1f} s, "
                 f"mean loss per epoch {', '.join(f'{v:.3f}' for v in losses)}")
        return params

    # ------------------------------------------------------------------ one generation
    def _fitness(self, row: dict) -> float:
        """Single-objective fitness (maximised): -inf infeasible, nan failed."""
        if row["status"] in TOLD_WORST:
            return -math.inf
        if row["status"] not in EVALUATED:
            return math.nan
        first = self.objectives[0]
        return _signed(row.get(first.name, math.nan), first.direction)

    def _cheap(self, enc) -> dict:
        if self.model is None:
            return {}
        metrics = obj.cheap_metrics(self.model, enc, self.cfg.objectives.quant)
        if self.needs_latency and obj.total_violation(metrics, self.constraints, self.cheap_names) == 0:
            params = self._latency_params
            if self.lm:
                _, twin = self.model.extract(params, enc)
                latency = obj.decode_latency_ms(twin, self.cfg.objectives.latency_batch, self.model.seq_len,
                                                self.cfg.objectives.latency_repeats)
                metrics[self.latency_name] = distributed.from_primary(latency)
                return metrics
            stats = self.model.statistics(params, enc[None], self._latency_batches, shared=True)
            stats = None if stats is None else jax.tree.map(lambda a: a[0], stats)
            _, twin = self.model.extract(params, enc, stats)
            example = np.zeros((self.cfg.objectives.latency_batch, *self.model.image_shape), np.float32)
            latency = obj.twin_latency_ms(twin, example, self.cfg.objectives.latency_repeats)
            metrics["latency_ms"] = distributed.from_primary(latency)  # one measurement decides in every process
        return metrics

    def _generation(self, g: int, state, archive: Archive, cache: dict, evaluator):
        cfg = self.cfg
        encs, state = self._ask(jax.random.fold_in(self.key, g + 1), state)
        encs = np.asarray(encs)
        remaining = cfg.search.budget - archive.evaluations
        rows: list[dict | None] = [None] * len(encs)
        fresh: list[int] = []
        seen_now: dict[str, int] = {}
        for i, enc in enumerate(encs):
            arch = self.space.to_string(enc)
            if arch in cache or arch in seen_now:
                archive.cache_hits += 1
                rows[i] = {"arch": arch, "cached_from": cache.get(arch, {}).get("generation", g)}
                continue
            metrics = self._cheap(enc)
            if obj.total_violation(metrics, self.constraints, (*self.cheap_names, *self.measured_names)) > 0:
                rows[i] = {"arch": arch, "status": Status.INFEASIBLE, **metrics}
            else:
                rows[i] = {"arch": arch, **metrics}
                fresh.append(i)
            seen_now[arch] = i
        new = self._prefilter(encs, fresh, rows, archive)[:remaining]
        for i in fresh:
            if "status" not in rows[i] and i not in new:
                rows[i]["status"] = Status.NOT_EVALUATED  # over budget: the run ends after this one
        if new:
            for i, result in zip(new, evaluator.evaluate(encs[new], g), strict=True):
                rows[i].update(result)
                archive.evaluations += 1
        repeats = [i for i, row in enumerate(rows) if "status" not in row]
        for i, row in enumerate(rows):
            if i in repeats:
                continue
            if row["status"] in EVALUATED and obj.total_violation(row, self.constraints) > 0:
                row["status"] = Status.INFEASIBLE  # a constraint on a trained metric (e.g. val_accuracy>=0.9)
            archive.infeasible += row["status"] == Status.INFEASIBLE
            row["fitness"] = self._fitness(row)
            row.update(generation=g, index=i)
        for i in repeats:  # a repeat is told its source's fitness (within this generation: its first occurrence)
            source = cache.get(rows[i]["arch"]) or rows[seen_now[rows[i]["arch"]]]
            rows[i] = {**source, "status": Status.CACHED, "cached_from": rows[i]["cached_from"], "generation": g, "index": i}
        state = self._tell(state, encs, rows)
        for row in rows:
            if row["status"] in REUSED:
                cache.setdefault(row["arch"], row)
            if row["status"] != Status.NOT_EVALUATED:
                archive.candidates.append(row)
        stats = self._generation_stats(g, encs, rows, archive)
        # The strategy's own diagnostics (e.g. a surrogate's Spearman on this batch), as strategy_<name> columns.
        stats.update({f"strategy_{k}": float(v) for k, v in jax.device_get(self.strategy.metrics(state)).items()})
        archive.generations.append(stats)
        archive.generation = g + 1
        return state

    def _prefilter(self, encs, fresh: list[int], rows: list[dict], archive: Archive) -> list[int]:
        """search.prefilter: of the new candidates ``fresh`` (indices into ``encs``), those the zero-cost proxy ranks
        in the best prefilter_keep (ties: first asked); the rest are marked filtered. Every one gets the proxy's
        value as a column."""
        name = self.cfg.search.prefilter
        if name == "none" or not fresh:
            return fresh
        params, x, y = self._proxy_batch()
        values = np.asarray(proxies.score_model(name, self.model, params, encs[fresh], x, y), float)
        keep = math.ceil(self.cfg.search.prefilter_keep * len(fresh))
        order = sorted(range(len(fresh)), key=lambda j: (not np.isfinite(values[j]), -np.nan_to_num(values[j]), j))
        kept = set(order[:keep])
        for j, i in enumerate(fresh):
            rows[i][name] = float(values[j])
            if j not in kept:
                rows[i]["status"] = Status.FILTERED
                archive.filtered += 1
        return [i for j, i in enumerate(fresh) if j in kept]

    def _proxy_batch(self):
        """(the untrained network of the run's seed, one seeded training batch x, y): what zero-cost proxies see,
        built once per run (the pre-filter and the ranking report share it)."""
        if self._proxy_inputs is None:
            train = self.dataset.train
            batch = np.random.default_rng(self.cfg.seed).permutation(len(train.labels))[: proxies.BATCH]
            self._proxy_inputs = (self.model.init(jax.random.key(self.cfg.seed)), train.images[batch],
                                  train.labels[batch])
        return self._proxy_inputs

    def _tell(self, state, encs, rows):
        if not self.multi:
            fitness = jnp.asarray([r["fitness"] for r in rows], jnp.float32)
            return self._tell_jit(state, jnp.asarray(encs), fitness)
        values, violation = [], []
        for r in rows:
            ok = r["status"] in (*EVALUATED, Status.CACHED)
            values.append([_signed(r.get(o.name, math.nan), o.direction) if ok else math.nan for o in self.objectives])
            v = obj.total_violation(r, self.constraints)
            violation.append(v if r["status"] not in TOLD_WORST else max(v, 1.0))
        return self._tell_jit(state, jnp.asarray(encs), jnp.asarray(values, jnp.float32),
                              violation=jnp.asarray(np.minimum(violation, 1e30), jnp.float32))

    def _feasible_values(self, archive: Archive) -> tuple[list[dict], np.ndarray]:
        rows = [r for r in archive.candidates if r["status"] in EVALUATED]
        values = np.asarray([[r.get(o.name, math.nan) for o in self.objectives] for r in rows], float)
        return rows, values.reshape(len(rows), len(self.objectives))

    def _generation_stats(self, g: int, encs, rows, archive: Archive) -> dict:
        """One line of generations.csv; ``archive`` already holds this generation's rows."""
        evaluated = [r["fitness"] for r in rows if r["status"] in EVALUATED and math.isfinite(r["fitness"])]
        best = [r["fitness"] for r in archive.candidates if r["status"] in EVALUATED and math.isfinite(r["fitness"])]
        stats = {
            "generation": g,
            "evaluations": archive.evaluations,
            "cache_hits": archive.cache_hits,
            "best_fitness": max(best) if best else math.nan,
            "mean_fitness": float(np.mean(evaluated)) if evaluated else math.nan,
            "diversity": float(_diversity(self.space, jnp.asarray(encs))),
            "hypervolume": math.nan,
            "front_size": 0,
        }
        _, values = self._feasible_values(archive)
        values = values[np.all(np.isfinite(values), axis=1)]
        if len(values):
            stats["front_size"] = int(pareto_mask(values, self.objectives).sum())
            if len(self.objectives) >= 2:
                if archive.reference is None:
                    archive.reference = default_reference(values, self.objectives).tolist()
                stats["hypervolume"] = hypervolume(values, self.objectives, np.asarray(archive.reference))
        return stats

    # ------------------------------------------------------------------ outputs
    def _columns(self) -> list[str]:
        if self.cfg.mode == "table":
            metrics = ["signal", "report"]
        elif self.by_gradient:
            metrics = [*differentiable.columns(self.cfg.search.strategy, self.space.name == "nb201"), *obj.IMAGE_CHEAP]
        else:
            metrics = [*self.trained_names, *self.cheap_names]
        if self.cfg.mode == "train":
            metrics.append("epochs")  # the fidelity a candidate was scored at (fast mode, successive halving)
        if self.needs_latency:
            metrics.append(self.latency_name)
        if obj.needs_exits(self.cfg):
            metrics.append(obj.EXITS)
        if self.cfg.search.prefilter != "none":
            metrics.append(self.cfg.search.prefilter)  # the zero-cost proxy's value (pre-filter)
        return ["generation", "index", "arch", "status", "fitness", *metrics, "cached_from"]

    def _write_tables(self, archive: Archive) -> None:
        _write_csv(self.out / "history.csv", self._columns(), archive.candidates)
        extra = list(dict.fromkeys(k for row in archive.generations for k in row if k.startswith("strategy_")))
        _write_csv(self.out / "generations.csv", GENERATION_COLUMNS + extra, archive.generations)

    def _pareto(self, archive: Archive) -> dict:
        rows, values = self._feasible_values(archive)
        finite = np.all(np.isfinite(values), axis=1)
        rows = [r for r, f in zip(rows, finite) if f]
        values = values[finite]
        mask = pareto_mask(values, self.objectives) if len(rows) else np.zeros(0, bool)
        front = [
            {"arch": r["arch"], "generation": r["generation"], "values": {o.name: r[o.name] for o in self.objectives}}
            for r, m in zip(rows, mask) if m
        ]
        result = {
            "objectives": [{"name": o.name, "direction": o.direction} for o in self.objectives],
            "reference": archive.reference,
            "hypervolume": archive.generations[-1]["hypervolume"] if archive.generations else math.nan,
            "front": front,
        }
        if len(front) >= 1 and len(self.objectives) >= 2:
            front_values = values[mask]
            result["knee"] = front[knee_point(front_values, self.objectives)]["arch"]
        return result

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        self._check_folder()
        self._prepare()  # data / table / model / memory checked: nothing is written for a run that cannot start
        distributed.barrier("jaxnas-folder-checked")  # before process 0 writes into it
        if not distributed.is_primary():
            return self._run()
        with RunLock(self.out):
            if self.resume:
                for path in clean_stale_temporaries(self.out):
                    self.log(f"removed {path.relative_to(self.out)}, left by an interrupted write")
            dump_config(self.cfg, self.out / "config.yaml")
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        self.key = jax.random.key(cfg.seed)
        evaluator = self.evaluator = self._setup_evaluator()
        if self.by_gradient:
            data = evaluator.data  # the final retraining's splits on the device serve the search too
            supernet = self.model.conv if self.space.name == "macro" else self.model.supernet
            self._search = differentiable.DifferentiableSearch(cfg, supernet, (data.train_x, data.train_y),
                                                               (data.val_x, data.val_y))
            state = self._search.init(jax.random.fold_in(self.key, 0))
        else:
            self._ask, self._tell_jit = _compiled(self.strategy)
            state = self.strategy.init(jax.random.fold_in(self.key, 0))
        fingerprint = json.loads(json.dumps(json_safe(to_dict(cfg))))
        archive = Archive(config=fingerprint)
        checkpoints = RunCheckpoints(self.out)
        if self.resume:
            restored = checkpoints.restore_latest(state)
            if restored is not None:
                _, state, stored = restored
                archive = Archive.from_dict(stored)
                changed = config_changes(archive.config or fingerprint, fingerprint)
                if changed:
                    raise RunError(f"--resume {self.out}: config.yaml was changed since the run started "
                                   f"({'; '.join(changed)}); only {', '.join(RESUMABLE_KEYS)} may change on resume. "
                                   "Restore those values, or start a new output= with the new config")
                archive.config = fingerprint
                done = "" if self.by_gradient else f" ({archive.evaluations} evaluations)"
                self.log(f"resumed {self.out} after {'epoch' if self.by_gradient else 'generation'} "
                         f"{archive.generation - 1}{done}")
        if cfg.mode == "table":
            self._table.counter.queries = archive.evaluations
        if self.needs_latency:
            self._latency_params = self.model.init(jax.random.key(0))
            self._latency_batches = jnp.zeros((1, 2, *self.model.image_shape), jnp.float32)
        if self.by_gradient:
            self._epochs(state, archive, checkpoints)
        else:
            self._generations(state, archive, checkpoints, evaluator)
        checkpoints.close()
        if archive.stopped:
            done = (f"{archive.generation} of {cfg.differentiable.epochs} epochs" if self.by_gradient else
                    f"{archive.evaluations} of {cfg.search.budget} evaluations")
            self.log(f"search stopped before its budget ({done}): {archive.stopped}")
        self._write_tables(archive)
        return self._finish(archive, started)

    def _generations(self, state, archive: Archive, checkpoints: RunCheckpoints, evaluator) -> None:
        """The generations of an ask / tell search until its budget (or another stop), each checkpointed."""
        cfg = self.cfg
        cache = {}
        for row in archive.candidates:
            if row["status"] in REUSED:
                cache.setdefault(row["arch"], row)
        progress = _progress(cfg, archive.evaluations, cfg.search.budget, "eval")
        g = archive.generation
        size = self.space.size()
        if (archive.stopped or "").startswith("stalled") and archive.stalled < cfg.search.stall_generations:
            archive.stopped = None  # resumed with a larger search.stall_generations
        while (archive.evaluations < cfg.search.budget and not archive.stopped
               and (cfg.search.generations is None or g < cfg.search.generations)):
            before = archive.evaluations
            tick = time.perf_counter()
            state = self._generation(g, state, archive, cache, evaluator)
            archive.seconds += time.perf_counter() - tick
            archive.stalled = 0 if archive.evaluations > before else archive.stalled + 1
            if len(cache) >= size:
                archive.stopped = f"space exhausted: all {size:,} architectures of the space were seen"
            elif archive.stalled >= cfg.search.stall_generations:
                archive.stopped = (f"stalled: {archive.stalled} generations in a row added no new evaluation "
                                   "(search.stall_generations)")
            with held_interrupt():  # a Ctrl-C here stops the run after the generation is written whole
                checkpoints.save(g + 1, state, archive.to_dict())
                self._write_tables(archive)
            release_if_crowded(log=self.log)  # a long run of many program shapes must not hit vm.max_map_count
            progress.update(archive.evaluations - before)
            progress.set_postfix(gen=g, best=f"{archive.generations[-1]['best_fitness']:.4g}")
            g += 1
            if archive.stopped:
                break
        progress.close()

    def _epochs(self, state, archive: Archive, checkpoints: RunCheckpoints) -> None:
        """Mode differentiable: the search's epochs, each one history row (the cell derived after it) and one
        checkpoint; the collapse guard (differentiable.stop_skips) may stop it early."""
        cfg, d = self.cfg, self.cfg.differentiable
        progress = _progress(cfg, archive.generation, d.epochs, "epoch")
        for epoch in range(archive.generation, d.epochs):
            if archive.stopped:
                break
            tick = time.perf_counter()
            state, enc, metrics = self._search.epoch(state, epoch)
            row = {"generation": epoch, "index": 0, "arch": self.space.to_string(enc), "status": Status.OK,
                   "fitness": metrics["val_accuracy"], **metrics, **self._cheap(enc)}
            archive.candidates.append(row)
            archive.generations.append(self._generation_stats(epoch, enc[None], [row], archive))
            archive.generation = epoch + 1
            archive.seconds += time.perf_counter() - tick
            if d.stop_skips is not None and row["skip_connections"] >= d.stop_skips:
                archive.stopped = (f"collapse guard: the cell derived after epoch {epoch} has "
                                   f"{row['skip_connections']} skip connections (differentiable.stop_skips="
                                   f"{d.stop_skips})")
            with held_interrupt():  # a Ctrl-C here stops the run after the epoch is written whole
                checkpoints.save(epoch + 1, state, archive.to_dict())
                self._write_tables(archive)
            release_if_crowded(log=self.log)
            progress.update(1)
            progress.set_postfix(epoch=epoch, val=f"{row['val_accuracy']:.4g}", entropy=f"{row['alpha_entropy']:.3f}")
        progress.close()
        last = archive.candidates[-1]
        guard = f"parameter-free share {last['param_free_share']:.2f}, " if "param_free_share" in last else ""
        self.log(f"{cfg.search.strategy}: {archive.generation} epochs in {archive.seconds:.1f} s; derived "
                 f"{last['arch']} ({guard}alpha entropy {last['alpha_entropy']:.3f})")

    def _finish(self, archive: Archive, started: float) -> dict:
        cfg = self.cfg
        rows = [r for r in archive.candidates if r["status"] in EVALUATED and math.isfinite(r["fitness"])]
        if self.by_gradient:
            rows = rows[-1:]  # the search's answer is the cell derived at its end, whatever earlier epochs scored
        pareto = self._pareto(archive)
        _write(self.out / "pareto.json", json.dumps(json_safe(pareto), indent=2) + "\n")
        summary = {
            "mode": cfg.mode,
            "strategy": cfg.search.strategy,
            "space": self.space.name,
            "generations": archive.generation,
            "evaluations": archive.evaluations,
            "cache_hits": archive.cache_hits,
            "infeasible": archive.infeasible,
            **({"stopped": archive.stopped} if archive.stopped else {}),
            **({"filtered": archive.filtered} if cfg.search.prefilter != "none" else {}),
            "search_seconds": round(archive.seconds, 2),
        }
        if cfg.mode == "table":
            summary["queries"] = archive.evaluations
        if self.by_gradient:
            summary["differentiable"] = differentiable.summary(archive.candidates)
        if not rows:
            summary["best_arch"] = None
            self.log(_why_nothing(archive.candidates))
            _write(self.out / "best.json", json.dumps({"arch": None}) + "\n")
        else:
            best = max(rows, key=lambda r: r["fitness"])
            record = {"arch": best["arch"], "fitness": best["fitness"], "generation": best["generation"],
                      "metrics": {k: best[k] for k in self._columns()[5:-1] if k in best}}
            if cfg.mode == "table":
                summary.update(best_arch=best["arch"], best_signal=best["signal"], best_report=best["report"])
            else:
                record["final"] = self._final(rows)
                summary.update(best_arch=record["final"]["arch"] if record["final"] else best["arch"])
                if self.lm:
                    summary["best_val_ppl"] = best.get("val_ppl")
                else:
                    summary["best_val_accuracy"] = best.get("val_accuracy")
                if record["final"] and self.lm:
                    f = record["final"]
                    summary.update(test_ppl=f["test_ppl"], test_ppl_mean=f["test_ppl_mean"],
                                   test_ppl_std=f["test_ppl_std"], quant=f["quant"])
                    summary["baselines"] = {k: {"arch": b["arch"], "test_ppl_mean": b["test_ppl"]["mean"],
                                                "test_ppl_std": b["test_ppl"]["std"]}
                                            for k, b in f["baselines"].items()}
                    if f["ranking"]:
                        summary["ranking"] = {k: f["ranking"][k] for k in ("kendall_tau", "spearman", "n", "warning",
                                                                           "params_kendall_tau") if k in f["ranking"]}
                elif record["final"]:
                    f = record["final"]
                    summary.update(test_accuracy=f["test_accuracy"], test_accuracy_mean=f["test_accuracy_mean"],
                                   test_accuracy_std=f["test_accuracy_std"])
                    summary["baselines"] = {k: {"arch": b["arch"], "test_accuracy_mean": b["test_accuracy"]["mean"],
                                                "test_accuracy_std": b["test_accuracy"]["std"]}
                                            for k, b in f["baselines"].items()}
                    if f["ranking"]:
                        summary["ranking"] = {k: f["ranking"][k] for k in
                                              ("kendall_tau", "spearman", "n", "params_kendall_tau",
                                               "synflow_kendall_tau", "warning")
                                              if k in f["ranking"]}
                    if "early_exits" in f:
                        summary["early_exits"] = {k: f["early_exits"][k] for k in
                                                  ("avg_macs", "macs_saved_fraction", "test_accuracy_drop")
                                                  if k in f["early_exits"]}
            _write(self.out / "best.json", json.dumps(json_safe(record), indent=2) + "\n")
        summary["seconds"] = round(time.perf_counter() - started, 2)  # this process: set-up, search, final
        if jax.process_count() > 1:
            summary["processes"] = jax.process_count()
        _write(self.out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
        if distributed.is_primary():
            write_report(self.out)
        distributed.barrier("jaxnas-run-written")  # no process leaves (and shuts down) before the files exist
        return summary

    def _final(self, rows: list[dict]) -> dict | None:
        """Retrain the top-k (by fitness), the baselines and the control sample from scratch over final.seeds,
        test them, export the winner (best mean validation accuracy among the top-k) and measure ranking fidelity."""
        fc = self.cfg.final
        if fc.top_k == 0:
            return None
        top = sorted(rows, key=lambda r: r["fitness"], reverse=True)[: fc.top_k]
        baselines = self._baselines()
        control = [rows[i] for i in fidelity.control_sample([r["fitness"] for r in rows], fc.control)]
        archs = list(dict.fromkeys([r["arch"] for r in top] + [b["arch"] for b in baselines.values()]
                                   + [r["arch"] for r in control]))
        encs = np.stack([self.space.from_string(a) for a in archs])
        start = time.perf_counter()
        result = self.evaluator.final(encs, seeds=fc.seeds, contenders=len(top))
        if self.lm:
            return self._final_lm(top, baselines, control, archs, encs, result, start)
        w = result["winner"]
        per_arch = {
            arch: {
                "val_accuracy": fidelity.seed_summary([v[i] for v in result["val_accuracy"]]),
                "test_accuracy": fidelity.seed_summary([t[i] for t in result["test_accuracy"]]),
                "status": [st[i] for st in result["status"]],
            }
            for i, arch in enumerate(archs)
        }
        test_x, test_y = self.dataset.test.images, self.dataset.test.labels
        logits = pop.predict(self.model.apply_eval, {"params": result["params"], "bn_stats": result["bn_stats"]},
                             jnp.asarray(encs[w]), jnp.asarray(test_x))
        report = pop.classification_report(logits, jnp.asarray(test_y), self.dataset.info.num_classes)
        winner = per_arch[archs[w]]
        final = {
            "arch": archs[w],
            "val_accuracy": result["val_accuracy"][0][w],
            "test_accuracy": result["test_accuracy"][0][w],
            "test_loss": result["test_loss"][0][w],
            "test_accuracy_mean": winner["test_accuracy"]["mean"],
            "test_accuracy_std": winner["test_accuracy"]["std"],
            "seeds": fc.seeds,
            "macro_f1": float(report["macro_f1"]),
            "macro_precision": float(report["macro_precision"]),
            "macro_recall": float(report["macro_recall"]),
            "confusion": np.asarray(report["confusion"]).tolist(),
            "params": self.model.param_count(encs[w]),
            "macs": self.model.macs(encs[w]),
            "retrained": [{"arch": r["arch"], **per_arch[r["arch"]]} for r in top],
            "search_fitness": top[w]["fitness"],
            "baselines": {
                name: {**b, "params": self.model.param_count(self.space.from_string(b["arch"])), **per_arch[b["arch"]]}
                for name, b in baselines.items()
            },
            "ranking": self._ranking(control, per_arch),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if obj.needs_exits(self.cfg):  # the winner's early exits, guarded on validation, then read on test
            _, twin = self.model.extract(result["params"], encs[w], result["bn_stats"])
            final["early_exits"] = obj.exit_report(self.model, twin, encs[w], *self.evaluator.exit_data(),
                                                   (test_x, test_y), self.cfg)
        export_model(self.out / "model", self.model, self.cfg.space, encs[w], result["params"], result["bn_stats"],
                     {"test_accuracy": final["test_accuracy"], "val_accuracy": final["val_accuracy"]})
        self.log(f"final: retrained {len(archs)} architectures x {fc.seeds} seeds for up to {fc.epochs} epochs in "
                 f"{final['seconds']:.1f} s; best {final['arch']}: test accuracy {_mean_std(winner['test_accuracy'])} "
                 f"(validation {_mean_std(winner['val_accuracy'])})")
        if "early_exits" in final:
            e = final["early_exits"]
            self.log(f"early exits of the winner: {e['avg_macs']:,.0f} MACs per test image on average "
                     f"({e['macs_saved_fraction']:.1%} fewer than its {final['macs']:,}), test accuracy drop "
                     f"{e.get('test_accuracy_drop', 0.0):.2f} points")
        for name, b in final["baselines"].items():
            scored = f" (search score {b['search_fitness']:.4f})" if "search_fitness" in b else ""
            self.log(f"baseline {name}: {b['arch']}{scored}: test accuracy {_mean_std(b['test_accuracy'])}")
        ranking = final["ranking"]
        if ranking:
            self.log(f"ranking fidelity: Kendall tau {ranking['kendall_tau']:.3f}, Spearman {ranking['spearman']:.3f} "
                     f"over {ranking['n']} control candidates" + (f"; WARNING: {ranking['warning']}"
                                                                   if "warning" in ranking else ""))
        return final

    def _final_lm(self, top, baselines, control, archs, encs, result, start) -> dict:
        """`_final` for a language model: perplexities instead of accuracies, and the winner's test perplexity
        with its twin's weights quantised to objectives.quant (dequantised and evaluated)."""
        fc, w = self.cfg.final, result["winner"]

        def ppl(per_seed, i):
            return fidelity.seed_summary([perplexity(v[i]) for v in per_seed])

        per_arch = {
            arch: {"val_ppl": ppl(result["val_loss"], i), "test_ppl": ppl(result["test_loss"], i),
                   "status": [st[i] for st in result["status"]]}
            for i, arch in enumerate(archs)
        }
        winner = per_arch[archs[w]]
        test_x, test_y = self.evaluator.data.test_x, self.evaluator.data.test_y
        quant = lm_quantised(self.model, encs[w], result["params"], self.cfg.objectives.quant, test_x, test_y)
        final = {
            "arch": archs[w],
            "val_ppl": perplexity(result["val_loss"][0][w]),
            "test_ppl": perplexity(result["test_loss"][0][w]),
            "test_loss": result["test_loss"][0][w],
            "test_ppl_mean": winner["test_ppl"]["mean"],
            "test_ppl_std": winner["test_ppl"]["std"],
            "seeds": fc.seeds,
            **obj.cheap_metrics(self.model, encs[w], self.cfg.objectives.quant),
            "quant": {k: v for k, v in quant.items() if k != "params"},
            "retrained": [{"arch": r["arch"], **per_arch[r["arch"]]} for r in top],
            "search_fitness": top[w]["fitness"],
            "baselines": {
                name: {**b, "params": self.model.param_count(self.space.from_string(b["arch"])), **per_arch[b["arch"]]}
                for name, b in baselines.items()
            },
            "ranking": self._ranking(control, per_arch),
            "seconds": round(time.perf_counter() - start, 2),
        }
        export_model(self.out / "model", self.model, self.cfg.space, encs[w], result["params"], result["bn_stats"],
                     {"test_ppl": final["test_ppl"], "val_ppl": final["val_ppl"], "text": self._text_meta()},
                     quantised=quant["params"])
        self.log(f"final: retrained {len(archs)} architectures x {fc.seeds} seeds for up to {fc.epochs} epochs in "
                 f"{final['seconds']:.1f} s; best {final['arch']}: test perplexity {_mean_std(winner['test_ppl'])} "
                 f"(validation {_mean_std(winner['val_ppl'])}); at {quant['precision']} "
                 f"({quant['size_bytes']:,} bytes): test perplexity {quant['test_ppl']:.4f}")
        for name, b in final["baselines"].items():
            scored = f" (search score {b['search_fitness']:.4f})" if "search_fitness" in b else ""
            self.log(f"baseline {name}: {b['arch']}{scored}: test perplexity {_mean_std(b['test_ppl'])}")
        return final

    def _text_meta(self) -> dict:
        """What loading an exported language model needs to read and write text: the tokenizer and the data."""
        info = self.dataset.info
        return {"name": info.name, "tokenizer": info.tokenizer, "vocab_size": info.vocab_size,
                "seq_len": info.seq_len}

    def _baselines(self) -> dict[str, dict]:
        """name -> {"arch"} of the configured baselines that apply to this run (random: and its "search_fitness")."""
        fc, out = self.cfg.final, {}
        if "largest" in fc.baselines:
            largest = fidelity.largest_architecture(self.space, Ends(self.model, "largest"))
            out["largest"] = {"arch": self.space.to_string(largest)}
        for i, text in enumerate(fc.reference):
            name = "reference" if len(fc.reference) == 1 else f"reference{i + 1}"
            out[name] = {"arch": self.space.to_string(self.space.from_string(text))}
        if "random" in fc.baselines and self.cfg.mode == "oneshot":
            found = self._random_search()
            if found is not None:
                out["random"] = {"arch": found[0], "search_fitness": found[1]}
        return out

    def _random_search(self) -> tuple[str, float] | None:
        """Random search at the run's budget: search.budget distinct feasible architectures drawn uniformly,
        scored like the search's own candidates; (the best by fitness, its fitness), None if none is feasible."""
        budget = self.cfg.search.budget
        key = jax.random.fold_in(self.key, 2**30)
        found: dict[str, tuple[np.ndarray, dict]] = {}  # arch -> (encoding, cheap metrics)
        for attempt in range(20):
            for enc in np.asarray(self.space.sample(jax.random.fold_in(key, attempt), 4 * budget)):
                arch = self.space.to_string(enc)
                if arch not in found and len(found) < budget:
                    metrics = self._cheap(enc)
                    if obj.total_violation(metrics, self.constraints, (*self.cheap_names, *self.measured_names)) == 0:
                        found[arch] = (enc, metrics)
            if len(found) >= budget:
                break
        if not found:
            return None
        encs = np.stack([enc for enc, _ in found.values()])
        size = self.cfg.search.population  # what the evaluator's compiled programs take at once
        results = [r for i in range(0, len(encs), size) for r in self.evaluator.evaluate(encs[i : i + size], -1)]
        scored = [(self._fitness({**r, **metrics}), a) for (a, (_, metrics)), r in zip(found.items(), results)]
        scored = [(f, a) for f, a in scored if math.isfinite(f)]
        if not scored:
            return None
        fitness, arch = max(scored)
        return arch, fitness

    def _ranking(self, control: list[dict], per_arch: dict) -> dict:
        """Rank correlation of the search's scores (first objective) with the stand-alone mean test accuracy."""
        if len(control) < 3:
            return {}
        first = self.objectives[0]
        cheap = [r.get(first.name, math.nan) for r in control]
        encs = np.stack([self.space.from_string(r["arch"]) for r in control])
        params = [self.model.param_count(e) for e in encs]
        if self.lm:  # the stand-alone reference: -mean test perplexity (higher is better, like the signed score)
            standalone = [-per_arch[r["arch"]]["test_ppl"]["mean"] for r in control]
            out = {
                "score": f"{first.name} ({self.cfg.mode})",
                "reference": f"minus the stand-alone test perplexity, mean of {self.cfg.final.seeds} seed(s)",
                **fidelity.rank_correlation([_signed(c, first.direction) for c in cheap], standalone),
                "params_kendall_tau": fidelity.rank_correlation(params, standalone)["kendall_tau"],
                "control": [{"arch": r["arch"], "score": c, "standalone": s}
                            for r, c, s in zip(control, cheap, standalone)],
            }
            return self._ranking_warning(out)
        standalone = [per_arch[r["arch"]]["test_accuracy"]["mean"] for r in control]
        # synflow: a zero-cost proxy (the untrained network; it reads only the inputs' shape), for comparison
        untrained, x, y = self._proxy_batch()
        synflow = proxies.score_model("synflow", self.model, untrained, encs, x, y)
        out = {
            "score": f"{first.name} ({self.cfg.mode})",
            "reference": f"stand-alone test accuracy, mean of {self.cfg.final.seeds} seed(s)",
            **fidelity.rank_correlation([_signed(c, first.direction) for c in cheap], standalone),
            "params_kendall_tau": fidelity.rank_correlation(params, standalone)["kendall_tau"],
            "synflow_kendall_tau": fidelity.rank_correlation(synflow, standalone)["kendall_tau"],
            "control": [{"arch": r["arch"], "score": c, "standalone": s} for r, c, s in zip(control, cheap, standalone)],
        }
        return self._ranking_warning(out)

    @staticmethod
    def _ranking_warning(out: dict) -> dict:
        if not out["kendall_tau"] >= fidelity.LOW_TAU:
            out["warning"] = (f"Kendall tau {out['kendall_tau']:.2f} < {fidelity.LOW_TAU}: the search's scores rank "
                              "candidates poorly; trust the retrained numbers, not the search's ranking")
        return out


def _why_nothing(candidates: list[dict]) -> str:
    """Why a run has no best candidate, from what its candidates' statuses say."""
    counts = {}
    for r in candidates:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    seen = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no candidates"
    if counts.get(Status.FAILED) and not counts.get(Status.INFEASIBLE):
        advice = "training diverged (NaN loss) for every evaluated candidate: lower train.learning_rate"
    elif counts.get(Status.INFEASIBLE):
        advice = "relax objectives.constraints or raise search.budget"
    else:
        advice = "raise search.budget"
    return f"no candidate was evaluated successfully ({seen}): {advice}"


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _mean_std(summary: dict) -> str:
    return f"{summary['mean']:.4f} +- {summary['std']:.4f}" if summary["seeds"] > 1 else f"{summary['mean']:.4f}"


@functools.lru_cache(maxsize=16)
def _compiled(strategy):
    """Jitted ask and tell, shared by every run of an equal strategy in this process (one compile each)."""
    return jax.jit(strategy.ask), jax.jit(strategy.tell)


@functools.partial(jax.jit, static_argnums=0)
def _diversity(space, encs):
    return option_entropy(space, encs)


def _write(path: Path, text: str) -> None:
    """Write a run-folder file atomically; only process 0 writes (the others hold the same content)."""
    if distributed.is_primary():
        atomic_write_text(path, text)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Rows as CSV (only ``columns``, empty cells for missing values), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    _write(path, buf.getvalue())


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


def _progress(cfg: RunConfig, done: int, total: int, unit: str):
    enabled = cfg.progress and distributed.is_primary()
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm  # disabled: tqdm.auto would still warn in a notebook without ipywidgets

    return tqdm(total=total, initial=done, desc=f"search ({cfg.search.strategy}, {cfg.mode})",
                unit=unit, disable=not enabled, dynamic_ncols=True)


def run_search(cfg: RunConfig, *, resume: bool = False, log=print) -> dict:
    """Run (or, with ``resume``, continue) the search ``cfg`` describes; returns ``summary.json``'s content.

    With ``cfg.distributed`` naming several processes (or a cluster JAX detects) this process joins them first
    (`jaxnas.distributed.initialize`); call it before any other JAX computation in the process.
    """
    if distributed.initialize(cfg.distributed):
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process); if a process is lost the others stop - resume every process "
            f"with: python -m jaxnas.search --resume {cfg.output} distributed.process_id=<i> ...")
        if not distributed.is_primary():
            log = _quiet
    return SearchRun(cfg, resume=resume, log=log).run()


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0 (process 0 reports for the run)."""

