"""The checks of a training run's options (`--mode train`, `fpcm_jax.train_and_evaluate`), called
once after start-up, before any work.

A bad value is a one-line `ValueError` that names the option and what to give instead; nothing
is loaded or written before these checks pass. Checks that need the data (a batch larger than
the training split) happen where the data are read. The threat model's checks are
`experiment`'s, shared with evaluation.

    check_training(config)
"""

from __future__ import annotations

import math
import os

import ml_collections

from fpcm_jax import attacks, experiment, layers, models, parallel
from fpcm_jax.data import augmentation, datasets, sources
from fpcm_jax.training import losses, train_step


def check_training(config: ml_collections.ConfigDict) -> None:
    """Every option of a training run (unknown keys are caught when the flags are parsed)."""
    _check_choices(config)
    _check_counts(config)
    _check_ranges(config)
    _check_extra_data(config.data, config.train.batch_size)
    experiment.check_options(experiment.describe(config), config.model.dtype)
    parallel.check_batch_size(config.train.batch_size)
    parallel.check_batch_size(config.eval.batch_size, "eval.batch_size")


def _check_choices(config: ml_collections.ConfigDict) -> None:
    choices = [("train.loss", config.train.loss, losses.LOSS_NAMES),
               ("train.schedule", config.train.schedule, train_step.SCHEDULES),
               ("train.schedule_per", config.train.schedule_per, ("epoch", "step")),
               ("train.trades_attack", config.train.trades_attack, ("ce", "kl")),
               ("train.trades_l2_attack", config.train.trades_l2_attack,
                train_step.TRADES_L2_ATTACKS),
               ("train.mart_attack_start", config.train.mart_attack_start,
                train_step.MART_ATTACK_STARTS),
               ("attack.bn_mode", config.attack.bn_mode, train_step.BN_MODES),
               ("attack.norm", config.attack.norm, attacks.NORMS),
               ("train.ema_batch_stats", config.train.ema_batch_stats, ("copy", "average")),
               ("attack.loop", config.attack.loop, tuple(train_step.ATTACK_LOOPS)),
               ("model.dtype", config.model.dtype, tuple(models.DTYPES)),
               ("model.fpcm_lowpass", config.model.fpcm_lowpass, layers.LOWPASS_IMPLS),
               ("data.augment", config.data.augment, augmentation.AUGMENTATIONS),
               ("data.name", config.data.name, tuple(datasets.DATASETS))]
    for name, value, valid in choices:
        if value not in valid and not (name == "data.name" and sources.is_external(value)):
            raise ValueError(f"--config.{name}={value!r} is not valid; use one of {valid}"
                             f"{', or tfds:NAME / folder:PATH' if name == 'data.name' else ''}.")
    datasets.spec_for(config.data)  # your own data: opened (and its errors named) now


def _check_counts(config: ml_collections.ConfigDict) -> None:
    at_least = [("train.epochs", config.train.epochs, 1),
                ("train.checkpoint_every_steps", config.train.checkpoint_every_steps, 0),
                ("train.stop_after_steps", config.train.stop_after_steps, 0),
                ("train.eval_every_epochs", config.train.eval_every_epochs, 0),
                ("train.final_test_attack_steps", config.train.final_test_attack_steps, 0),
                ("attack.steps", config.attack.steps, 0),
                ("eval.attack_steps", config.eval.attack_steps, 0),
                ("train.warmup_epochs", config.train.warmup_epochs, 0),
                ("train.awp_warmup_epochs", config.train.awp_warmup_epochs, 0),
                ("data.validation_size", config.data.validation_size, 0),
                ("data.crop_padding", config.data.crop_padding, 0)]
    for name, value, least in at_least:
        if not isinstance(value, int) or value < least:
            raise ValueError(f"--config.{name}={value!r} must be an integer >= {least}.")


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    attack = config.attack
    experiment.check_threat_model(attack.norm, attack.eps, attack.step_size, config.data,
                                  experiment.CONFIG_FLAGS)
    experiment.check_radius_fits_norm(attack.norm, attack.eps, attack.step_size)
    if not config.train.lr > 0:
        raise ValueError(f"--config.train.lr={config.train.lr!r} must be positive.")
    for name, value, low, high in [("train.momentum", config.train.momentum, 0, 1),
                                   ("train.weight_decay", config.train.weight_decay, 0, math.inf),
                                   ("train.beta", config.train.beta, 0, math.inf),
                                   ("train.awp_gamma", config.train.awp_gamma, 0, 1),
                                   ("train.ema_decay", config.train.ema_decay, 0, 1),
                                   ("train.ema_warmup_fraction", config.train.ema_warmup_fraction,
                                    0, 1),
                                   ("train.label_smoothing", config.train.label_smoothing, 0, 1),
                                   ("data.extra_fraction", config.data.extra_fraction, 0, 1)]:
        if not low <= value < high:
            raise ValueError(f"--config.{name}={value!r} must lie in [{low}, {high}).")


def _check_extra_data(data_cfg: ml_collections.ConfigDict, batch_size: int) -> None:
    if bool(data_cfg.extra_path) != (data_cfg.extra_fraction > 0):
        raise ValueError(f"--config.data.extra_fraction={data_cfg.extra_fraction} and "
                         f"--config.data.extra_path={data_cfg.extra_path!r} go together: give "
                         f"the extra data's .npz with a fraction > 0 (e.g. 0.7), or neither.")
    if data_cfg.extra_path and not os.path.exists(data_cfg.extra_path):
        raise ValueError(f"--config.data.extra_path={data_cfg.extra_path!r} does not exist.")
    extra_count = round(batch_size * data_cfg.extra_fraction)
    if data_cfg.extra_path and not 0 < extra_count < batch_size:
        raise ValueError(f"--config.data.extra_fraction={data_cfg.extra_fraction} leaves "
                         f"{extra_count} extra images in a batch of {batch_size}: choose a "
                         f"fraction that gives between 1 and {batch_size - 1}.")
