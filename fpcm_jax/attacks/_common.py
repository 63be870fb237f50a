"""What the attacks share: the loop form, per-example keys and masks, margins, target ranks,
the threat models (norms) and their balls.

`fixed_loop` runs a loop either unrolled or as a `lax.fori_loop`; by default it follows the
backend and the loop's length (`default_unroll`: short loops unrolled on CPU, where a conv net
inside `lax.fori_loop` ran 3x slower).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

# On XLA:CPU a conv net inside a while loop ran 2-3x slower than unrolled (ResNet-18, batch 64,
# PGD-20: 1.65 vs 6.33 images/s), while an unrolled loop's compile time and memory grow with
# its length (PGD-20: 9 s, 1.4 GB; PGD-50: 24 s, 1.8 GB; APGD-100 or FAB-100, whose bodies
# are larger: minutes and about 10 GB). So on CPU gradient-sign loops are unrolled up to
# UNROLL_MAX_STEPS_CPU steps and APGD/FAB never; GPU/TPU always use lax.fori_loop, which
# compiles one body in seconds. Figures: benchmarks/README.md. The slowdown was the input
# gradient's convolutions left in a slow kernel layout inside loops; every attack now takes
# its gradient through `conv_layout.input_gradient`, which removes it (issue 30), so the
# unrolling of short loops is a choice measured before that fix.
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


def example_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per example: a batch of keys is used as is, a single key is split.

    AutoAttack passes keys derived from each example's index, so a point gets the same random
    start whatever batch it lands in.
    """
    return key if key.ndim == 1 else jax.random.split(key, batch)


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """Per-example values (B,) shaped to broadcast against a batch `like` (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def clip_to_ball(points: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """points clipped into the L-inf eps-ball around x, then into [0, 1]."""
    return jnp.clip(jnp.clip(points, x - eps, x + eps), 0.0, 1.0)


# The threat models: every attack takes norm="linf" (the default) or "l2".
NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    """norm itself if it is one of NORMS, else a one-line ValueError naming the valid ones."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; use one of {', '.join(NORMS)}.")
    return norm


def norms(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example norms (B,) of a batch of perturbations (B, ...): L-inf or L2."""
    flat = delta.reshape(delta.shape[0], -1)
    if check_norm(norm) == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(flat * flat, axis=1))


# Rounding slack of a perturbation's norm: with float32 images x + delta - x differs from
# delta by up to ~1e-7 per pixel, and a projected L2 perturbation's norm from eps by a few ulps.
BALL_TOLERANCE = (1e-5, 1e-6)  # relative to eps, absolute


def ball_limit(eps: float) -> float:
    """The largest perturbation norm accepted as inside the eps-ball (`BALL_TOLERANCE`)."""
    relative, absolute = BALL_TOLERANCE
    return eps * (1 + relative) + absolute


def pick(logits: jax.Array, classes: jax.Array) -> jax.Array:
    """Each example's logit of its class in `classes`: logits[i, classes[i]]."""
    return jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """z_y - max_{i != y} z_i per example (negative means misclassified); -inf where the
    logits are not finite, so an attack keeps such a point and its evaluation refuses it."""
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    value = pick(logits, labels) - others.max(axis=1)
    return jnp.where(jnp.isfinite(logits).all(axis=1), value, -jnp.inf)


def correct_and_finite(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether each example is classified as its label by finite logits. An attack counts a
    point with NaN or infinite logits as fooled (the argmax of a NaN row would be class 0), so
    it returns that point and the evaluation stops on it (`finite`) instead of counting it."""
    return (jnp.argmax(logits, axis=1) == labels) & jnp.isfinite(logits).all(axis=1)


def target_ranks(n_target_classes: int) -> range:
    """The ranks a targeted attack aims at in turn: 2 (the most likely wrong class at the clean
    point), 3, ..., n_target_classes + 1."""
    return range(2, n_target_classes + 2)


def ranked_class(logits: jax.Array, rank) -> jax.Array:
    """Each example's class ranked `rank` by its logits (1 = the largest; may be traced)."""
    ranked = jnp.argsort(logits, axis=1)
    return jnp.take(ranked, logits.shape[1] - rank, axis=1)


def over_target_ranks(stage: Callable[[int, int], Tuple[jax.Array, jax.Array]],
                      logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
                      n_target_classes: int) -> jax.Array:
    """x_adv from stage(index, target_rank) -> (x_adv, robust), run for each target rank in
    turn: a point takes the first stage's x_adv that fools it; points misclassified at the
    clean image stay clean."""
    robust = correct_and_finite(logits_fn(x), y)
    x_out = x
    for index, target_rank in enumerate(target_ranks(n_target_classes)):
        x_adv, still = stage(index, target_rank)
        fooled = robust & ~still
        x_out = jnp.where(per_example(fooled, x), x_adv, x_out)
        robust = robust & still
    return x_out
