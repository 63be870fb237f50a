"""Gradient attacks: FGSM, FGM, PGD-N and CW-N, as pure functions of a `logits_fn`.

    x_adv = pgd(logits_fn, x, y, key, eps=8/255, step_size=2/255, steps=50)
    x_adv = pgd(logits_fn, x, y, key, eps=0.5, step_size=0.1, steps=50, norm="l2")

All take clean images x in [0, 1] (a batch, any shape), labels y and an RNG key, and return
images in the eps-ball around x and in [0, 1], with `stop_gradient`. norm="linf" (the default)
steps along the gradient's sign; norm="l2" steps along the gradient divided by its L2 norm and
projects by scaling the perturbation back to the ball, as torchattacks' PGDL2 does. FGSM is the
L-inf attack; FGM is the same single step in either norm. The loop form follows the backend
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

from fpcm_jax.attacks._common import (UNROLL_MAX_STEPS_CPU, check_norm, default_unroll,
                                      fixed_loop, margin, norms, per_example)
from fpcm_jax.attacks.conv_layout import input_gradient

__all__ = ["UNROLL_MAX_STEPS_CPU", "default_unroll", "fixed_loop", "uniform_start", "project",
           "ascent_direction", "pgd_iterate", "trades_l2_iterate", "cross_entropy", "cw_margin",
           "pgd", "fgsm", "fgm", "cw"]

# torchattacks' PGDL2 `eps_for_division`: keeps a zero gradient's L2 step finite (and zero).
L2_DIVISION_EPS = 1e-10


def uniform_start(key: jax.Array, x: jax.Array, eps: float, norm: str = "linf") -> jax.Array:
    """A random start in the eps-ball, clipped to [0, 1]. L-inf: x + U(-eps, eps) per pixel
    (the official PGD's); L2: x + a gaussian direction scaled per example to length U(0, 1) *
    eps (torchattacks' PGDL2)."""
    if check_norm(norm) == "linf":
        noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
        return jnp.clip(x + noise, 0.0, 1.0)
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, x.dtype)
    radius = jax.random.uniform(radius_key, (x.shape[0],), x.dtype) * eps
    return jnp.clip(x + direction * per_example(radius / norms(direction, "l2"), x), 0.0, 1.0)


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str = "linf") -> jax.Array:
    """Back into the eps-ball around x and into [0, 1]. L2: the perturbation scaled by
    min(1, eps / ||x_adv - x||_2) per example (torchattacks' PGDL2; 1 for a zero one)."""
    delta = x_adv - x
    if check_norm(norm) == "linf":
        return jnp.clip(x + jnp.clip(delta, -eps, eps), 0.0, 1.0)
    factor = jnp.minimum(eps / norms(delta, "l2"), 1.0)
    return jnp.clip(x + delta * per_example(factor, x), 0.0, 1.0)


def ascent_direction(grad: jax.Array, norm: str = "linf") -> jax.Array:
    """The unit step for a gradient: its sign (L-inf) or grad / (||grad||_2 + 1e-10) per
    example (L2)."""
    if check_norm(norm) == "linf":
        return jnp.sign(grad)
    return grad / per_example(norms(grad, "l2") + L2_DIVISION_EPS, grad)


def pgd_iterate(loss_fn: Callable[[jax.Array, Any], Tuple[jax.Array, Any]], x: jax.Array,
                x_start: jax.Array, carry: Any, eps: float, step_size: float, steps: int,
                unroll: Optional[bool] = None, norm: str = "linf") -> Tuple[jax.Array, Any]:
    """`steps` gradient ascent steps (`ascent_direction` times step_size, then `project`) on
    loss_fn(x_adv, carry) -> (loss, new_carry)."""
    check_norm(norm)
    grad_fn = input_gradient(loss_fn, has_aux=True)

    def step(_, state):
        x_adv, carry = state
        grad, carry = grad_fn(x_adv, carry)
        return project(x_adv + step_size * ascent_direction(grad, norm), x, eps, norm), carry

    x_adv, carry = fixed_loop(steps, step, (x_start, carry), unroll)
    return jax.lax.stop_gradient(x_adv), carry


# torch.Tensor.renorm_'s divisor slack: a row longer than maxnorm is scaled by
# maxnorm / (norm + 1e-7).
RENORM_EPS = 1e-7


