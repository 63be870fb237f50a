"""CIFAR ResNet-18 (3x3 stem, no max-pool), with or without FPCM after each stage, and for
larger images the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool) and ResNet-50's
bottleneck blocks (FPCM after each of its stages too).

ResNet-18 matches the official `ResNet18_FNet` module for module (names mirror its state_dict,
with '.' written '_', so `fpcm_jax.runs.convert` maps one to the other) and PyTorch's default
init. With `fpcm=False` it is the standard CIFAR ResNet-18 that the paper compares against.
ResNet-50 (torchvision's layout, stride on the 3x3 conv) has no official FPCM checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.layers import FPCM
from fpcm_jax.models.common import (BatchNorm, CifarClassifier, ResidualBlock, activation_fn,
                                    check_images, conv, normalize, torch_dense)


class BasicBlock(ResidualBlock):
    """conv-BN-ReLU-conv-BN plus (projection) shortcut, then ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: BatchNorm(name=name)
        out = conv(self.features, 3, self.stride, "conv1", dtype=self.dtype)(x)
        out = activation_fn(self.activation)(norm("bn1")(out, not train))
        out = conv(self.features, 3, 1, "conv2", dtype=self.dtype)(out)
        out = norm("bn2")(out, not train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, "shortcut_0", dtype=self.dtype)(x)
            shortcut = norm("shortcut_1")(shortcut, not train)
        return activation_fn(self.activation)(out + shortcut)


class Bottleneck(ResidualBlock):
    """1x1 (features) - 3x3 (features, the stride) - 1x1 (4 x features), each with BN, plus
    (projection) shortcut, then ReLU: ResNet-50's block."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: BatchNorm(name=name)
        act = activation_fn(self.activation)
        out = act(norm("bn1")(conv(self.features, 1, 1, "conv1", dtype=self.dtype)(x),
                              not train))
        out = act(norm("bn2")(conv(self.features, 3, self.stride, "conv2",
                                   dtype=self.dtype)(out), not train))
        out = norm("bn3")(conv(4 * self.features, 1, 1, "conv3", dtype=self.dtype)(out),
                          not train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != 4 * self.features:
            shortcut = conv(4 * self.features, 1, self.stride, "shortcut_0", dtype=self.dtype)(x)
            shortcut = norm("shortcut_1")(shortcut, not train)
        return act(out + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("cifar", "imagenet")


class ResNet(CifarClassifier):
    """CIFAR-style ResNet; `ResNet()` is ResNet-18 with FPCM, as the official code (raw [0, 1]
    input, cutoff annealed from P/2 to P/8). stem 'imagenet': a 7x7 stride-2 conv and a 3x3
    stride-2 max-pool, for larger images; block 'bottleneck': ResNet-50's."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "cifar"
    block: str = "basic"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, progress: Any = 1.0) -> jax.Array:
        check_images(x, type(self).__name__)
        out = normalize(x.astype(jnp.float32), self.mean, self.std).astype(self.dtype)
        if self.stem == "imagenet":
            out = conv(self.widths[0], 7, 2, "conv1", dtype=self.dtype)(out)
        else:
            out = conv(self.widths[0], 3, 1, "conv1", dtype=self.dtype)(out)
        out = activation_fn(self.activation)(BatchNorm(name="bn1")(out, not train))
        if self.stem == "imagenet":
            out = nn.max_pool(out, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"ResNet needs one width per stage; got stage_sizes "
                             f"{self.stage_sizes} and widths {self.widths}.")
        stages = zip(self.stage_sizes, self.widths, strict=True)
        for stage, (num_blocks, width) in enumerate(stages, 1):
            for block in range(num_blocks):
                stride = 2 if stage > 1 and block == 0 else 1
                name = f"layer{stage}_{block}"
                out = BLOCKS[self.block](width, stride, self.dtype, self.activation,
                                         name=name)(out, train)
            if self.fpcm:
                out = FPCM("depthwise", self.fpcm_variant, self.cutoff_start, self.cutoff_end,
                           self.fpcm_lowpass, self.fpcm_alpha,
                           name=f"attn{stage}")(out, progress)
        out = jnp.mean(out, axis=(1, 2))  # = the official avg_pool2d(4) on a 32x32 input
        logits = torch_dense(self.num_classes, out.shape[-1], "linear", self.dtype)(out)
        return logits.astype(jnp.float32)
