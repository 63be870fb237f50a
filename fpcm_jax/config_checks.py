"""Every check of a run's options, called once by main.py after start-up, before any work.

A bad value is a one-line `ValueError` that names the option and what to give instead; nothing
is loaded or written before these checks pass. Checks that need the data (a batch larger than
the training split) or a checkpoint's contents (its model) happen where those are read.

    check_training(config)                                    --mode train
    check_evaluation(config, attack, num_examples, ...)       --mode eval (returns the attacks)
    check_analysis(config, checkpoints, labels)               --mode analyze
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

import ml_collections
import numpy as np

from fpcm_jax import (attacks, corruptions, data, experiment, layers, loading, losses, models,
                      parallel)
from fpcm_jax import train_step

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
               ("data.name", config.data.name, tuple(data.DATASETS))]
    for name, value, valid in choices:
        if value not in valid:
            raise ValueError(f"--config.{name}={value!r} is not valid; use one of {valid}.")


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
    check_threat_model(config.attack.norm, config.attack.eps, config.attack.step_size,
                       config.data.name, CONFIG_FLAGS)
    check_radius_fits_norm(config.attack.norm, config.attack.eps, config.attack.step_size)
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


def largest_distance(norm: str, dataset: str) -> float:
    """The largest distance two images of the dataset can have in `norm` (L-inf 1; L2
    sqrt(H W C)): a radius beyond it means nothing."""
    if norm == "linf":
        return 1.0
    size = data.get_spec(dataset).image_size
    return math.sqrt(size * size * 3)


EVAL_FLAGS = ("--norm", "--eps", "--step_size")
CONFIG_FLAGS = ("--config.attack.norm", "--config.attack.eps", "--config.attack.step_size")


def check_threat_model(norm: str, eps: Optional[float], step_size: Optional[float],
                       dataset: str, flags=EVAL_FLAGS) -> None:
    """norm one of attacks.NORMS, 0 < eps <= the largest distance of two images in that norm,
    0 <= step_size <= that distance (None: not given); `flags` name the three in errors."""
    if norm not in attacks.NORMS:
        raise ValueError(f"{flags[0]}={norm!r} is not a threat model; use one of "
                         f"{', '.join(attacks.NORMS)}.")
    bound = largest_distance(norm, dataset)
    usual = "8/255 is 0.03137" if norm == "linf" else "0.5 is usual"
    for flag, value, interval in ((flags[1], eps, f"(0, {bound:.5g}]"),
                                  (flags[2], step_size, f"[0, {bound:.5g}]")):
        if value is None:
            continue
        low_ok = value > 0 if flag == flags[1] else value >= 0
        if not (low_ok and value <= bound and np.isfinite(value)):
            raise ValueError(f"{flag}={value} must lie in {interval} for the {norm} norm on "
                             f"{dataset} (the largest {norm} distance of two images is "
                             f"{bound:.5g}; {usual}).")


def check_radius_fits_norm(norm: str, eps: float, step_size: float,
                           flags=CONFIG_FLAGS) -> None:
    """Refuse an eps or step that is another norm's usual value, e.g. --config.attack.norm=l2
    left with L-inf's 8/255 (an L2 ball of radius 0.03 on 32x32x3 images is meaningless)."""
    for other in attacks.NORMS:
        if other == norm:
            continue
        for flag, value, usual in ((flags[1], eps, attacks.DEFAULT_EPS[other]),
                                   (flags[2], step_size, attacks.DEFAULT_STEP_SIZE[other])):
            if value is not None and math.isclose(value, usual, rel_tol=1e-9):
                raise ValueError(
                    f"{flags[0]}={norm} with {flag}={value:.6g}, the usual {other} value: "
                    f"give the {norm} radius and step too, e.g. {flags[1]}="
                    f"{attacks.DEFAULT_EPS[norm]:.6g} {flags[2]}="
                    f"{attacks.DEFAULT_STEP_SIZE[norm]:.6g} (as configs/cifar10_resnet18_l2.py"
                    f" does for l2).")


