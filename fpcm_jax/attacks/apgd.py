"""Auto-PGD (Croce and Hein, 2020), L-inf or L2, with the published parameters and schedule.

    x_adv = apgd(logits_fn, x, y, key, eps=8/255, loss="ce")                  # APGD-CE
    x_adv = apgd_targeted(logits_fn, x, y, key, eps=8/255)                     # APGD-T
    x_adv = apgd(logits_fn, x, y, key, eps=0.5, loss="ce", norm="l2")         # L2

One run: random start in the eps-ball, first step size 2*eps, momentum 0.75 (none on the first
step), best-loss point tracking, and at checkpoints (first after 22% of the iterations, then
shrinking by 3% down to 6%) the step size of a point is halved and it restarts from its best
point if its loss went up in at most rho = 75% of the steps since the last checkpoint, or if the
last checkpoint did not halve it and its best loss did not improve. In L2 (as the official
code's norm='L2') the start is x + eps * t / ||t||_2 with t gaussian, a step moves by the
step size along grad / ||grad||_2, and a point is projected by x + d / ||d||_2 * min(eps,
||d||_2) then clipped to [0, 1]; the schedule is the same. The loop is a `lax.fori_loop`
(`unroll=True` unrolls it: faster to run on CPU, but minutes to compile; `_common.fixed_loop`).

`robust` is False for points found misclassified at any iterate; `x_adv` holds that iterate for
them and the clean image otherwise, as the reference implementation returns.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpcm_jax.attacks._common import (check_norm, clip_to_ball, correct_and_finite,
                                      example_keys, fixed_loop, norms, over_target_ranks,
                                      per_example, pick, ranked_class)
from fpcm_jax.attacks.conv_layout import input_gradient

# The official code's guard in its normalisations (`normalize`: x / (||x|| + 1e-12)).
NORMALIZE_EPS = 1e-12


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Untargeted DLR: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12), per example."""
    ordered = jnp.sort(logits, axis=1)
    true = pick(logits, labels)
    top_is_true = jnp.argmax(logits, axis=1) == labels
    best_other = jnp.where(top_is_true, ordered[:, -2], ordered[:, -1])
    return -(true - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), per example."""
    ordered = jnp.sort(logits, axis=1)
    scale = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12
    return -(pick(logits, labels) - pick(logits, targets)) / scale


def checkpoint_schedule(n_iter: int) -> Tuple[np.ndarray, np.ndarray]:
    """(is_checkpoint[i], window k at i) for iterations i = 0..n_iter-1, as published.

    The first checkpoint comes after k = max(int(0.22 n), 1) iterations; each next window is
    k - max(int(0.03 n), 1), never below max(int(0.06 n), 1).
    """
    k = max(int(0.22 * n_iter), 1)
    k_min, k_step = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    is_checkpoint = np.zeros(n_iter, bool)
    window = np.zeros(n_iter, np.int32)
    counter = 0
    for i in range(n_iter):
        counter += 1
        if counter == k:
            is_checkpoint[i], window[i] = True, k
            k = max(k - k_step, k_min)
            counter = 0
    return is_checkpoint, window


class _State(NamedTuple):
    x_adv: jax.Array
    x_old: jax.Array
    grad: jax.Array
    x_best: jax.Array
    grad_best: jax.Array
    loss_best: jax.Array
    x_best_adv: jax.Array
    robust: jax.Array
    step_size: jax.Array
    loss_steps: jax.Array
    loss_best_last_check: jax.Array
    reduced_last_check: jax.Array


def _normalize(values: jax.Array, norm: str) -> jax.Array:
    """values / (||values|| + 1e-12) per example, in the norm (the official `normalize`)."""
    return values / per_example(norms(values, norm) + NORMALIZE_EPS, values)


def _random_start(x: jax.Array, key: jax.Array, eps: float, noise: Optional[jax.Array] = None,
                  norm: str = "linf") -> jax.Array:
    """x + eps * noise / ||noise|| per example, clipped to [0, 1]; noise uniform in [-1, 1]
    (L-inf) or standard normal (L2), drawn from `key` (one key per example, or one split)
    unless given."""
    if noise is None:
        keys = example_keys(key, x.shape[0])
        if norm == "linf":
            draw = lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0)
        else:
            draw = lambda k: jax.random.normal(k, x.shape[1:], x.dtype)
        noise = jax.vmap(draw)(keys)
    scale = per_example(norms(noise, norm) + NORMALIZE_EPS, x)
    return jnp.clip(x + eps * noise / scale, 0.0, 1.0)


def _into_ball(points: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """points projected into the eps-ball around x, then clipped to [0, 1] (L2: the official
    x + normalize(d) * min(eps, ||d||_2))."""
    if norm == "linf":
        return clip_to_ball(points, x, eps)
    delta = points - x
    length = jnp.minimum(eps, norms(delta, "l2"))
    return jnp.clip(x + _normalize(delta, "l2") * per_example(length, x), 0.0, 1.0)


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """sign(grad) (L-inf) or the official normalize(grad) (L2)."""
    return jnp.sign(grad) if norm == "linf" else _normalize(grad, "l2")


def _momentum_step(s: _State, i, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """The next iterate: a step of s.step_size along the gradient, into the ball, then mixed
    with the previous move by momentum 0.75 (none at i = 0) and put into the ball again."""
    momentum = jnp.where(i > 0, 0.75, 1.0)
    step = per_example(s.step_size, x)
    x_1 = _into_ball(s.x_adv + step * _ascent_direction(s.grad, norm), x, eps, norm)
    return _into_ball(
        s.x_adv + (x_1 - s.x_adv) * momentum + (s.x_adv - s.x_old) * (1 - momentum), x, eps, norm)


def apgd_run(loss_fn: Callable[[jax.Array], Tuple[jax.Array, jax.Array]], x: jax.Array,
             y: jax.Array, key: jax.Array, eps: float, n_iter: int = 100,
             rho: float = 0.75, unroll: Optional[bool] = None,
             start_noise: Optional[jax.Array] = None,
             norm: str = "linf") -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One APGD run on loss_fn(x) -> (per-example loss, logits), in the norm's ball.

    start_noise: the draw (shaped like x) that the random start scales to the eps-sphere:
    uniform in [-1, 1] for L-inf, standard normal for L2; None draws it from `key` (tests pass
    the reference's draw). Returns (x_best_adv, robust, gradient at the start) per example.
    """
    check_norm(norm)
    grad_fn = input_gradient(lambda inputs: _sum_loss(loss_fn, inputs), has_aux=True)

    def evaluate(inputs):
        grad, (loss, logits) = grad_fn(inputs)
        return grad, loss, correct_and_finite(logits, y)

    x_adv = _random_start(x, key, eps, start_noise, norm)
    grad, loss, correct = evaluate(x_adv)
    start_grad = grad
    batch = x.shape[0]
    state = _State(x_adv=x_adv, x_old=x_adv, grad=grad, x_best=x_adv, grad_best=grad,
                   loss_best=loss, x_best_adv=x_adv, robust=correct,
                   step_size=jnp.full((batch,), 2.0 * eps, x.dtype),
                   loss_steps=jnp.zeros((n_iter, batch), loss.dtype),
                   loss_best_last_check=loss, reduced_last_check=jnp.ones((batch,), bool))
    is_checkpoint, window = checkpoint_schedule(n_iter)
    is_checkpoint_array, window_array = jnp.asarray(is_checkpoint), jnp.asarray(window)
    max_window = int(np.max(window))

    def body(i, s: _State) -> _State:
        x_new = _momentum_step(s, i, x, eps, norm)
        grad, loss, correct = evaluate(x_new)
        robust = s.robust & correct
        x_best_adv = jnp.where(per_example(~correct, x), x_new, s.x_best_adv)
        improved = loss > s.loss_best
        x_best = jnp.where(per_example(improved, x), x_new, s.x_best)
        grad_best = jnp.where(per_example(improved, x), grad, s.grad_best)
        loss_best = jnp.where(improved, loss, s.loss_best)
        loss_steps = s.loss_steps.at[i].set(loss)
        s = s._replace(x_adv=x_new, x_old=s.x_adv, grad=grad, x_best=x_best,
                       grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv,
                       robust=robust, loss_steps=loss_steps)
        if isinstance(i, int):  # unrolled: the schedule is known while tracing
            return _check(s, i, int(window[i])) if is_checkpoint[i] else s
        return jax.lax.cond(is_checkpoint_array[i], lambda t: _check(t, i, window_array[i]),
                            lambda t: t, s)

    def _check(s: _State, i, k) -> _State:
        # Count increases of the loss over the last k steps (indices wrap as in the reference).
        offsets = jnp.arange(max_window)
        rows = (i - offsets) % n_iter
        previous = (i - offsets - 1) % n_iter
        increases = (s.loss_steps[rows] > s.loss_steps[previous]) & (offsets < k)[:, None]
        oscillating = jnp.sum(increases, axis=0) <= k * rho
        stalled = ~s.reduced_last_check & (s.loss_best_last_check >= s.loss_best)
        reduce = oscillating | stalled
        return s._replace(
            step_size=jnp.where(reduce, s.step_size / 2.0, s.step_size),
            x_adv=jnp.where(per_example(reduce, x), s.x_best, s.x_adv),
            grad=jnp.where(per_example(reduce, x), s.grad_best, s.grad),
            reduced_last_check=reduce, loss_best_last_check=s.loss_best)

    # A large body: unrolled, 100 of them compile for minutes on CPU; fori_loop unless asked.
    state = fixed_loop(n_iter, body, state, unroll, max_unrolled=0)
    return jax.lax.stop_gradient(state.x_best_adv), state.robust, start_grad


