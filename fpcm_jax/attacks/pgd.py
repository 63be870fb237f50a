"""L-inf gradient-sign attacks: FGSM, PGD-N and CW-N, as pure functions of a `logits_fn`.

    x_adv = pgd(logits_fn, x, y, key, eps=8/255, step_size=2/255, steps=50)

All take clean images x in [0, 1] (any shape), labels y and an RNG key, and return images in
the eps-ball around x and in [0, 1], with `stop_gradient`. The loop form follows the backend
and the number of steps (`default_unroll`, from `_common` and importable from here: short loops
unrolled on CPU, where a conv net inside `lax.fori_loop` ran 3x slower; `lax.fori_loop`
otherwise); `unroll=True/False` forces one.

`pgd_iterate` is the loop itself, for callers that thread extra state through each step (the
training attack threads BatchNorm running statistics, as the official code updates them).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from fpcm_jax.attacks._common import UNROLL_MAX_STEPS_CPU, default_unroll, fixed_loop, margin

__all__ = ["UNROLL_MAX_STEPS_CPU", "default_unroll", "fixed_loop", "uniform_start", "project",
           "pgd_iterate", "cross_entropy", "cw_margin", "pgd", "fgsm", "cw"]


def uniform_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """x + U(-eps, eps), clipped to [0, 1] (the official PGD's random start)."""
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    return jnp.clip(x + noise, 0.0, 1.0)


def project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Back into the eps-ball around x and into [0, 1]."""
    return jnp.clip(x + jnp.clip(x_adv - x, -eps, eps), 0.0, 1.0)


def pgd_iterate(loss_fn: Callable[[jax.Array, Any], Tuple[jax.Array, Any]], x: jax.Array,
                x_start: jax.Array, carry: Any, eps: float, step_size: float, steps: int,
                unroll: Optional[bool] = None) -> Tuple[jax.Array, Any]:
    """`steps` signed-gradient ascent steps on loss_fn(x_adv, carry) -> (loss, new_carry)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(_, state):
        x_adv, carry = state
        grad, carry = grad_fn(x_adv, carry)
        return project(x_adv + step_size * jnp.sign(grad), x, eps), carry

    x_adv, carry = fixed_loop(steps, step, (x_start, carry), unroll)
    return jax.lax.stop_gradient(x_adv), carry


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Summed cross-entropy (the sum gives the same signs as the mean, without a 1/B scale)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example CW margin: max wrong logit minus true logit (> 0 means misclassified)."""
    return -margin(logits, labels)


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, key: jax.Array,
        eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
        random_start: bool = True, unroll: Optional[bool] = None) -> jax.Array:
    """PGD-N on cross-entropy: uniform random start, signed steps, last iterate."""
    start = uniform_start(key, x, eps) if random_start else x
    loss_fn = lambda x_adv, carry: (cross_entropy(logits_fn(x_adv), y), carry)
    return pgd_iterate(loss_fn, x, start, None, eps, step_size, steps, unroll)[0]


def fgsm(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
         key: jax.Array, eps: float = 8 / 255) -> jax.Array:
    """One signed-gradient step of size eps from the clean image (no random start)."""
    return pgd(logits_fn, x, y, key, eps, eps, 1, random_start=False)


def cw(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, key: jax.Array,
       eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 50,
       unroll: Optional[bool] = None) -> jax.Array:
    """PGD on the CW margin loss; examples already misclassified stop moving."""
    start = uniform_start(key, x, eps)

    def loss_fn(x_adv, carry):
        margin = cw_margin(logits_fn(x_adv), y)
        still_correct = jax.lax.stop_gradient(margin <= 0)
        return jnp.sum(jnp.where(still_correct, margin, 0.0)), carry

    return pgd_iterate(loss_fn, x, start, None, eps, step_size, steps, unroll)[0]