def attack_names(text: str, norm: str = "linf") -> List[str]:
    """'pgd20,autoattack' -> ['pgd20', 'autoattack']; an unknown name, or one not defined in
    the threat model `norm`, is a clear error."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in ("autoattack", "corruptions"):
            attacks.get(name)  # raises ValueError listing the valid names
            attacks.check_supports(name, norm)
    if not names:
        raise ValueError(f"--attack is empty; valid: {', '.join(attacks.ATTACK_NAMES)}.")
    return names


def check_evaluation(config: ml_collections.ConfigDict, attack: str,
                     num_examples: Optional[int] = None, batch_size: Optional[int] = None,
                     eps: Optional[float] = None, step_size: Optional[float] = None,
                     norm: Optional[str] = None, split: str = "test",
                     corruption_names: Optional[Sequence[str]] = None,
                     severities: Optional[Sequence[int]] = None) -> List[str]:
    """The options of --mode eval; returns the attack names."""
    _check_corruption_options(config, attack, split, corruption_names, severities)
    given = (norm, eps, step_size)
    norm = config.attack.norm if norm is None else norm
    check_threat_model(norm, eps, step_size, config.data.name)
    if norm == config.attack.norm:  # eps and step default to the config's
        flags = tuple(flag if value is not None else config_flag
                      for flag, config_flag, value in zip(EVAL_FLAGS, CONFIG_FLAGS, given))
        check_radius_fits_norm(norm, config.attack.eps if eps is None else eps,
                               config.attack.step_size if step_size is None else step_size,
                               flags)
    names = attack_names(attack, norm)
    for name, value in (("--num_examples", num_examples), ("--batch_size", batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be positive (leave it out for "
                             f"{'all examples' if name == '--num_examples' else 'the default'}).")
    parallel.check_batch_size(batch_size or config.eval.batch_size, "--batch_size")
    return names


def _check_corruption_options(config, attack: str, split: str,
                              corruption_names: Optional[Sequence[str]],
                              severities: Optional[Sequence[int]]) -> None:
    """--attack corruptions (on the test split of a dataset that has them), --corruptions and
    --severities only with it, --split cifar10.1 only for CIFAR-10."""
    asked = "corruptions" in [name.strip().lower() for name in attack.split(",")]
    if (corruption_names or severities) and not asked:
        raise ValueError("--corruptions and --severities choose what --attack corruptions "
                         "evaluates: add corruptions to --attack.")
    if asked:
        corruptions.check_request(config.data.name, corruption_names, severities)
        if split != "test":
            raise ValueError(f"--attack corruptions corrupts the test split's images; "
                             f"--split {split} has none (leave --split out).")
    if split == "cifar10.1" and config.data.name != "cifar10":
        raise ValueError(f"--split cifar10.1 is a new test set of CIFAR-10; the config's "
                         f"dataset is {config.data.name}.")


def check_analysis(config: ml_collections.ConfigDict, checkpoints: Optional[Sequence[str]],
                   labels: Optional[Sequence[str]] = None) -> None:
    """The options of --mode analyze; every checkpoint named must exist."""
    if not checkpoints:
        raise ValueError("--mode analyze needs --checkpoints A,B,... (run directories or model "
                         "checkpoints).")
    settings = config.analysis
    for name in ("num_examples", "bands", "heatmap_examples", "feature_examples"):
        if not isinstance(settings[name], int) or settings[name] < 1:
            raise ValueError(f"--config.analysis.{name}={settings[name]!r} must be an integer "
                             f">= 1.")
    if not isinstance(settings.filter_steps, int) or settings.filter_steps < 2:
        raise ValueError(f"--config.analysis.filter_steps={settings.filter_steps!r} must be an "
                         f"integer >= 2.")
    for name in ("noise_l2_norm", "heatmap_l2_norm"):
        if not settings[name] > 0:
            raise ValueError(f"--config.analysis.{name}={settings[name]!r} must be positive.")
    if labels and len(labels) != len(checkpoints):
        raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints.")
    for path in checkpoints:
        loading.model_checkpoints(path, flag="--checkpoints")