def _sum_loss(loss_fn, inputs):
    loss, logits = loss_fn(inputs)
    return loss.sum(), (loss, logits)


def apgd_stage(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
               key: jax.Array, eps: float = 8 / 255, n_iter: int = 100, loss: str = "ce",
               target_rank=2, rho: float = 0.75, unroll: Optional[bool] = None,
               start_noise: Optional[jax.Array] = None, norm: str = "linf"):
    """One APGD run on the points classified correctly: (x_adv, robust, zero-gradient flags).

    loss: 'ce', 'dlr', or 'dlr-targeted' against the class ranked `target_rank` (2 = the most
    likely wrong class at the clean point; may be a traced value). start_noise: `apgd_run`'s.
    norm: 'linf' or 'l2'.
    """
    check_norm(norm)
    clean_logits = logits_fn(x)
    if loss == "ce":
        example_loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y)
    elif loss == "dlr":
        example_loss = lambda z: dlr_loss(z, y)
    elif loss == "dlr-targeted":
        targets = ranked_class(clean_logits, target_rank)
        example_loss = lambda z: dlr_targeted_loss(z, y, targets)
    else:
        raise ValueError(f"Unknown APGD loss {loss!r}; use 'ce', 'dlr' or 'dlr-targeted'.")

    def loss_fn(inputs):
        logits = logits_fn(inputs)
        return example_loss(logits), logits

    clean_correct = jnp.argmax(clean_logits, axis=1) == y
    x_adv, robust, grad = apgd_run(loss_fn, x, y, key, eps, n_iter, rho, unroll, start_noise,
                                   norm)
    fooled = clean_correct & ~robust
    x_out = jnp.where(per_example(fooled, x), x_adv, x)
    zero_grad = clean_correct & (jnp.sum(jnp.abs(grad).reshape(x.shape[0], -1), axis=1) == 0)
    return x_out, clean_correct & robust, zero_grad


def apgd(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
         key: jax.Array, eps: float = 8 / 255, n_iter: int = 100, loss: str = "ce",
         rho: float = 0.75, unroll: Optional[bool] = None, norm: str = "linf") -> jax.Array:
    """APGD-CE (loss='ce') or APGD-DLR (loss='dlr'), one restart; returns x_adv."""
    return apgd_stage(logits_fn, x, y, key, eps, n_iter, loss, rho=rho, unroll=unroll,
                      norm=norm)[0]


def apgd_targeted(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
                  key: jax.Array, eps: float = 8 / 255, n_iter: int = 100,
                  n_target_classes: int = 9, rho: float = 0.75,
                  unroll: Optional[bool] = None, norm: str = "linf") -> jax.Array:
    """APGD-T: targeted DLR against the 2nd, 3rd, ... most likely classes in turn, each run
    only changing points still robust; returns x_adv."""
    check_norm(norm)

    def stage(index, target_rank):
        return apgd_stage(logits_fn, x, y, jax.random.fold_in(key, index), eps, n_iter,
                          "dlr-targeted", target_rank, rho, unroll, norm=norm)[:2]

    return over_target_ranks(stage, logits_fn, x, y, n_target_classes)
