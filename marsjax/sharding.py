"""The client axis over devices: a ``"clients"`` mesh, placement helpers, multi-host start.

The same experiment runs on 1 CPU, 8 fake CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``), one GPU, or a multi-host pod: the round's local
training is a ``jax.shard_map`` over the mesh axis ``"clients"`` (each device trains its slice of
the sampled clients with the configured strategy), and what follows (attack crafting, defense,
aggregation) runs on the sharded stack with XLA's SPMD partitioner inserting the collectives.
Everything else (global model, training data, states) is replicated.

Multi-host (TPU pods, several GPU hosts, or several processes on one machine): call
:func:`initialize` in every process before anything else touches JAX (``marsjax run
--distributed`` does; on TPU pods and SLURM/Open MPI clusters the arguments are detected), then
build the simulation as usual: ``jax.devices()`` lists every process's devices and the mesh spans
them all. Every process loads the same dataset and config, so host-side inputs are identical.

The mesh is built directly with :class:`jax.sharding.Mesh` (Auto axes): ``jax.make_mesh`` in
JAX 0.10 makes Explicit axes, under which the models' reshapes raise ``ShardingTypeError``
(env.md §2b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "CLIENTS",
    "client_sharded",
    "initialize",
    "make_mesh",
    "mesh_for",
    "put_replicated",
    "replicated",
    "to_host",
]

CLIENTS = "clients"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"clients"`` over ``devices`` (default: all, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (CLIENTS,))


def mesh_for(clients_per_round: int, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """The mesh the round uses: the largest device count that divides ``clients_per_round``.

    Returns ``None`` on a single device (no sharding at all). With 20 clients on 8 devices the
    mesh has 4 devices (each trains 5 clients); pick a ``clients_per_round`` that is a multiple of
    the device count to use them all.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = math.gcd(clients_per_round, len(devices))
    if n <= 1:
        return None
    return make_mesh(devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def client_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (client) axis split over the mesh."""
    return NamedSharding(mesh, P(CLIENTS))


def put_replicated(tree, mesh: Mesh | None):
    """Places every leaf of ``tree`` (identical on every process) replicated over ``mesh``.

    Works in multi-process runs too: each process provides its (identical) host value for its
    own devices, via :func:`jax.make_array_from_callback`.
    """
    if mesh is None:
        return tree
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
    """An array as numpy, in any process (gathered across processes if it is split)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Starts JAX's multi-controller runtime (``jax.distributed.initialize``).

    With no arguments the cluster is detected (TPU pods, SLURM, Open MPI); on CPU hosts give the
    coordinator ``host:port``, the number of processes and this process's id. CPU collectives
    across processes use gloo.
    """
    try:  # CPU collectives across processes; ignored by GPU/TPU backends
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001, S110 - option absent on some builds
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
