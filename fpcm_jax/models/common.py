"""Building blocks shared by the CIFAR models: PyTorch-matching conv, BatchNorm and init."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.layers import torch_uniform_init

# PyTorch's default conv/linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def conv(features: int, kernel: int, stride: int = 1, name: Optional[str] = None,
         kernel_init=torch_default_kernel_init, dtype: Any = jnp.float32) -> nn.Conv:
    """Bias-free conv padded like PyTorch (kernel//2 on every side, also for stride 2).

    Flax 'SAME' pads (0, 1) for a stride-2 3x3 conv on an even map, PyTorch (1, 1).
    """
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=kernel_init, dtype=dtype, name=name)


def torch_dense(features: int, in_features: int, name: str, dtype: Any = jnp.float32,
                zero_bias: bool = False) -> nn.Dense:
    """nn.Linear with PyTorch's default init (bias zero when the model sets it so)."""
    bias_init = nn.initializers.zeros if zero_bias else torch_uniform_init(in_features)
    return nn.Dense(features, kernel_init=torch_default_kernel_init, bias_init=bias_init,
                    dtype=dtype, name=name)


ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}  # swish = SiLU, x * sigmoid(x)


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; use one of {tuple(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class BatchNorm(nn.Module):
    """BatchNorm over all but the channel axis, with PyTorch's exact semantics.

    Normalises with the biased batch variance but, as PyTorch does, updates the running
    variance with the unbiased one (n / (n - 1)); `unbiased_running_var=False` gives Flax's
    behaviour. Statistics are computed in float32 whatever the input dtype. Under `jax.jit`
    with a batch sharded over devices the statistics are those of the global batch.
    """

    momentum: float = 0.9  # PyTorch momentum 0.1
    epsilon: float = 1e-5
    unbiased_running_var: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axes)
            var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                count = x.size // channels
                correction = count / max(count - 1, 1) if self.unbiased_running_var else 1.0
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * var * correction
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * multiplier
        return (x * multiplier.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


def normalize(x: jax.Array, mean: Optional[Sequence[float]],
              std: Optional[Sequence[float]]) -> jax.Array:
    """(x - mean) / std per channel when statistics are given; models take [0, 1] images."""
    if mean is None:
        return x
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def check_images(x: jax.Array, model_name: str) -> None:
    """Raise a clear error unless x is a batch of NHWC RGB images."""
    if getattr(x, "ndim", None) != 4 or x.shape[-1] != 3:
        raise ValueError(f"{model_name} expects images of shape (batch, height, width, 3) with "
                         f"values in [0, 1]; got shape {getattr(x, 'shape', None)}. "
                         f"(NCHW arrays need x.transpose(0, 2, 3, 1).)")


class ResidualBlock(nn.Module):
    """The fields of a residual block (its `__call__` is the architecture's)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    activation: str = "relu"  # relu (official) | swish


class CifarClassifier(nn.Module):
    """The fields every model here has (each architecture sets its official defaults)."""

    num_classes: int = 10
    fpcm: bool = True
    fpcm_variant: str = "tokens"
    cutoff_start: float = 0.5
    cutoff_end: float = 0.125
    mean: Optional[Sequence[float]] = None  # None: raw [0, 1] input
    std: Optional[Sequence[float]] = None
    fpcm_lowpass: str = "auto"  # fft | matmul | auto: how FPCM computes its filter (same result)
    fpcm_alpha: Optional[float] = None  # None: learned alpha (the paper); a constant in [0, 1]
    dtype: Any = jnp.float32
    activation: str = "relu"  # relu (official) | swish

