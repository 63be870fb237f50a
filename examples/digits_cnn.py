"""A small network of your own with FPCM after two of its stages: the "Your own model" example.

    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn
    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn_base \
        --config.model.kwargs.fpcm=False

It follows the protocol of `fpcm_jax.models.imported`: `__call__(x, train, progress)` on NHWC
images in [0, 1], logits out, BatchNorm statistics in `batch_stats`. FPCM takes `progress`, so
its cutoff follows the training curriculum and evaluation runs at the final cutoff. The blocks
are pre-activation residual blocks (He et al. 2016), as in the PreAct ResNets common in
adversarial training; Flax's own Conv, BatchNorm and Dense, nothing from fpcm_jax but FPCM.
"""

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.layers import FPCM


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv, plus the input (a strided 1x1 conv where the shape changes)."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                    dtype=self.dtype)
        conv = lambda stride: nn.Conv(self.width, (3, 3), strides=(stride, stride),
                                      use_bias=False, dtype=self.dtype)
        out = nn.relu(norm()(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = nn.Conv(self.width, (1, 1), strides=(self.stride, self.stride),
                               use_bias=False, dtype=self.dtype)(out)
        out = conv(self.stride)(out)
        out = conv(1)(nn.relu(norm()(out)))
        return out + shortcut


class DigitsCNN(nn.Module):
    """A 3x3 stem, one pre-activation block per stage (the later ones halve the map), BN-ReLU,
    global average pooling and a linear head; FPCM after the stages in `fpcm_after` (counted
    from 1)."""

    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64, 128)
    fpcm: bool = True
    fpcm_after: Sequence[int] = (2, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype)(
            x.astype(self.dtype))
        for stage, width in enumerate(self.widths, 1):
            x = PreActBlock(width, 1 if stage == 1 else 2, self.dtype)(x, train)
            if self.fpcm and stage in self.fpcm_after:
                x = FPCM()(x, progress)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(
            jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
