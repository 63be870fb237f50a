"""L-inf gradient-sign attacks: FGSM, PGD-N and CW-N, as pure functions of a `logits_fn`.

    x_adv = pgd(logits_fn, x, y, key, eps=8/255, step_size=2/255, steps=50)

All take clean images x in [0, 1] (any shape), labels y and an RNG key, and return images in
the eps-ball around x and in [0, 1], with `stop_gradient`. The loop form follows the backend
and the number of steps (`default_unroll`: short loops unrolled on CPU, where a conv net inside
`lax.fori_loop` ran 3x slower; `lax.fori_loop` otherwise); `unroll=True/False` forces one.

`pgd_iterate` is the loop itself, for callers that thread extra state through each step (the
training attack threads BatchNorm running statistics, as the official code updates them).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax


def uniform_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """x + U(-eps, eps), clipped to [0, 1] (the official PGD's random start)."""
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    return jnp.clip(x + noise, 0.0, 1.0)


def project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Back into the eps-ball around x and into [0, 1]."""
    return jnp.clip(x + jnp.clip(x_adv - x, -eps, eps), 0.0, 1.0)


# On XLA:CPU a conv net inside a while loop ran 2-3x slower than unrolled (ResNet-18, batch 64,
# PGD-20: 1.65 vs 6.33 images/s), while an unrolled loop's compile time and memory grow with
# its length (PGD-20: 9 s, 1.4 GB; PGD-50: 24 s, 1.8 GB; APGD-100 or FAB-100, whose bodies
# are larger: minutes and about 10 GB). So on CPU gradient-sign loops are unrolled up to
# UNROLL_MAX_STEPS_CPU steps and APGD/FAB never; GPU/TPU always use lax.fori_loop, which
# compiles one body in seconds. Figures: benchmarks/README.md.
UNROLL_MAX_STEPS_CPU = 100


def default_unroll(steps: int, max_steps: int = UNROLL_MAX_STEPS_CPU) -> bool:
    """Whether a loop of `steps` iterations is unrolled by default: only on CPU, and only up
    to `max_steps` iterations (0: never)."""
    return jax.default_backend() == "cpu" and steps <= max_steps


def fixed_loop(count: int, body: Callable[[Any, Any], Any], state: Any,
               unroll: Optional[bool] = None, max_unrolled: int = UNROLL_MAX_STEPS_CPU) -> Any:
    """body(i, state) -> state, `count` times: a Python loop (unrolled into the compiled graph)
    or a `lax.fori_loop`; None picks by backend and length (`default_unroll` with
    `max_unrolled`)."""
    if unroll is None:
        unroll = default_unroll(count, max_unrolled)
    if unroll:
        for i in range(count):
            state = body(i, state)
        return state
    return jax.lax.fori_loop(0, count, body, state)


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
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    wrong = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return wrong.max(axis=1) - true_logit


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
