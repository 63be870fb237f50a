"""Adversarial attacks as pure functions of a `logits_fn(x) -> logits` (L-inf, x in [0, 1]).

    attack = attacks.get("pgd50", eps=8/255)
    x_adv = attack(logits_fn, x, y, key)
    result = attacks.autoattack(logits_fn, x, y, key, eps=8/255)

Names: none, fgsm, pgdN (pgd10, pgd20, pgd50, ...), cwN, apgd-ce, apgd-dlr, apgd-t, fab-t,
square. AutoAttack (the standard ensemble, run over a whole set with per-point flags and
sanity checks) is `autoattack`.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

from fpcm_jax.attacks.apgd import (apgd, apgd_stage, apgd_targeted, checkpoint_schedule, dlr_loss,
                                   dlr_targeted_loss)
from fpcm_jax.attacks.autoattack import STANDARD, autoattack
from fpcm_jax.attacks.fab import fab_targeted, fab_targeted_stage, projection_linf
from fpcm_jax.attacks.pgd import cw, cw_margin, fgsm, pgd, pgd_iterate, project, uniform_start
from fpcm_jax.attacks.square import p_selection, square_attack, square_stage

ATTACK_NAMES = ("none", "fgsm", "pgdN", "cwN", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t",
                "square", "autoattack")

_FIXED = {
    "apgd-ce": functools.partial(apgd, loss="ce"),
    "apgd-dlr": functools.partial(apgd, loss="dlr"),
    "apgd-t": apgd_targeted,
    "fab-t": fab_targeted,
    "square": square_attack,
}


def get(name: str, **options) -> Callable:
    """The attack called `name` as attack(logits_fn, x, y, key) -> x_adv, with options
    (eps, step_size, n_iter, n_queries, ...) as keywords."""
    key = name.lower()
    if key == "none":
        return lambda logits_fn, x, y, rng: x
    if key == "fgsm":
        return functools.partial(fgsm, **options)
    if key in _FIXED:
        return functools.partial(_FIXED[key], **options)
    match = re.fullmatch(r"(pgd|cw)(\d+)", key)
    if match:
        kind, steps = match.group(1), int(match.group(2))
        if steps < 1:
            raise ValueError(f"Attack {name!r} has no steps; give N >= 1 (e.g. {kind}20), or "
                             f"'none' for clean accuracy.")
        return functools.partial(pgd if kind == "pgd" else cw, steps=steps, **options)
    raise ValueError(f"Unknown attack {name!r}; valid: {', '.join(ATTACK_NAMES)} "
                     f"(N = number of steps, e.g. pgd50).")


__all__ = ["get", "autoattack", "STANDARD", "ATTACK_NAMES", "pgd", "fgsm", "cw", "cw_margin",
           "pgd_iterate", "project", "uniform_start", "apgd", "apgd_stage", "apgd_targeted",
           "checkpoint_schedule", "dlr_loss", "dlr_targeted_loss", "fab_targeted", "fab_targeted_stage",
           "projection_linf", "square_attack", "square_stage", "p_selection"]
