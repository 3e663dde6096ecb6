"""Multi-process (multi-host) data parallelism with `jax.distributed`.

One Python process per host (or per GPU) runs the same program. After `initialize`,
``jax.devices()`` lists the devices of every process, `train.data_parallel_mesh()` spans them
all, and each process loads only its share of every global batch:

* `process_shard_options` makes `data.make_loader` serve, for each global batch of
  ``batch_size * process_count`` examples, the rows ``[p * batch_size, (p + 1) * batch_size)``
  of process ``p``; the global batch is then the same, in the same order, as the batch of a
  single-process run with the global batch size;
* `global_batch` assembles the per-process parts into one global array sharded over the
  mesh (``jax.make_array_from_process_local_data``); `fit` does this itself.

The train step then runs on global arrays: BatchNorm statistics, the loss and the metrics are
over the global batch, as on one device. On CPU the collectives go through gloo.

Example:
    A single process is a run of one, and process 0:

    >>> from jtransfer import distributed
    >>> distributed.is_multiprocess(), distributed.is_main()
    (False, True)

    Two processes on one machine each call this first, with their own process id (0, 1):

    >>> distributed.initialize("127.0.0.1:12355", num_processes=2, process_id=0)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtransfer.errors import ConfigError

__all__ = [
    "ENV_COORDINATOR",
    "ENV_HEARTBEAT_TIMEOUT",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "global_batch",
    "initialize",
    "is_main",
    "is_multiprocess",
    "local_loader_state",
    "process_shard_options",
]

ENV_COORDINATOR = "JTRANSFER_COORDINATOR"
ENV_NUM_PROCESSES = "JTRANSFER_NUM_PROCESSES"
ENV_PROCESS_ID = "JTRANSFER_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "JTRANSFER_HEARTBEAT_TIMEOUT"


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

    Call it before anything else touches JAX devices. The settings come from the arguments,
    else from the environment variables ``JTRANSFER_COORDINATOR`` (``host:port`` of process
    0), ``JTRANSFER_NUM_PROCESSES`` and ``JTRANSFER_PROCESS_ID``; with ``auto=True`` and none
    of them set, JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU pod slices).
    On CPU, the cross-process collectives are set to gloo first.

    A process that dies (killed, out of memory, host lost) does not leave the others hanging
    forever: they abort (SIGABRT, "Terminating process because the JAX distributed service
    detected fatal errors"), at once if process 0 (which hosts the coordination service) died
    and its connections closed, else once the service has missed the dead process's heartbeats
    for `heartbeat_timeout_s` (meanwhile they wait in a collective or checkpoint barrier).
    A checkpoint is complete only when every process has written its part, so rerunning all
    the processes resumes from the last complete one.

    Args:
        coordinator: ``host:port`` of the coordinator (process 0).
        num_processes: processes in the run.
        process_id: this process's index, ``0 .. num_processes - 1``.
        auto: with no explicit setting, let `jax.distributed.initialize()` auto-detect.
        heartbeat_timeout_s: seconds without a heartbeat after which a process counts as
            dead and the run is aborted; else ``JTRANSFER_HEARTBEAT_TIMEOUT``, else JAX's
            default (100 s). A short one ends a broken run sooner but can abort a healthy
            run on a machine so overloaded that heartbeats stall.

    Returns:
        True if `jax.distributed` was initialised, False if nothing asked for it (a plain
        single-process run).

    Raises:
        ConfigError: incomplete or invalid settings.
    """
    env = os.environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int(ENV_NUM_PROCESSES, env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int(ENV_PROCESS_ID, env[ENV_PROCESS_ID])
    if heartbeat_timeout_s is None and env.get(ENV_HEARTBEAT_TIMEOUT):
        heartbeat_timeout_s = _int(ENV_HEARTBEAT_TIMEOUT, env[ENV_HEARTBEAT_TIMEOUT])
    if heartbeat_timeout_s is not None and heartbeat_timeout_s < 1:
        raise ConfigError(f"the heartbeat timeout must be >= 1 s, got {heartbeat_timeout_s}")
    timeouts = (
        {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": heartbeat_timeout_s}
    )
    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit):
        if not auto:
            return False
        _use_gloo_on_cpu()
        jax.distributed.initialize(**timeouts)
        return True
    if any(v is None for v in explicit):
        raise ConfigError(
            "multi-process training needs all of the coordinator (host:port of process 0), "
            f"the number of processes and this process's id; got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r} (flags --coordinator "
            f"--num-processes --process-id, or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
            f"{ENV_PROCESS_ID})"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
            f"num_processes={num_processes}, process_id={process_id}"
        )
    if ":" not in coordinator:
        raise ConfigError(f"the coordinator must be host:port, got {coordinator!r}")
    _use_gloo_on_cpu()
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        **timeouts,
    )
    return True


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _use_gloo_on_cpu() -> None:
    # Only a setting (it creates no backend); it changes nothing on GPU or TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_multiprocess() -> bool:
    """True when several processes take part in the computation."""
    return jax.process_count() > 1


def is_main() -> bool:
    """True on process 0, the one that logs (always True in a single-process run)."""
    return jax.process_index() == 0


def process_shard_options():
    """grain ``ShardOptions`` for `data.make_loader`: this process's share of each batch.

    Pass ``batch_size = global_batch_size // jax.process_count()`` to ``make_loader``; see
    the module docstring for which examples each process serves.
    """
    import grain

    return grain.sharding.ShardOptions(
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        drop_remainder=True,
    )


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """One global batch, sharded over `mesh` on its first axis, from each process's part.

    Args:
        local_batch: this process's rows, e.g. {"image": (b, H, W, 3), "label": (b,)}; every
            process passes the same number of rows.
        mesh: a mesh from `train.data_parallel_mesh()` over the devices of all processes.

    Returns:
        The global arrays (first axis ``b * process_count``), process ``p``'s rows at
        ``[p * b, (p + 1) * b)`` when the mesh lists devices in process order.
    """
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def local_loader_state(state: bytes | str | None) -> bytes | None:
    """A training loader's saved state (written by process 0) for this process's loader."""
    if state is None:
        return None
    position = json.loads(state)
    if "shard" in position:
        position["shard"] = [jax.process_index(), jax.process_count()]
    return json.dumps(position).encode()
