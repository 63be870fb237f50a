"""The attacks by name: how to build each one and, for AutoAttack's components, its stage.

    attack = get("pgd50", eps=8/255)       # attack(logits_fn, x, y, key) -> x_adv
    entry = component("apgd-t")            # entry.stage, entry.targeted: for AutoAttack

A name ending in N (pgdN, cwN) stands for a family: pgd50 is PGD with steps=50.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fpcm_jax.attacks.apgd import apgd, apgd_stage, apgd_targeted
from fpcm_jax.attacks.fab import fab_targeted, fab_targeted_stage
from fpcm_jax.attacks.pgd import cw, fgsm, pgd
from fpcm_jax.attacks.square import square_attack, square_stage


class Attack(NamedTuple):
    """One attack of the registry.

    build(**options) -> attack(logits_fn, x, y, key) -> x_adv (a family's build also takes
    steps). stage: None if the attack is no AutoAttack component, else
    stage(logits_fn, x, y, keys, shared_key, target_rank, eps=, n_iter=, n_queries=) ->
    (x_adv, robust, zero-gradient flags) for one batch. targeted: AutoAttack runs one stage per
    target class (else one stage, target_rank 0). step_sized: a fixed-step attack from a
    random start in the ball (pgdN, cwN), which takes a step_size.
    """
    build: Callable[..., Callable]
    stage: Optional[Callable] = None
    targeted: bool = False
    step_sized: bool = False


def _with(attack: Callable, **fixed) -> Callable[..., Callable]:
    """build(**options) -> `attack` with `fixed` and then `options` as keywords."""
    return lambda **options: functools.partial(attack, **{**fixed, **options})


def _identity(logits_fn, x, y, rng):
    """The 'none' attack: the clean images."""
    return x


def _no_flags(y: jax.Array) -> jax.Array:
    return jnp.zeros(y.shape, bool)


def _apgd_ce_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries):
    return apgd_stage(logits_fn, x, y, keys, eps, n_iter, "ce")


def _apgd_t_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries):
    return apgd_stage(logits_fn, x, y, keys, eps, n_iter, "dlr-targeted", target_rank)


def _fab_t_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries):
    return (*fab_targeted_stage(logits_fn, x, y, keys, eps, target_rank, n_iter), _no_flags(y))


def _square_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries):
    x_adv, robust = square_stage(logits_fn, x, y, keys, eps, n_queries, shared_key=shared_key)
    return x_adv, robust, _no_flags(y)


ATTACKS = {
    "none": Attack(lambda **options: _identity),
    "fgsm": Attack(_with(fgsm)),
    "pgdN": Attack(_with(pgd), step_sized=True),
    "cwN": Attack(_with(cw), step_sized=True),
    "apgd-ce": Attack(_with(apgd, loss="ce"), _apgd_ce_stage),
    "apgd-dlr": Attack(_with(apgd, loss="dlr")),
    "apgd-t": Attack(_with(apgd_targeted), _apgd_t_stage, targeted=True),
    "fab-t": Attack(_with(fab_targeted), _fab_t_stage, targeted=True),
    "square": Attack(_with(square_attack), _square_stage),
}
ATTACK_NAMES = tuple(ATTACKS) + ("autoattack",)
# AutoAttack's components; a component's position here seeds its random keys.
COMPONENTS = tuple(name for name, entry in ATTACKS.items() if entry.stage is not None)


def takes_step_size(name: str) -> bool:
    """Whether the attack `name` (e.g. pgd20) steps by a step_size from a random start."""
    family = re.fullmatch(r"([a-z]+)(\d+)", name.lower())
    entry = ATTACKS.get(f"{family.group(1)}N" if family else name.lower())
    return entry is not None and entry.step_sized


def options_for(name: str, eps: float, step_size: float) -> Dict[str, float]:
    """The keyword options `get(name, ...)` takes for an evaluation at radius eps."""
    if name.lower() == "none":
        return {}
    return {"eps": eps, **({"step_size": step_size} if takes_step_size(name) else {})}


def get(name: str, **options) -> Callable:
    """The attack called `name` as attack(logits_fn, x, y, key) -> x_adv, with options
    (eps, step_size, n_iter, n_queries, ...) as keywords."""
    key = name.lower()
    family = re.fullmatch(r"([a-z]+)(\d+)", key)
    entry = ATTACKS.get(f"{family.group(1)}N" if family else key)
    if entry is None:
        raise ValueError(f"Unknown attack {name!r}; valid: {', '.join(ATTACK_NAMES)} "
                         f"(N = number of steps, e.g. pgd50).")
    if not family:
        return entry.build(**options)
    kind, steps = family.group(1), int(family.group(2))
    if steps < 1:
        raise ValueError(f"Attack {name!r} has no steps; give N >= 1 (e.g. {kind}20), or "
                         f"'none' for clean accuracy.")
    return entry.build(steps=steps, **options)


def component(name: str) -> Attack:
    """AutoAttack's component called `name`; a clear error for any other name."""
    entry = ATTACKS.get(name)
    if entry is None or entry.stage is None:
        raise ValueError(f"Unknown AutoAttack component {name!r}; valid: "
                         f"{', '.join(COMPONENTS)}.")
    return entry