def trades_l2_iterate(loss_fn: Callable[[jax.Array, Any], Tuple[jax.Array, Any]], x: jax.Array,
                      x_start: jax.Array, carry: Any, eps: float, steps: int, key: jax.Array,
                      unroll: Optional[bool] = None) -> Tuple[jax.Array, Any]:
    """The TRADES code's L2 attack loop (yaodongyu/TRADES, `trades_loss`, distance 'l_2') on
    loss_fn(x_adv, carry) -> (loss, new_carry), from x_start = x + delta: each step moves delta
    by SGD with lr 2 eps / steps along the gradient divided by its L2 norm (a zero gradient is
    replaced by N(0, 1) noise, drawn from fold_in(key, step), and SGD steps against it), then
    puts x + delta into [0, 1] and only then scales delta back onto the ball (torch's renorm:
    eps / (norm + 1e-7) when longer than eps). Returns clip(x + delta, 0, 1) and the carry."""
    learning_rate = 2.0 * eps / steps
    grad_fn = input_gradient(loss_fn, has_aux=True)

    def step(index, state):
        delta, carry = state
        grad, carry = grad_fn(x + delta, carry)
        length = per_example(norms(grad, "l2"), grad)
        noise = jax.random.normal(jax.random.fold_in(key, index), grad.shape, grad.dtype)
        # The reference minimises -loss: a step against its normalised gradient, or against
        # the noise that replaces a zero one.
        delta = jnp.where(length > 0, delta + learning_rate * grad / jnp.where(
            length > 0, length, 1.0), delta - learning_rate * noise)
        delta = jnp.clip(x + delta, 0.0, 1.0) - x
        longer = norms(delta, "l2")
        factor = jnp.where(longer > eps, eps / (longer + RENORM_EPS), 1.0)
        return delta * per_example(factor, delta), carry

    delta, carry = fixed_loop(steps, step, (x_start - x, carry), unroll)
    return jax.lax.stop_gradient(jnp.clip(x + delta, 0.0, 1.0)), carry


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Summed cross-entropy (the sum gives the same signs as the mean, without a 1/B scale)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example CW margin: max wrong logit minus true logit (> 0 means misclassified)."""
    return -margin(logits, labels)


def pgd(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, key: jax.Array,
        eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
        random_start: bool = True, unroll: Optional[bool] = None,
        norm: str = "linf") -> jax.Array:
    """PGD-N on cross-entropy: random start in the ball (`uniform_start`), steps of
    step_size (`pgd_iterate`), last iterate."""
    check_norm(norm)
    start = uniform_start(key, x, eps, norm) if random_start else x
    loss_fn = lambda x_adv, carry: (cross_entropy(logits_fn(x_adv), y), carry)
    return pgd_iterate(loss_fn, x, start, None, eps, step_size, steps, unroll, norm)[0]


def fgm(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
        key: jax.Array, eps: float = 8 / 255, norm: str = "linf") -> jax.Array:
    """One gradient step of size eps from the clean image (no random start): FGSM in L-inf,
    the L2-normalised gradient in L2."""
    return pgd(logits_fn, x, y, key, eps, eps, 1, random_start=False, norm=norm)


def fgsm(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
         key: jax.Array, eps: float = 8 / 255, norm: str = "linf") -> jax.Array:
    """One signed-gradient step of size eps from the clean image (no random start)."""
    if check_norm(norm) != "linf":
        raise ValueError("fgsm is the L-inf attack; use fgm for L2.")
    return pgd(logits_fn, x, y, key, eps, eps, 1, random_start=False)


def cw(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, key: jax.Array,
       eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 50,
       unroll: Optional[bool] = None, norm: str = "linf") -> jax.Array:
    """PGD on the CW margin loss; examples already misclassified stop moving."""
    check_norm(norm)
    start = uniform_start(key, x, eps, norm)

    def loss_fn(x_adv, carry):
        margin = cw_margin(logits_fn(x_adv), y)
        still_correct = jax.lax.stop_gradient(margin <= 0)
        return jnp.sum(jnp.where(still_correct, margin, 0.0)), carry

    return pgd_iterate(loss_fn, x, start, None, eps, step_size, steps, unroll, norm)[0]
