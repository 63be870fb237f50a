"""Adversarial attacks as pure functions of a `logits_fn(x) -> logits`.

    attack = attacks.get("pgd50", eps=8/255)
    x_adv = attack(logits_fn, x, y, key)
"""

from __future__ import annotations

import functools
import re
from typing import Callable

from fpcm_jax.attacks.pgd import cw, cw_margin, fgsm, pgd, pgd_iterate, project, uniform_start

ATTACK_NAMES = ("none", "fgsm", "pgdN (pgd10, pgd20, pgd50, ...)", "cwN (cw50, ...)")


def get(name: str, **options) -> Callable:
    """The attack called `name`, with keyword options (eps, step_size, unroll, ...)."""
    key = name.lower()
    if key == "none":
        return lambda logits_fn, x, y, rng: x
    if key == "fgsm":
        return functools.partial(fgsm, **options)
    match = re.fullmatch(r"(pgd|cw)(\d+)", key)
    if match:
        kind, steps = match.group(1), int(match.group(2))
        return functools.partial(pgd if kind == "pgd" else cw, steps=steps, **options)
    raise ValueError(f"Unknown attack {name!r}; valid: {', '.join(ATTACK_NAMES)}.")


__all__ = ["get", "pgd", "fgsm", "cw", "cw_margin", "pgd_iterate", "project", "uniform_start",
           "ATTACK_NAMES"]
