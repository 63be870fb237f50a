"""Deterministic synthetic weights in the official PyTorch state_dict layout (numpy only).

Shared by `fixtures/make_official_fixtures.py` (which loads them into the official PyTorch
model to record reference logits) and the tests (which convert the same weights with
`fpcm_jax.runs.convert`), so only the key names, shapes and outputs need to be committed. Each
entry comes from its own `default_rng(crc32(name)).random(shape)` stream, whose values numpy
keeps stable across versions; BatchNorm statistics are deliberately far from 0 / 1.
"""

from __future__ import annotations

import zlib
from typing import Dict, Sequence, Tuple

import numpy as np


def synthetic_entry(name: str, shape: Sequence[int]) -> np.ndarray:
    """One state_dict entry: uniform draws scaled to what that kind of entry holds."""
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, np.int64)
    if name.endswith("learnable_freq_control"):
        return np.ones(shape, np.float32)
    uniform = np.random.default_rng(zlib.crc32(name.encode())).random(tuple(shape))
    symmetric = 2.0 * uniform - 1.0
    if name.endswith("running_var"):
        values = 0.5 + 1.5 * uniform
    elif name.endswith("running_mean") or name.endswith("bias"):
        values = 0.2 * symmetric
    elif len(shape) == 1:  # BatchNorm scale
        values = 0.5 + uniform
    else:  # conv / linear / projection kernel with unit-variance-preserving scale
        fan_in = int(np.prod(shape[1:]))
        values = np.sqrt(6.0 / fan_in) * symmetric
    return values.astype(np.float32)


def synthetic_state_dict(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, np.ndarray]:
    return {name: synthetic_entry(name, shape) for name, shape in shapes.items()}
