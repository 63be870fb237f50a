"""Square Attack (Andriushchenko et al., 2020), L-inf, as run in AutoAttack's standard version.

Score-based: 5,000 queries, p_init = 0.8, margin loss. Start: vertical stripes of +-eps (one
sign per column and channel). Each query changes one square window, at a random position and
with a random +-2 eps sign per channel, the same for every image of the batch; an image keeps
the change if its margin loss drops (or it becomes misclassified). The window side follows the
published schedule of p (halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
queries). Stops early once every image is misclassified.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fpcm_jax.attacks._common import clip_to_ball, example_keys, margin, per_example

# numpy, not jnp: a JAX array built at import time would start a backend before
# jax.distributed.initialize() can run.
_P_BOUNDARIES = np.asarray([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])


def p_selection(iteration, p_init: float = 0.8):
    """p_init / 2^(number of schedule boundaries passed), the published schedule."""
    halvings = jnp.sum(jnp.asarray(_P_BOUNDARIES) < iteration)
    return p_init / (2.0 ** halvings)


def square_attack(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
                  key: jax.Array, eps: float = 8 / 255, n_queries: int = 5000,
                  p_init: float = 0.8) -> jax.Array:
    """Square Attack; returns x_adv (the clean image where it failed)."""
    return square_stage(logits_fn, x, y, key, eps, n_queries, p_init)[0]


def _random_draws(loop_key: jax.Array, i, channels: int):
    """Query i's draws: uniforms in [0, 1) placing the window (2,), its signs (1, 1, C)."""
    position_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i))
    return (jax.random.uniform(position_key, (2,)),
            jax.random.choice(sign_key, jnp.array([-1.0, 1.0]), (1, 1, channels)))


def square_stage(logits_fn, x, y, key, eps=8 / 255, n_queries=5000, p_init=0.8,
                 shared_key=None, draws=None):
    """(x_adv, robust) for the points classified correctly.

    key: one key, or one per example (their initial stripes); shared_key, when given, drives
    the window positions and signs shared by the batch (so they do not depend on the batch).
    draws: None, or given draws in place of the random ones (tests replay the reference's):
    (stripe signs (B, 1, W, C), window uniforms (n_queries, 2), window signs (n_queries, C)).
    """
    batch, height, width, channels = x.shape
    correct = jnp.argmax(logits_fn(x), axis=1) == y
    keys = example_keys(key, batch)
    loop_key = jax.random.fold_in(keys[0], 1) if shared_key is None else shared_key
    if draws is None:
        stripes = jax.vmap(lambda k: jax.random.choice(
            k, jnp.array([-1.0, 1.0]), (1, width, channels)))(keys)
        query_draws = lambda i: _random_draws(loop_key, i, channels)
    else:
        stripes = draws[0]
        query_draws = lambda i: (draws[1][i], draws[2][i].reshape(1, 1, channels))
    x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    margin_min = jnp.where(correct, margin(logits_fn(x_best), y), -1.0)
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]

    def keep_going(state):
        i, _, margin_min = state
        return (i < n_queries) & jnp.any(margin_min > 0)

    def body(state):
        i, x_best, margin_min = state
        uniforms, signs = query_draws(i)
        p = p_selection(i, p_init)
        side = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
        side = jnp.clip(side, 1, min(height, width))
        corner = jnp.floor(uniforms * jnp.stack([height - side, width - side])).astype(jnp.int32)
        window = ((rows >= corner[0]) & (rows < corner[0] + side) &
                  (cols >= corner[1]) & (cols < corner[1] + side))
        delta = jnp.where(window, 2.0 * eps * signs, 0.0)
        x_new = clip_to_ball(x_best + delta, x, eps)
        new_margin = margin(logits_fn(x_new), y)
        active = margin_min > 0
        accept = active & ((new_margin < margin_min) | (new_margin <= 0))
        x_best = jnp.where(per_example(accept, x), x_new, x_best)
        margin_min = jnp.where(accept, new_margin, margin_min)
        return i + 1, x_best, margin_min

    _, x_best, _ = jax.lax.while_loop(keep_going, body, (0, x_best, margin_min))
    x_best = jax.lax.stop_gradient(x_best)
    still = jnp.argmax(logits_fn(x_best), axis=1) == y
    robust = correct & still
    return jnp.where(per_example(robust | ~correct, x), x, x_best), robust
