"""Start-up, device mesh, shardings and multi-host helpers: one `jax.jit` over global arrays.

Every mode of main.py calls `setup()` first, before anything touches a JAX backend: it adds
the default XLA flags and, when several processes are configured, joins them with
`jax.distributed.initialize()`. Nothing in fpcm_jax starts a backend at import time.

The batch is sharded over the 'data' axis of a mesh of every device of every host; model state
and the in-memory datasets are replicated. Each host holds the same numpy data (the datasets are
small and read identically everywhere), and `global_array` builds global arrays from it, so the
same code runs on one CPU, several GPUs or a TPU pod slice. `fetch` brings a global array back
to every host as numpy, also when its shards live on other hosts.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# XLA:CPU runs convolutions through YNNPACK fusions by default; with them off it uses its other
# CPU kernels, which made the ResNet-18 PGD-10 training step about 5% faster on the 2-core
# x86 development machine (JAX 0.10.2; benchmarks/README.md). CPU only; GPUs/TPUs ignore it.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

# The environment variables `setup` reads when no flag gives the value (JAX itself reads only
# JAX_COORDINATOR_ADDRESS; TPU VMs, Slurm, Open MPI and Kubernetes are detected by JAX).
DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                   "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


class SetupError(RuntimeError):
    """The distributed runtime cannot start; the message says what to fix."""


def set_default_xla_flags() -> None:
    """Add DEFAULT_XLA_FLAGS to the XLA_FLAGS environment variable, each unless XLA_FLAGS sets
    it already or FPCM_JAX_DEFAULT_XLA_FLAGS=0. Works until JAX starts its backends."""
    if os.environ.get("FPCM_JAX_DEFAULT_XLA_FLAGS", "1") == "0":
        return
    current = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in DEFAULT_XLA_FLAGS if flag.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def distributed_settings(auto_detect: bool = False, coordinator_address: Optional[str] = None,
                         num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Given values win over the environment (DISTRIBUTED_ENV); `auto_detect` (config.multihost)
    lets JAX find the cluster (TPU pod slice, Slurm, Open MPI, Kubernetes) by itself.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    settings = {}
    for name, value in given.items():
        if value is None and os.environ.get(DISTRIBUTED_ENV[name]):
            value = os.environ[DISTRIBUTED_ENV[name]]
        if value is not None and name != "coordinator_address":
            try:
                value = int(value)
            except ValueError:
                raise SetupError(f"{name}={value!r} (or ${DISTRIBUTED_ENV[name]}) must be an "
                                 f"integer.") from None
        if value is not None:
            settings[name] = value
    if settings.get("num_processes") == 1 and not auto_detect:
        return None
    if not settings and not auto_detect:
        return None
    return settings


def setup(auto_detect: bool = False, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
    """The start-up path of every mode: default XLA flags, then the distributed runtime when
    several processes are configured. Call it before anything touches a JAX backend."""
    set_default_xla_flags()
    settings = distributed_settings(auto_detect, coordinator_address, num_processes, process_id)
    if settings is None or jax.distributed.is_initialized():
        return
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    if xla_bridge.backends_are_initialized():
        raise SetupError("JAX started its backend before jax.distributed.initialize(): call "
                         "fpcm_jax.parallel.setup() first, before any jax.devices() or array.")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need one
    try:
        jax.distributed.initialize(**settings)
    except Exception as error:  # JAX raises several kinds; the first line says what happened
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SetupError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in settings.items())}) "
            f"failed: {detail}. Give --coordinator_address HOST:PORT, --num_processes and "
            f"--process_id (or ${DISTRIBUTED_ENV['coordinator_address']}, "
            f"${DISTRIBUTED_ENV['num_processes']}, ${DISTRIBUTED_ENV['process_id']}) on every "
            f"process, the same address everywhere.") from None


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_array(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a numpy array that every host holds in full."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch(array: jax.Array) -> np.ndarray:
    """The whole value of a global array as numpy, on every host (gathered across hosts when
    its shards live on several)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def process_votes(vote: bool, mesh: Mesh) -> jax.Array:
    """A (device_count,) bool array holding each process's vote on its own devices; its
    `any()` inside a jitted function is the same on every process."""
    local = np.full((len(mesh.local_devices),), bool(vote))
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local)


def barrier(name: str) -> None:
    """Wait until every process reaches this point (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_batch_size(batch_size: int, what: str = "train.batch_size") -> None:
    count = jax.device_count()
    if batch_size <= 0:
        raise ValueError(f"{what}={batch_size} must be positive.")
    if batch_size % count:
        raise ValueError(f"{what}={batch_size} must be a multiple of the {count} devices.")


def is_main_process() -> bool:
    return jax.process_index() == 0
