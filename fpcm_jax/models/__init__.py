"""Model registry: `create("resnet18" | "resnet50" | "wrn-<depth>-<width>", num_classes=...,
fpcm=...)`."""

from __future__ import annotations

import re
from typing import Any, Dict

import jax
import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax.models.common import ACTIVATIONS  # noqa: F401  (the valid model.activation)
from fpcm_jax.models.common import CifarClassifier
from fpcm_jax.models.resnet import STEMS, ResNet  # noqa: F401  (STEMS: the valid model.stem)
from fpcm_jax.models.wide_resnet import WideResNet

_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")
MODEL_NAMES = ("resnet18", "resnet50",
               "wrn-<depth>-<width> (e.g. wrn-34-10, wrn-28-10, wrn-16-2)")
RESNETS = {"resnet18": {}, "resnet-18": {},
           "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"},
           "resnet-50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"}}


def is_wide_resnet_name(name: str) -> bool:
    """'wrn-<depth>-<width>' with depth 6n+4."""
    match = _WRN_NAME.match(name.lower())
    return bool(match) and (int(match.group(1)) - 4) % 6 == 0


def create(name: str, num_classes: int = 10, fpcm: bool = True, **kwargs) -> nn.Module:
    """Build a model by name. `fpcm=False` gives the baseline without FPCM.

    Keyword options go to the model: fpcm_variant ('tokens' | 'spatial'), cutoff_start,
    cutoff_end (fractions of P), fpcm_lowpass ('auto' | 'fft' | 'matmul'), mean / std (input
    normalisation, None for none), dtype (computation dtype, e.g. jnp.bfloat16; parameters and
    BatchNorm statistics stay float32).
    """
    key = name.lower()
    if key in RESNETS:
        return ResNet(num_classes=num_classes, fpcm=fpcm, **{**RESNETS[key], **kwargs})
    match = _WRN_NAME.match(key)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        if (depth - 4) % 6:
            raise ValueError(f"Model {name!r}: WideResNet depth must be 6n+4 (16, 22, 28, 34, ...).")
        return WideResNet(depth=depth, widen_factor=width, num_classes=num_classes, fpcm=fpcm,
                          **kwargs)
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")


def _dummy_input(image_size: int) -> jax.Array:
    return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


def init_rngs(key: jax.Array) -> Dict[str, jax.Array]:
    """The streams a model is initialised with: `params` (the key itself, so the values are
    those of `model.init(key, ...)`) and `dropout`, which an NNX Dropout needs to be built."""
    return {"params": key, "dropout": jax.random.fold_in(key, 1)}


def variables_template(model: nn.Module, image_size: int = 32) -> Dict[str, Any]:
    """Shapes and dtypes of the model's variables, without computing anything."""
    dummy = _dummy_input(image_size)
    return jax.eval_shape(lambda: model.init(init_rngs(jax.random.key(0)), dummy, train=False))


def init_variables(model: nn.Module, key: jax.Array, image_size: int = 32) -> Dict[str, Any]:
    """The model's initial variables, the same values as `model.init(key, ...)`.

    Flax's init run op by op compiles every random-number op on its own: on XLA:CPU the
    first initialisation of a small ResNet-18 took 45-50 s. One jitted init compiles in 30 s
    there at the default optimisation level and in 1.5 s at level 0, which is all a program
    that runs once needs; the values are equal bit for bit (measured on widths 8-64).
    """
    dummy = _dummy_input(image_size)
    init = jax.jit(lambda init_key: model.init(init_rngs(init_key), dummy, train=False))
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower(key).compile(compiler_options=options)(key)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype for `config.model.dtype`, with a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"Unknown model.dtype {name!r}; use one of {tuple(DTYPES)} "
                         f"(bfloat16 = mixed precision: float32 parameters and BN statistics).")
    return DTYPES[name]


__all__ = ["compute_dtype", "create", "variables_template", "DTYPES", "ResNet", "WideResNet",
           "MODEL_NAMES", "CifarClassifier"]
