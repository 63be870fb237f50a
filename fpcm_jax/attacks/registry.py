"""The attacks by name: how to build each one and, for AutoAttack's components, its stage.

    attack = get("pgd50", eps=8/255)       # attack(logits_fn, x, y, key) -> x_adv
    entry = component("apgd-t")            # entry.stage, entry.targeted: for AutoAttack

A name ending in N (pgdN, cwN) stands for a family: pgd50 is PGD with steps=50.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from fpcm_jax.attacks._common import NORMS, check_norm
from fpcm_jax.attacks.apgd import apgd, apgd_stage, apgd_targeted
from fpcm_jax.attacks.fab import fab_targeted, fab_targeted_stage
from fpcm_jax.attacks.pgd import cw, fgm, fgsm, pgd
from fpcm_jax.attacks.square import square_attack, square_stage


class Attack(NamedTuple):
    """One attack of the registry.

    build(**options) -> attack(logits_fn, x, y, key) -> x_adv (a family's build also takes
    steps). stage: None if the attack is no AutoAttack component, else
    stage(logits_fn, x, y, keys, shared_key, target_rank, eps=, n_iter=, n_queries=, norm=) ->
    (x_adv, robust, zero-gradient flags) for one batch. targeted: AutoAttack runs one stage per
    target class (else one stage, target_rank 0). step_sized: a fixed-step attack from a
    random start in the ball (pgdN, cwN), which takes a step_size. norms: the threat models
    it is defined for.
    """
    build: Callable[..., Callable]
    stage: Optional[Callable] = None
    targeted: bool = False
    step_sized: bool = False
    norms: Tuple[str, ...] = NORMS


def _with(attack: Callable, **fixed) -> Callable[..., Callable]:
    """build(**options) -> `attack` with `fixed` and then `options` as keywords."""
    return lambda **options: functools.partial(attack, **{**fixed, **options})


def _identity(logits_fn, x, y, rng):
    """The 'none' attack: the clean images."""
    return x


def _no_flags(y: jax.Array) -> jax.Array:
    return jnp.zeros(y.shape, bool)


def _apgd_ce_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries,
                   norm):
    return apgd_stage(logits_fn, x, y, keys, eps, n_iter, "ce", norm=norm)


def _apgd_t_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries, norm):
    return apgd_stage(logits_fn, x, y, keys, eps, n_iter, "dlr-targeted", target_rank,
                      norm=norm)


def _fab_t_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries, norm):
    return (*fab_targeted_stage(logits_fn, x, y, keys, eps, target_rank, n_iter, norm=norm),
            _no_flags(y))


def _square_stage(logits_fn, x, y, keys, shared_key, target_rank, eps, n_iter, n_queries, norm):
    x_adv, robust = square_stage(logits_fn, x, y, keys, eps, n_queries, shared_key=shared_key,
                                 norm=norm)
    return x_adv, robust, _no_flags(y)


ATTACKS = {
    "none": Attack(lambda **options: _identity),
    "fgsm": Attack(_with(fgsm), norms=("linf",)),
    "fgm": Attack(_with(fgm)),
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
# Each threat model's usual radius and PGD step: L-inf 8/255 and 2/255 (the official FPCM
# code, Madry et al.); L2 0.5 (RobustBench's and AutoAttack's L2 setting) and 0.1 = 2 eps /
# 10 steps (the TRADES code's L2 step rule, lr = 2 eps / perturb_steps).
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
DEFAULT_STEP_SIZE = {"linf": 2 / 255, "l2": 0.1}


def takes_step_size(name: str) -> bool:
    """Whether the attack `name` (e.g. pgd20) steps by a step_size from a random start."""
    entry, _ = _entry(name)
    return entry is not None and entry.step_sized


def options_for(name: str, eps: float, step_size: float, norm: str = "linf") -> Dict:
    """The keyword options `get(name, ...)` takes for an evaluation at radius eps in `norm`."""
    if name.lower() == "none":
        return {}
    return {"eps": eps, "norm": norm,
            **({"step_size": step_size} if takes_step_size(name) else {})}


def _entry(name: str) -> Tuple[Optional[Attack], Optional[re.Match]]:
    """(registry entry or None, the pgdN-style match or None) for an attack name."""
    family = re.fullmatch(r"([a-z]+)(\d+)", name.lower())
    return ATTACKS.get(f"{family.group(1)}N" if family else name.lower()), family


def check_supports(name: str, norm: str) -> None:
    """A one-line ValueError if the attack `name` is not defined in the threat model `norm`."""
    entry, _ = _entry(name)
    if entry is not None and check_norm(norm) not in entry.norms:
        raise ValueError(f"Attack {name!r} is an L-inf attack; with norm {norm!r} use fgm "
                         f"(the gradient step normalised in {norm}).")


def get(name: str, **options) -> Callable:
    """The attack called `name` as attack(logits_fn, x, y, key) -> x_adv, with options
    (eps, step_size, n_iter, n_queries, ...) as keywords."""
    entry, family = _entry(name)
    if entry is None:
        raise ValueError(f"Unknown attack {name!r}; valid: {', '.join(ATTACK_NAMES)} "
                         f"(N = number of steps, e.g. pgd50).")
    if "norm" in options:
        check_supports(name, options["norm"])
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
