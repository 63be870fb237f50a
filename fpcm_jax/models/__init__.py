"""Model registry: `create("resnet18" | "wrn-<depth>-<width>", num_classes=..., fpcm=...)`."""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import linen as nn

from fpcm_jax import data
from fpcm_jax.models.resnet import ResNet
from fpcm_jax.models.wide_resnet import WideResNet

_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")
MODEL_NAMES = ("resnet18", "wrn-<depth>-<width> (e.g. wrn-34-10, wrn-28-10, wrn-16-2)")


def create(name: str, num_classes: int = 10, fpcm: bool = True, **kwargs) -> nn.Module:
    """Build a model by name. `fpcm=False` gives the baseline without FPCM.

    Keyword options go to the model: fpcm_variant ('tokens' | 'spatial'), cutoff_start,
    cutoff_end (fractions of P), fpcm_lowpass ('auto' | 'fft' | 'matmul'), mean / std (input
    normalisation, None for none), dtype (computation dtype, e.g. jnp.bfloat16; parameters and
    BatchNorm statistics stay float32).
    """
    key = name.lower()
    if key in ("resnet18", "resnet-18"):
        return ResNet(num_classes=num_classes, fpcm=fpcm, **kwargs)
    match = _WRN_NAME.match(key)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        if (depth - 4) % 6:
            raise ValueError(f"Model {name!r}: WideResNet depth must be 6n+4 (16, 22, 28, 34, ...).")
        return WideResNet(depth=depth, widen_factor=width, num_classes=num_classes, fpcm=fpcm,
                          **kwargs)
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype for `config.model.dtype`, with a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"Unknown model.dtype {name!r}; use one of {tuple(DTYPES)} "
                         f"(bfloat16 = mixed precision: float32 parameters and BN statistics).")
    return DTYPES[name]


def from_config(model_config, num_classes: int, mean=None, std=None) -> nn.Module:
    """The model a `config.model` section describes (normalisation resolved by the caller)."""
    extra = {}
    if model_config.get("widths"):
        extra["widths"] = tuple(model_config.widths)
    if model_config.get("stage_sizes"):
        extra["stage_sizes"] = tuple(model_config.stage_sizes)
    return create(model_config.name, num_classes=num_classes, fpcm=model_config.fpcm,
                  fpcm_variant=model_config.fpcm_variant, cutoff_start=model_config.cutoff_start,
                  cutoff_end=model_config.cutoff_end,
                  fpcm_lowpass=model_config.fpcm_lowpass,
                  dtype=compute_dtype(model_config.dtype), mean=mean, std=std, **extra)


def build(config):
    """(model, dataset spec) for an experiment config: its model on its dataset."""
    spec = data.get_spec(config.data.name)
    mean, std = data.normalization(config.model.normalization, spec)
    return from_config(config.model, spec.num_classes, mean, std), spec


__all__ = ["build", "compute_dtype", "create", "from_config", "DTYPES", "ResNet", "WideResNet",
           "MODEL_NAMES"]
