"""Device mesh, shardings and multi-host start: one `jax.jit` over global arrays.

The batch is sharded over the 'data' axis of a mesh of every device of every host; model state
and the in-memory datasets are replicated. Each host holds the same numpy data (the datasets are
small and read identically everywhere), and `global_array` builds global arrays from it, so the
same code runs on one CPU, several GPUs or a TPU pod slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# XLA:CPU runs convolutions through YNNPACK fusions by default; with them off it uses its other
# CPU kernels, which made the ResNet-18 PGD-10 training step about 5% faster on the 2-core
# x86 development machine (JAX 0.10.2; benchmarks/README.md). CPU only; GPUs/TPUs ignore it.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def set_default_xla_flags() -> None:
    """Add DEFAULT_XLA_FLAGS to the XLA_FLAGS environment variable, each unless XLA_FLAGS sets
    it already or FPCM_JAX_DEFAULT_XLA_FLAGS=0. Works until JAX starts its backends."""
    if os.environ.get("FPCM_JAX_DEFAULT_XLA_FLAGS", "1") == "0":
        return
    current = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in DEFAULT_XLA_FLAGS if flag.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def maybe_initialize_distributed(enabled: bool) -> None:
    """Join a multi-host job (coordinator, process count and id come from the environment)."""
    if enabled:
        jax.distributed.initialize()


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


def check_batch_size(batch_size: int, what: str = "train.batch_size") -> None:
    count = jax.device_count()
    if batch_size % count:
        raise ValueError(f"{what}={batch_size} must be a multiple of the {count} devices.")


def is_main_process() -> bool:
    return jax.process_index() == 0
