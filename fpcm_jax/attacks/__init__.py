"""Adversarial attacks as pure functions of a `logits_fn(x) -> logits` (x in [0, 1]), in the
L-inf (default) or the L2 threat model (`norm="l2"`).

    attack = attacks.get("pgd50", eps=8/255)
    x_adv = attack(logits_fn, x, y, key)
    result = attacks.autoattack(logits_fn, x, y, key, eps=8/255)
    x_adv = attacks.get("apgd-ce", eps=0.5, norm="l2")(logits_fn, x, y, key)

Names: none, fgsm (L-inf only), fgm, pgdN (pgd10, pgd20, pgd50, ...), cwN, apgd-ce, apgd-dlr,
apgd-t, fab-t, square (`registry`). AutoAttack (the standard ensemble, run over a whole set
with per-point flags and sanity checks) is `autoattack`.
"""

from __future__ import annotations

from fpcm_jax.attacks._common import BALL_TOLERANCE, NORMS, ball_limit, check_norm, norms
from fpcm_jax.attacks.apgd import (apgd, apgd_stage, apgd_targeted, checkpoint_schedule, dlr_loss,
                                   dlr_targeted_loss)
from fpcm_jax.attacks.autoattack import STANDARD, ConsistencyError, autoattack
from fpcm_jax.attacks.finite import NonFiniteError, check_finite, nonfinite_error, nonfinite_points
from fpcm_jax.attacks.fab import fab_targeted, fab_targeted_stage, projection_l2, projection_linf
from fpcm_jax.attacks.pgd import (cw, cw_margin, fgm, fgsm, pgd, pgd_iterate, project,
                                   uniform_start)
from fpcm_jax.attacks.registry import (ATTACK_NAMES, DEFAULT_EPS, DEFAULT_STEP_SIZE,
                                       check_supports, get, options_for, takes_step_size)
from fpcm_jax.attacks.square import p_selection, square_attack, square_stage

__all__ = ["get", "autoattack", "STANDARD", "ATTACK_NAMES", "pgd", "fgsm", "fgm", "cw",
           "cw_margin", "pgd_iterate", "project", "uniform_start", "apgd", "apgd_stage",
           "apgd_targeted", "checkpoint_schedule", "dlr_loss", "dlr_targeted_loss",
           "fab_targeted", "fab_targeted_stage", "projection_linf", "projection_l2",
           "square_attack", "square_stage", "p_selection", "options_for", "takes_step_size",
           "NORMS", "check_norm", "norms", "BALL_TOLERANCE", "ball_limit", "ConsistencyError",
           "DEFAULT_EPS", "DEFAULT_STEP_SIZE", "check_supports",
           "NonFiniteError", "check_finite", "nonfinite_error", "nonfinite_points"]
