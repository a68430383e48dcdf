"""Several processes searching together on JAX's own distributed runtime (multi-controller JAX).

Every process runs the same search: the strategy, the data and every random choice derive from the config, so
each process holds the same population; the population axis of candidate training and scoring is sharded over
*all* global devices (`jaxnas.population.population_mesh`), and results come back to every process with
`to_host` (an all-gather). Process 0 alone writes the run folder's files; Orbax checkpoints are written
by every process together under Orbax's multi-host rules (process 0 writes replicated arrays and metadata, the
others wait at its barriers). A lost process is noticed by the coordination service's heartbeat (or by the
collective it was part of), which makes the others fail loudly; the run then resumes from its last checkpoint.

    python -m jaxnas.search --config C distributed.coordinator=host0:12355 \\
        distributed.num_processes=2 distributed.process_id=0        # on host 0 (process 1 alike)

Without a coordinator, ``distributed.auto`` lets JAX detect the cluster where it knows how (SLURM, Open MPI,
Cloud TPU pods). `initialize` must run before any JAX computation (the backends start with it).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxnas.config import DistributedConfig

# Environment variables of the clusters JAX's own detection supports, with the ones saying "more than one process".
_CLUSTER_HINTS = {
    "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": bool,
}


def detected_cluster() -> str | None:
    """The variable naming a multi-process cluster JAX can join by itself, or None."""
    for name, many in _CLUSTER_HINTS.items():
        if many(os.environ.get(name, "")):
            return name
    return None


def initialize(cfg: DistributedConfig) -> bool:
    """Join the processes ``cfg`` names (or a detected cluster); False when this run is a single process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if cfg.coordinator:
        if cfg.num_processes == 1:
            return False
        jax.distributed.initialize(
            cfg.coordinator, cfg.num_processes, cfg.process_id,
            initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout,
        )
    elif cfg.auto and detected_cluster():
        jax.distributed.initialize(
            initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout
        )
    else:
        return False
    return jax.process_count() > 1


def is_primary() -> bool:
    """True in the process that writes files (process 0; always true in a single process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """``x`` as a numpy array in this process, gathered from every process when it spans several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_host(tree):
    """`to_host` of every leaf of a pytree."""
    return jax.tree.map(to_host, tree)


def from_primary(value: float) -> float:
    """Process 0's ``value`` in every process (for measurements such as latency, which differ per process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.asarray(value, np.float64)))
