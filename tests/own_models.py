"""Models of a user's own, named by import path in the tests (`own_models:TinyCNN`, ...).

TinyCNN puts FPCM inside a submodule (found by what it is, not by a stage name); the others
are built to make one rule observable or to break the protocol in one way each.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from fpcm_jax.layers import FPCM, NNXFPCM


class Stage(nn.Module):
    width: int
    fpcm: bool = True

    @nn.compact
    def __call__(self, x, train, progress):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return FPCM(name="freq")(x, progress) if self.fpcm else x


class TinyCNN(nn.Module):
    """Two stages, FPCM inside each (paths stage_a/freq, stage_b/freq)."""

    num_classes: int = 10
    width: int = 8
    fpcm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        x = Stage(self.width, self.fpcm, name="stage_a")(x, train, progress)
        x = Stage(2 * self.width, self.fpcm, name="stage_b")(x, train, progress)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))


def tiny_cnn_factory(width: int = 8, num_classes: int = 10):
    """A function returning the module (the protocol's other form)."""
    return TinyCNN(num_classes=num_classes, width=width)


class ProgressProbe(nn.Module):
    """A linear classifier whose logits gain 10 (1 - progress) on class 0: correct only where
    evaluation runs at the final cutoff (progress 1.0); elsewhere it leans to class 0."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        logits = nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
        lean = 10.0 * (1.0 - jnp.asarray(progress, jnp.float32))
        return logits + lean * jax.nn.one_hot(0, self.num_classes)


class OnGridIsWrong(nn.Module):
    """Class 1 for images off the 1/255 grid, class 0 on it: every uint8 image is misclassified
    clean (label 1), and correctly classified once perturbed by any random start. Its one
    parameter (a scale) keeps the variables non-empty."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        scale = self.param("scale", nn.initializers.ones, ())
        pixels = x.reshape(x.shape[0], -1) * 255.0
        off_grid = jnp.mean(jnp.abs(pixels - jnp.round(pixels)), axis=1)
        score = scale * (1e4 * off_grid - 0.5)  # uint8 / 255 rounds to ~1e-7 off the grid
        others = jnp.full((x.shape[0], self.num_classes - 2), -1e3)
        return jnp.concatenate([jnp.zeros_like(score)[:, None], score[:, None], others], axis=1)


class Constant7(nn.Module):
    """Always class 7, by a margin no trained registry model has: a distinctive output."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        return bias + 100.0 * jax.nn.one_hot(7, self.num_classes) + 0.0 * x[:, :1, 0, 0]


class NNXNet(nnx.Module):
    """An NNX model: conv, BatchNorm (statistics passed as `train` says), NNXFPCM, head."""

    def __init__(self, num_classes: int = 10, width: int = 8, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, width, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.fpcm = NNXFPCM(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.head(self.fpcm(x, progress).mean(axis=(1, 2)))


class NoProgress(nn.Module):
    """Breaks the protocol: __call__ takes no progress."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class WrongShape(nn.Module):
    """Breaks the protocol: one logit per image."""

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        return nn.Dense(1)(x.mean(axis=(1, 2)))


class ExtraCollection(nn.Module):
    """Breaks the protocol: a 'counter' collection the training step would drop."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        calls = self.variable("counter", "calls", jnp.zeros, ())
        calls.value = calls.value + 1
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


NOT_A_MODEL = 42


class ReadsMarker(nn.Module):
    """Predicts the class written into pixel (0, 0, red) as 16 * class + 8 (uint8): corrupted
    test images built with a known number of right markers give known accuracies."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        marker = jnp.floor(jnp.round(x[:, 0, 0, 0] * 255.0) / 16.0).astype(jnp.int32)
        return bias + 10.0 * jax.nn.one_hot(marker, self.num_classes)


class NaNOffGrid(nn.Module):
    """A linear classifier whose logits are NaN wherever an image leaves the 1/255 grid (any
    attack's first step or random start does), and also on every image brighter than
    `nan_above` (mean pixel, in [0, 1]; default never): finite on the clean uint8 images
    unless asked otherwise, a numerically unstable model under attack."""

    num_classes: int = 10
    nan_above: float = 2.0

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        flat = x.reshape(x.shape[0], -1)
        logits = nn.Dense(self.num_classes)(flat)
        pixels = flat * 255.0
        unstable = ((jnp.max(jnp.abs(pixels - jnp.round(pixels)), axis=1) > 1e-3) |
                    (jnp.mean(flat, axis=1) > self.nan_above))
        return jnp.where(unstable[:, None], jnp.nan, logits)


class DropoutNet(nn.Module):
    """A linear classifier with dropout on its input (`nn.Dropout(deterministic=not train)`):
    training draws masks from the `dropout` stream, evaluation none."""

    num_classes: int = 10
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        x = nn.Dropout(self.rate, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class NNXDropoutNet(nnx.Module):
    """DropoutNet in NNX: an `nnx.Dropout` built with the module's rngs."""

    def __init__(self, num_classes: int = 10, rate: float = 0.5, *, rngs: nnx.Rngs):
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(32 * 32 * 3, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False, progress: Any = 1.0):
        return self.head(self.drop(x.reshape(x.shape[0], -1), deterministic=not train))
