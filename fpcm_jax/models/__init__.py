"""Model registry: `create("resnet18" | "wrn-<depth>-<width>", num_classes=..., fpcm=...)`."""

from __future__ import annotations

import re

from flax import linen as nn

from fpcm_jax import data
from fpcm_jax.models.resnet import ResNet
from fpcm_jax.models.wide_resnet import WideResNet

_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")
MODEL_NAMES = ("resnet18", "wrn-<depth>-<width> (e.g. wrn-34-10, wrn-28-10, wrn-16-2)")


def create(name: str, num_classes: int = 10, fpcm: bool = True, **kwargs) -> nn.Module:
    """Build a model by name. `fpcm=False` gives the baseline without FPCM.

    Keyword options go to the model: fpcm_variant ('tokens' | 'spatial'), cutoff_start,
    cutoff_end (fractions of P), mean / std (input normalisation, None for none), dtype.
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




def from_config(model_config, num_classes: int, mean=None, std=None) -> nn.Module:
    """The model a `config.model` section describes (normalisation resolved by the caller)."""
    extra = {}
    if model_config.get("widths"):
        extra["widths"] = tuple(model_config.widths)
    if model_config.get("stage_sizes"):
        extra["stage_sizes"] = tuple(model_config.stage_sizes)
    return create(model_config.name, num_classes=num_classes, fpcm=model_config.fpcm,
                  fpcm_variant=model_config.fpcm_variant, cutoff_start=model_config.cutoff_start,
                  cutoff_end=model_config.cutoff_end, mean=mean, std=std, **extra)


def build(config):
    """(model, dataset spec) for an experiment config: its model on its dataset."""
    spec = data.get_spec(config.data.name)
    mean, std = data.normalization(config.model.normalization, spec)
    return from_config(config.model, spec.num_classes, mean, std), spec


__all__ = ["build", "create", "from_config", "ResNet", "WideResNet", "MODEL_NAMES"]
