"""FAB-T (Croce and Hein, 2020), targeted, L-inf or L2, with the published parameters.

Each iteration linearises the decision boundary between the true class y and the target t
(the class ranked `target_rank` at the clean point), projects both the current iterate and the
clean image onto that hyperplane within [0, 1] (`projection_linf` or `projection_l2`: the
smallest step in the threat model's norm), and moves by a convex combination of the two steps
(extrapolation eta = 1.05, weight alpha = |d1| / (|d1| + |d2|) <= alpha_max = 0.1, the step
sizes measured in that norm); once misclassified, it keeps the perturbation of smallest norm
found and steps back towards the clean image by beta = 0.9. 100 iterations, no random start
(AutoAttack's standard version runs one restart). A point is fooled only if the smallest
adversarial perturbation lies within eps (in that norm). As the official code (fab_base.py).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fpcm_jax.attacks._common import (check_norm, correct_and_finite, fixed_loop, norms,
                                      over_target_ranks, per_example, pick, ranked_class)
from fpcm_jax.attacks.conv_layout import input_gradient


def projection_linf(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Minimal L-inf step d with <w, points + d> = b and points + d in [0, 1], per row.

    points, w: (N, D); b: (N,). Returns d of shape (N, D) (Croce and Hein's exact solver:
    sort coordinates by how far they can move, binary-search the active set).
    """
    num, dim = points.shape
    rows = jnp.arange(num)
    t = points
    sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
    w = w * sign[:, None]
    b = b * sign
    a = (w < 0).astype(t.dtype)
    nonzero = (w != 0).astype(t.dtype)
    d = (a - t) * nonzero
    p = a - t * (2 * a - 1)
    order = jnp.argsort(p, axis=1)
    b = b - jnp.sum(w * t, axis=1)
    b0 = jnp.sum(w * d, axis=1)
    reversed_order = order[:, ::-1]
    ws = jnp.take_along_axis(w, reversed_order, axis=1)
    bs2 = -ws * jnp.take_along_axis(d, reversed_order, axis=1)
    s = jnp.cumsum(jnp.abs(ws), axis=1)
    sb = jnp.cumsum(bs2, axis=1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * p[rows, order[:, 0]]
    whole_box = b - b2 > 0
    searched = (b - b0 > 0) & ~whole_box
    low = jnp.zeros((num,), t.dtype)
    high = jnp.full((num,), dim - 1, t.dtype)
    for _ in range(math.ceil(math.log2(dim))):
        middle = jnp.floor((low + high) / 2)
        index = middle.astype(jnp.int32)
        current = order[rows, dim - 1 - index]
        c = b - (sb[rows, index] - s[rows, index] * p[rows, current]) > 0
        low = jnp.where(c, middle, low)
        high = jnp.where(c, high, middle)
    low = low.astype(jnp.int32)
    lambda_box = jnp.maximum((b - sb[:, -1]) / (-s[:, -1]), 0.0)[:, None]
    d_box = (2 * a - 1) * lambda_box
    lambda_opt = jnp.maximum((b - sb[rows, low]) / (-s[rows, low]), 0.0)[:, None]
    d_opt = jnp.minimum(lambda_opt, d) * a + jnp.maximum(-lambda_opt, d) * (1 - a)
    d = jnp.where(whole_box[:, None], d_box, jnp.where(searched[:, None], d_opt, d))
    return d * nonzero


def _sorted_breakpoints(t: jax.Array, w: jax.Array):
    """For projection_l2: each coordinate's breakpoint r (the multiple of -w at which it hits
    the box; 1e12 where w is zero), r sorted per row (rs, and rs shifted left with a trailing
    0: rs2, the 1e12 of zero weights read as 0 in both), and the sums of w^2 over the
    coordinates that come later in that order (ws) and in all (w5)."""
    r = jnp.clip(jnp.maximum(t / w, (t - 1) / w), -1e12, 1e12)
    r = jnp.where(jnp.abs(w) < 1e-8, 1e12, r)
    r = jnp.where(r == -1e12, 1e12, r)
    order = jnp.argsort(r, axis=1)
    rs = jnp.take_along_axis(r, order, axis=1)
    rs2 = jnp.pad(rs[:, 1:], ((0, 0), (0, 1)))
    rs, rs2 = jnp.where(rs == 1e12, 0.0, rs), jnp.where(rs2 == 1e12, 0.0, rs2)
    w3s = jnp.take_along_axis(w * w, order, axis=1)
    w5 = jnp.sum(w3s, axis=1, keepdims=True)
    ws = w5 - jnp.cumsum(w3s, axis=1)
    return r, rs, rs2, ws, w5


def projection_l2(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Minimal L2 step d with <w, points + d> = b and points + d in [0, 1], per row.

    points, w: (N, D); b: (N,). Returns d of shape (N, D). Croce and Hein's exact solver
    (fab_projections.py): the optimum is -lambda w clipped to the box; the coordinates'
    breakpoints (where they reach the box) are sorted and the active set is binary-searched
    on the piecewise-linear residual of the constraint.
    """
    num, dim = points.shape
    rows = jnp.arange(num)
    t = points
    c = jnp.sum(w * t, axis=1) - b
    sign = jnp.where(c >= 0, 1.0, -1.0)
    w, c = w * sign[:, None], c * sign
    nonzero = (jnp.abs(w) > 1e-8).astype(t.dtype)
    r, rs, rs2, ws, w5 = _sorted_breakpoints(t, w)
    d = -(r * w) * nonzero
    # s[:, k]: the constraint's residual minus c with every coordinate moved up to the k-th
    # breakpoint (s[:, 0]: none clipped).
    s = jnp.concatenate([-w5 * rs[:, :1], jnp.cumsum((rs - rs2) * ws, axis=1) - w5 * rs[:, :1]],
                        axis=1)
    unclipped = s[:, 0] + c < 0
    whole_box = jnp.sum(d * w, axis=1) + c > 0
    searched = ~(unclipped | whole_box)
    low = jnp.zeros((num,), t.dtype)
    high = jnp.full((num,), dim - 1, t.dtype)
    for _ in range(math.ceil(math.log2(dim))):
        middle = jnp.floor((low + high) / 2)
        above = s[rows, middle.astype(jnp.int32)] + c > 0
        low = jnp.where(above, middle, low)
        high = jnp.where(above, high, middle)
    low = low.astype(jnp.int32)
    d_free = -(c / w5[:, 0])[:, None] * w
    ws_low = ws[rows, low]
    alpha = jnp.where(ws_low == 0, 0.0, (s[rows, low] + c) / ws_low + rs[rows, low])[:, None]
    d_opt = jnp.where(alpha > r, d, -alpha * w)
    d = jnp.where(unclipped[:, None], d_free, jnp.where(searched[:, None], d_opt, d))
    return d * nonzero


PROJECTIONS = {"linf": projection_linf, "l2": projection_l2}


def fab_targeted_stage(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                       y: jax.Array, key: jax.Array, eps: float = 8 / 255, target_rank=2,
                       n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
                       beta: float = 0.9, unroll: Optional[bool] = None, norm: str = "linf"):
    """One FAB-T run against the class ranked `target_rank` in the threat model `norm`:
    (x_adv, robust)."""
    del key  # the standard version's single restart has no random start
    projection = PROJECTIONS[check_norm(norm)]
    batch = x.shape[0]
    flat = lambda z: z.reshape(batch, -1)
    clean_logits = logits_fn(x)
    correct = jnp.argmax(clean_logits, axis=1) == y
    targets = ranked_class(clean_logits, target_rank)

    def difference(inputs):
        logits = logits_fn(inputs)
        gap = pick(logits, targets) - pick(logits, y)
        return gap.sum(), gap

    grad_fn = input_gradient(difference, has_aux=True)

    def body(_, state):
        x1, best, best_norm = state
        grad, gap = grad_fn(x1)
        w = flat(grad)
        b = -gap + jnp.sum(w * flat(x1), axis=1)
        steps = projection(jnp.concatenate([flat(x1), flat(x)]),
                           jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        d1, d2 = steps[:batch].reshape(x.shape), steps[batch:].reshape(x.shape)
        size = jnp.maximum(norms(steps, norm), 1e-8)
        alpha = jnp.clip(size[:batch] / (size[:batch] + size[batch:]), 0.0, alpha_max)
        alpha = per_example(alpha, x)
        x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
        is_adv = ~correct_and_finite(logits_fn(x1), y)
        distance = norms(x1 - x, norm)
        better = is_adv & (distance < best_norm)
        best = jnp.where(per_example(better, x), x1, best)
        best_norm = jnp.where(better, distance, best_norm)
        x1 = jnp.where(per_example(is_adv, x), x + (x1 - x) * beta, x1)
        return x1, best, best_norm

    init = (x, x, jnp.full((batch,), 1e10, x.dtype))
    # A large body: unrolled, 100 of them compile for minutes on CPU; fori_loop unless asked.
    _, best, best_norm = fixed_loop(n_iter, body, init, unroll, max_unrolled=0)
    found = correct & (best_norm < 1e10)
    x_adv = jax.lax.stop_gradient(jnp.where(per_example(found, x), best, x))
    still_correct = correct_and_finite(logits_fn(x_adv), y)
    too_far = norms(x_adv - x, norm) > eps
    robust = correct & (still_correct | too_far)
    return jnp.where(per_example(robust, x), x, x_adv), robust


def fab_targeted(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
                 key: jax.Array, eps: float = 8 / 255, n_target_classes: int = 9,
                 n_iter: int = 100, unroll: Optional[bool] = None,
                 norm: str = "linf") -> jax.Array:
    """FAB-T against the 2nd, 3rd, ... most likely classes in turn; returns x_adv."""
    check_norm(norm)

    def stage(_, target_rank):
        return fab_targeted_stage(logits_fn, x, y, key, eps, target_rank, n_iter, unroll=unroll,
                                  norm=norm)

    return over_target_ranks(stage, logits_fn, x, y, n_target_classes)
