"""Orbax checkpoints of a search run: one step per finished generation, the previous ones kept as fallbacks.

A step holds ``state`` (the strategy's pytree state, typed PRNG keys stored as their raw key data) and
``archive`` (JSON: every evaluated candidate, the per-generation log, the run's counters, the resolved config,
and a SHA-256 checksum of the rest). Orbax writes a step into a temporary folder and renames it when complete, so
a run killed while writing leaves the previous step intact; a step that cannot be read back (corrupted on disk:
Orbax's array checks, or the archive's checksum) is set aside with a warning and the one before it is used. When
every step is unreadable the resume is refused (`RunError`, the steps left in place) instead of silently starting
afresh.

Arrays that only depend on the configuration (the trained supernet) are saved once under ``supernet/``.
In a multi-process run every process calls save and restore (Orbax's multi-host rules: process 0 writes
replicated arrays and metadata, the others meet it at Orbax's barriers); the saved values are the same in
every process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from interop.jsonsafe import from_json_safe, json_safe
from jaxnas.distributed import barrier, is_primary
from jaxnas.search.runfolder import RunError


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree):
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else np.asarray(a), tree)


def _from_storable(stored, like):
    return jax.tree.map(
        lambda s, l: jax.random.wrap_key_data(jnp.asarray(s)) if _is_key(l) else jnp.asarray(s, l.dtype), stored, like
    )


class RunCheckpoints:
    """The checkpoints of one run folder (``<run>/checkpoints``)."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "archive"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, archive: dict) -> None:
        stored = json_safe(archive)
        stored["checksum"] = _checksum(stored)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)), archive=ocp.args.JsonSave(stored)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_latest(self, like_state) -> tuple[int, object, dict] | None:
        """(step, state, archive) of the newest readable step, or None when there is none.

        ``like_state`` is a state of the same structure (e.g. ``strategy.init(key)``): it gives shapes, dtypes
        and which leaves are PRNG keys.
        """
        storable = _to_storable(like_state)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), storable)
        unreadable = []
        found = None
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), archive=ocp.args.JsonRestore()),
                )
                archive = dict(restored.archive) if isinstance(restored.archive, dict) else None
                checksum = archive.pop("checksum", None) if archive is not None else None
                if checksum is not None and checksum != _checksum(archive):  # steps of older runs have none
                    raise ValueError("the archive's checksum does not match its content (edited or corrupted)")
                archive = from_json_safe(archive)
                if not isinstance(archive, dict) or archive.get("generation") != step:
                    raise ValueError(f"archive of step {step} is incomplete")
                found = step, _from_storable(restored.state, like_state), archive
                break
            except Exception as error:  # noqa: BLE001 - any unreadable step falls back to the previous one
                unreadable.append((step, f"{type(error).__name__}: {error}"))
        if unreadable and found is None:  # left where they are: a second --resume is refused the same way
            step, why = unreadable[0]
            raise RunError(
                f"every checkpoint step of {self.directory.parent} is unreadable ({len(unreadable)} steps; the latest, "
                f"{step}: {why}); the run cannot resume. Start it anew with another output=, or replace checkpoints/ "
                "with a good copy"
            )
        if unreadable:
            for step, why in unreadable:
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable ({why}); using step "
                              f"{found[0]}", stacklevel=2)
            # Set aside (not deleted: someone may want to look), so the resumed run can write these steps anew.
            if is_primary():
                aside = self.directory.parent / "checkpoints_unreadable"
                aside.mkdir(exist_ok=True)
                for step, _ in unreadable:
                    target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                    shutil.move(str(self.directory / str(step)), str(target))
            barrier("jaxnas-checkpoints-set-aside")
            self._manager.reload()
        return found

    def close(self) -> None:
        self._manager.close()


def _checksum(archive: dict) -> str:
    return hashlib.sha256(json.dumps(archive, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_arrays(path: str | Path, tree) -> None:
    """Save a pytree of arrays (e.g. the trained supernet) with Orbax, atomically."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).resolve(), _to_storable(tree), force=True)


def load_arrays(path: str | Path, like):
    """Restore what `save_arrays` wrote; ``like`` gives the structure, shapes and dtypes."""
    storable = _to_storable(like)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), storable)
    with ocp.StandardCheckpointer() as checkpointer:
        return _from_storable(checkpointer.restore(Path(path).resolve(), abstract), like)
