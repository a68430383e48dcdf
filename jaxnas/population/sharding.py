"""A population over devices: `shard_population` pads the population axis to the device count and shards it
across a mesh (`population_mesh`); `replicate` places shared weights beside it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def population_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"population"`` over ``devices`` for `shard_population`.

    The default is every global device: in a multi-process run (`jaxnas.distributed`) the devices of all
    processes, so the population axis is split across hosts (fetch results with `jaxnas.distributed.to_host`).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("population",), axis_types=(AxisType.Auto,))


def shard_population(tree, mesh: Mesh) -> tuple[object, int]:
    """(tree with leading axis padded to a multiple of the mesh size and sharded over all its axes, P).

    Every leaf of ``tree`` has the population axis P first (encodings, params_P, keys ...). Padding repeats the
    last candidate, so padded rows are valid architectures; slice results with ``[:P]`` to drop them.
    The sharding uses automatic axes whatever the mesh declares: the population programs are written per
    candidate and vmapped, so the compiler propagates the split along P without per-op annotations (explicit
    axes would demand an output sharding for every gather an encoding drives).
    """
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"every leaf needs the same population axis first, got leading sizes {sizes}")
    (population,) = sizes
    pad = -population % mesh.devices.size
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    sharding = NamedSharding(auto, PartitionSpec(mesh.axis_names))

    def place(leaf):
        leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)]) if pad else leaf
        return _place(leaf, sharding)

    return jax.tree.map(place, tree), population


def replicate(tree, mesh: Mesh):
    """``tree`` (e.g. shared supernet weights) replicated on every device of ``mesh``, to use beside sharded
    populations (needed across processes, where a process-local array cannot join a global program)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: _place(leaf, sharding), tree)


def _place(leaf, sharding: NamedSharding):
    if jax.process_count() > 1 and isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        # Across processes only host values (the same in every process) can be placed on the global mesh.
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        leaf = np.asarray(leaf)
    return jax.device_put(leaf, sharding)

