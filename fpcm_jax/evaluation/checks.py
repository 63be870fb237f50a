"""The checks of an evaluation's and an analysis's options (`--mode eval`, `--mode analyze`,
`fpcm_jax.evaluate_model`), called once after start-up, before any work; the threat-model
checks are `experiment`'s, shared with training.

A bad value is a one-line `ValueError` that names the option and what to give instead; nothing
is loaded or written before these checks pass. Checks that need a checkpoint's contents (its
model) happen where it is read.

    check_evaluation(config, attack, num_examples, ...)       --mode eval (returns the attacks)
    check_analysis(config, checkpoints, labels)               --mode analyze
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import ml_collections

from fpcm_jax import attacks, experiment, parallel
from fpcm_jax.data import corruptions
from fpcm_jax.runs import loading


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
    experiment.check_threat_model(norm, eps, step_size, config.data)
    if norm == config.attack.norm:  # eps and step default to the config's
        flags = tuple(flag if value is not None else config_flag for flag, config_flag, value
                      in zip(experiment.EVAL_FLAGS, experiment.CONFIG_FLAGS, given))
        experiment.check_radius_fits_norm(
            norm, config.attack.eps if eps is None else eps,
            config.attack.step_size if step_size is None else step_size, flags)
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
