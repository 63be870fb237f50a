"""WideResNet-(6n+4)-k (pre-activation blocks), with or without FPCM after each group.

Matches the official `WideResNet` module for module (names mirror its state_dict, with '.'
written '_') and its init: conv N(0, 2 / (kh*kw*out)), BN 1/0, linear bias 0. The official
model normalises inputs inside with CIFAR-10 statistics whatever the dataset; that is the
default here, and `mean`/`std` (or None for none) override it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.layers import FPCM
from fpcm_jax.models.common import (CIFAR10_MEAN, CIFAR10_STD, BatchNorm, CifarClassifier,
                                    ResidualBlock, activation_fn, check_images, conv, normalize,
                                    torch_dense)

wrn_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PreActBlock(ResidualBlock):
    """BN-ReLU-conv-BN-ReLU-conv; the shortcut conv (when shapes change) sees BN-ReLU(x)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        make_conv = lambda k, s, name: conv(self.features, k, s, name, wrn_conv_init, self.dtype)
        equal_in_out = x.shape[-1] == self.features
        activated = activation_fn(self.activation)(BatchNorm(name="bn1")(x, not train))
        out = make_conv(3, self.stride, "conv1")(activated)
        out = activation_fn(self.activation)(BatchNorm(name="bn2")(out, not train))
        out = make_conv(3, 1, "conv2")(out)
        shortcut = x if equal_in_out else make_conv(1, self.stride, "convShortcut")(activated)
        return shortcut + out


class WideResNet(CifarClassifier):
    """WRN-depth-widen; `WideResNet()` is WRN-34-10 with FPCM (fixed cutoff P/8), as official."""

    depth: int = 34
    widen_factor: int = 10
    cutoff_start: float = 0.125  # the official WRN uses a fixed D0 = P // 8
    mean: Optional[Sequence[float]] = CIFAR10_MEAN
    std: Optional[Sequence[float]] = CIFAR10_STD

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, progress: Any = 1.0) -> jax.Array:
        check_images(x, type(self).__name__)
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 34, ...); "
                             f"got {self.depth}.")
        blocks_per_group = (self.depth - 4) // 6
        widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
        out = normalize(x.astype(jnp.float32), self.mean, self.std).astype(self.dtype)
        out = conv(16, 3, 1, "conv1", wrn_conv_init, self.dtype)(out)
        for group, width in enumerate(widths, 1):
            for block in range(blocks_per_group):
                stride = 2 if group > 1 and block == 0 else 1
                out = PreActBlock(width, stride, self.dtype, self.activation,
                                  name=f"block{group}_layer_{block}")(out, train)
            if self.fpcm:
                out = FPCM("dense", self.fpcm_variant, self.cutoff_start, self.cutoff_end,
                           self.fpcm_lowpass, self.fpcm_alpha,
                           name=f"attn{group}")(out, progress)
        out = activation_fn(self.activation)(BatchNorm(name="bn1")(out, not train))
        out = jnp.mean(out, axis=(1, 2))  # = the official avg_pool2d(8) on a 32x32 input
        logits = torch_dense(self.num_classes, out.shape[-1], "fc", self.dtype, zero_bias=True)(out)
        return logits.astype(jnp.float32)
