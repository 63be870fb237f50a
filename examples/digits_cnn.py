"""A small CNN of your own with FPCM after two of its stages: the "Your own model" example.

    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn
    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn_base \
        --config.model.kwargs.fpcm=False

It follows the protocol of `fpcm_jax.models.imported`: `__call__(x, train, progress)` on NHWC
images in [0, 1], logits out, BatchNorm statistics in `batch_stats`. FPCM takes `progress`, so
its cutoff follows the training curriculum and evaluation runs at the final cutoff.
"""

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.layers import FPCM


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU stages (the later ones halve the map), global average pooling and a
    linear head; FPCM after the stages in `fpcm_after` (counted from 1)."""

    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    fpcm: bool = True
    fpcm_after: Sequence[int] = (2, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        x = x.astype(self.dtype)
        for stage, width in enumerate(self.widths, 1):
            stride = 1 if stage == 1 else 2
            x = nn.Conv(width, (3, 3), strides=(stride, stride), use_bias=False,
                        dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(x)
            if self.fpcm and stage in self.fpcm_after:
                x = FPCM()(x, progress)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
