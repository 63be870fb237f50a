"""Square Attack (Andriushchenko et al., 2020), L-inf or L2, as run in AutoAttack's standard
version (the official square.py, norm='Linf' or 'L2').

Score-based: 5,000 queries, p_init = 0.8, margin loss; an image keeps a change if its margin
loss drops (or it becomes misclassified); stops early once every image is misclassified. The
window side follows the published schedule of p (halved after 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 queries).

L-inf: start from vertical stripes of +-eps (one sign per column and channel); each query
changes one square window, at a random position and with a random +-2 eps sign per channel,
the same for every image of the batch.

L2 (`square_l2_stage`): start from a grid of centred windows (`eta`: concentric squares, one
half positive, the other negative, each with a random sign per image and channel), scaled to
norm eps. Each query picks two windows at random positions (shared by the batch): the second
window's perturbation is removed and the first gets a new pattern (a fresh centred window with
a random sign per image and channel, plus the old content), rescaled so that the image keeps
norm eps: what the second window held moves to the first.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fpcm_jax.attacks._common import (check_norm, clip_to_ball, correct_and_finite,
                                      example_keys, margin, norms, per_example)

# numpy, not jnp: a JAX array built at import time would start a backend before
# jax.distributed.initialize() can run.
_P_BOUNDARIES = np.asarray([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])
HIGHEST = jax.lax.Precision.HIGHEST  # exact float32 sums of the window patterns on any backend
NORMALIZE_EPS = 1e-12  # the official guard in its normalisations


def p_selection(iteration, p_init: float = 0.8):
    """p_init / 2^(number of schedule boundaries passed), the published schedule."""
    halvings = jnp.sum(jnp.asarray(_P_BOUNDARIES) < iteration)
    return p_init / (2.0 ** halvings)


def square_attack(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
                  key: jax.Array, eps: float = 8 / 255, n_queries: int = 5000,
                  p_init: float = 0.8, norm: str = "linf") -> jax.Array:
    """Square Attack in the threat model `norm`; returns x_adv (the clean image where it
    failed)."""
    return square_stage(logits_fn, x, y, key, eps, n_queries, p_init, norm=norm)[0]


def _random_draws(loop_key: jax.Array, i, channels: int):
    """Query i's draws: uniforms in [0, 1) placing the window (2,), its signs (1, 1, C)."""
    position_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i))
    return (jax.random.uniform(position_key, (2,)),
            jax.random.choice(sign_key, jnp.array([-1.0, 1.0]), (1, 1, channels)))


def _accept(x_best, margin_min, x_new, new_margin):
    """The official acceptance: a point still to fool keeps x_new if its margin drops or it is
    misclassified; (x_best, margin_min) updated."""
    active = margin_min > 0
    accept = active & ((new_margin < margin_min) | (new_margin <= 0))
    x_best = jnp.where(per_example(accept, x_best), x_new, x_best)
    return x_best, jnp.where(accept, new_margin, margin_min)


def _search(logits_fn, x, y, x_best, correct, n_queries, candidate):
    """The query loop: candidate(i, x_best) -> query i's new point; (x_adv, robust)."""
    margin_min = jnp.where(correct, margin(logits_fn(x_best), y), -1.0)

    def keep_going(state):
        i, _, margin_min = state
        return (i < n_queries) & jnp.any(margin_min > 0)

    def body(state):
        i, x_best, margin_min = state
        x_new = candidate(i, x_best)
        x_best, margin_min = _accept(x_best, margin_min, x_new, margin(logits_fn(x_new), y))
        return i + 1, x_best, margin_min

    _, x_best, _ = jax.lax.while_loop(keep_going, body, (0, x_best, margin_min))
    x_best = jax.lax.stop_gradient(x_best)
    still = correct_and_finite(logits_fn(x_best), y)
    robust = correct & still
    return jnp.where(per_example(robust | ~correct, x), x, x_best), robust


def square_stage(logits_fn, x, y, key, eps=8 / 255, n_queries=5000, p_init=0.8,
                 shared_key=None, draws=None, norm="linf"):
    """(x_adv, robust) for the points classified correctly, in the threat model `norm`.

    key: one key, or one per example (their initial stripes); shared_key, when given, drives
    the window positions and signs shared by the batch (so they do not depend on the batch).
    draws: None, or given draws in place of the random ones (tests replay the reference's):
    (stripe signs (B, 1, W, C), window uniforms (n_queries, 2), window signs (n_queries, C));
    for L2 those of `square_l2_stage`.
    """
    if check_norm(norm) == "l2":
        return square_l2_stage(logits_fn, x, y, key, eps, n_queries, p_init, shared_key, draws)
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
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]

    def candidate(i, x_best):
        uniforms, signs = query_draws(i)
        p = p_selection(i, p_init)
        side = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
        side = jnp.clip(side, 1, min(height, width))
        corner = jnp.floor(uniforms * jnp.stack([height - side, width - side])).astype(jnp.int32)
        window = ((rows >= corner[0]) & (rows < corner[0] + side) &
                  (cols >= corner[1]) & (cols < corner[1] + side))
        delta = jnp.where(window, 2.0 * eps * signs, 0.0)
        return clip_to_ball(x_best + delta, x, eps)

    return _search(logits_fn, x, y, x_best, correct, n_queries, candidate)


def _eta_rectangles(rows: int, cols: int) -> np.ndarray:
    """The official `eta_rectangles` (L2): concentric rectangles around the centre, the k-th
    (k = 0, 1, ...) adding 1 / (k + 1)^2, normalised to L2 norm 1 (float32, as there)."""
    delta = np.zeros((rows, cols), np.float32)
    row, col = rows // 2, cols // 2
    for k in range(max(rows // 2, cols // 2) + 1):
        delta[max(row - k, 0):max(row + k + 1, 0), max(col - k, 0):max(col + k + 1, 0)] += \
            np.float32(1.0) / np.float32((k + 1) ** 2)
    total = np.sqrt(np.sum(delta ** 2, dtype=np.float32))
    return delta / total if delta.size else delta


def eta(side: int) -> np.ndarray:
    """The official `eta(s)` (L2), untransposed: centred rectangles on the upper half, their
    negation on the lower half, normalised to L2 norm 1; (side, side) float32."""
    delta = np.concatenate([_eta_rectangles(side // 2, side),
                            -_eta_rectangles(side - side // 2, side)])
    return (delta / np.sqrt(np.sum(delta ** 2, dtype=np.float32))).astype(np.float32)


def l2_window_sides(height: int, width: int, p_init: float = 0.8) -> np.ndarray:
    """The L2 window side after each number of halvings of p (0, ..., 9): as the official
    code, round(sqrt(p h w)), at least 3, made odd, at most min(h, w)."""
    sides = []
    for halvings in range(len(_P_BOUNDARIES) + 1):
        p = p_init / 2 ** halvings
        side = max(int(round(math.sqrt(p * height * width))), 3)
        side += 1 - side % 2
        sides.append(min(side, height, width))
    return np.asarray(sides)


def initial_tiles(height: int, width: int):
    """The official L2 start's grid: side s = h // 5 and the tiles' top-left corners, from
    (h - 5 s) // 2 in steps of s, h // s rows and w // s columns of them (a tile past the image
    is cut, as the official slices are; below 5 pixels, where the official code divides by
    zero, one tile per pixel). Returns (s, corners)."""
    side = height // 5
    start = (height - 5 * side) // 2
    if side == 0:
        side, start = 1, 0
    return side, [(start + i * side, start + j * side)
                  for i in range(height // side) for j in range(width // side)]


def _tile_patterns(height: int, width: int):
    """(patterns, transposed): (T, H, W) float32, tile t's eta (or its transpose) in place
    (zero for a tile wholly past the image, which still takes its draws, as in the official
    code)."""
    side, corners = initial_tiles(height, width)
    base = eta(side)
    patterns = np.zeros((2, len(corners), height, width), np.float32)
    for t, (r, c) in enumerate(corners):
        rows, cols = max(min(side, height - r), 0), max(min(side, width - c), 0)
        patterns[0, t, r:r + rows, c:c + cols] = base[:rows, :cols]
        patterns[1, t, r:r + rows, c:c + cols] = base.T[:rows, :cols]
    return patterns[0], patterns[1]


def _normalized(delta: jax.Array) -> jax.Array:
    """delta / (||delta||_2 + 1e-12) per example (the official `normalize`)."""
    return delta / per_example(norms(delta, "l2") + NORMALIZE_EPS, delta)


def _l2_random_draws(keys, shared_key, tiles: int, channels: int):
    """(initial draws, query i -> its draws) from the keys: per-example signs (the official
    code draws one per image and channel), shared positions and transpositions."""
    choice = lambda k, shape: jax.random.choice(k, jnp.array([-1.0, 1.0]), shape)
    init_key, query_key = jax.random.split(shared_key)
    initial = (jax.random.uniform(init_key, (tiles,)),
               jax.vmap(lambda k: choice(k, (tiles, channels)))(keys))
    sign_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)

    def query(i):
        signs = jax.vmap(lambda k: choice(jax.random.fold_in(k, i), (channels,)))(sign_keys)
        return jax.random.uniform(jax.random.fold_in(query_key, i), (5,)), signs

    return initial, query


def _l2_start(x, eps, initial):
    """The official L2 start: x + eps * normalize(the tiles' centred windows with their signs),
    in [0, 1]; initial = (tile transposition uniforms (T,), signs (B, T, C))."""
    patterns, transposed = (jnp.asarray(a) for a in _tile_patterns(*x.shape[1:3]))
    flips, signs = initial
    tiles = jnp.where((flips > 0.5)[:, None, None], transposed, patterns)
    delta = jnp.einsum("thw,btc->bhwc", tiles, signs, precision=HIGHEST)
    return jnp.clip(x + _normalized(delta) * eps, 0.0, 1.0)


def _l2_windows(height, width, p_init, i, uniforms):
    """Query i's two windows (boolean (H, W, 1) masks) and the new pattern placed in the
    first (its eta, transposed if the draw says so; (H, W, 1), zero outside)."""
    sides = l2_window_sides(height, width, p_init)
    table = np.zeros((len(sides), max(sides), max(sides)), np.float32)
    for k, side in enumerate(sides):
        table[k, :side, :side] = eta(int(side))
    halvings = jnp.sum(jnp.asarray(_P_BOUNDARIES) < i)
    side = jnp.asarray(sides)[halvings]
    corners = jnp.floor(uniforms[:4] * jnp.stack([height - side, width - side] * 2))
    corners = corners.astype(jnp.int32)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = lambda r, c: (rows >= r) & (rows < r + side) & (cols >= c) & (cols < c + side)
    first, second = inside(corners[0], corners[1]), inside(corners[2], corners[3])
    local_rows = jnp.clip(rows - corners[0], 0, table.shape[1] - 1)
    local_cols = jnp.clip(cols - corners[1], 0, table.shape[1] - 1)
    pattern = jnp.asarray(table)[halvings]
    pattern = jnp.where(uniforms[4] > 0.5, pattern[local_cols, local_rows],
                        pattern[local_rows, local_cols])
    return first[..., None], second[..., None], jnp.where(first, pattern, 0.0)[..., None]


def _l2_candidate(x, x_best, eps, first, second, pattern, signs):
    """The official L2 update: the first window gets pattern * signs plus its old content
    normalised per channel, rescaled to hold what both windows held (per channel) and the
    budget left (eps^2 - ||delta||^2, shared by the channels); the second window is emptied;
    the whole perturbation is rescaled to norm eps, then clipped to [0, 1]."""
    spatial = lambda v: jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))
    delta = x_best - x
    old = jnp.where(first, delta, 0.0)
    held = spatial(jnp.where(first | second, delta, 0.0))
    left = jnp.maximum(eps ** 2 - per_example(norms(delta, "l2"), delta) ** 2, 0.0)
    new = pattern * signs[:, None, None, :] + old / (NORMALIZE_EPS + spatial(old))
    new = new / (NORMALIZE_EPS + spatial(new)) * jnp.sqrt(left / x.shape[-1] + held ** 2)
    delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
    return jnp.clip(x + _normalized(delta) * eps, 0.0, 1.0)


def square_l2_stage(logits_fn, x, y, key, eps=0.5, n_queries=5000, p_init=0.8,
                    shared_key=None, draws=None):
    """Square Attack in L2: (x_adv, robust) for the points classified correctly.

    key: one key, or one per example (the signs of each image's windows); shared_key, when
    given, drives the window positions and transpositions shared by the batch (else derived
    from the first example's key). draws: None, or given draws in place of the random ones
    (tests replay the reference's): (start tile uniforms (T,), start signs (B, T, C), query
    uniforms (n_queries, 5): first window's row and column, second's, transposition; query
    signs (n_queries, B, C)); signs are +-1, a uniform > 0.5 transposes.
    """
    batch, height, width, channels = x.shape
    correct = jnp.argmax(logits_fn(x), axis=1) == y
    keys = example_keys(key, batch)
    if draws is None:
        loop_key = jax.random.fold_in(keys[0], 1) if shared_key is None else shared_key
        initial, query_draws = _l2_random_draws(keys, loop_key, len(initial_tiles(
            height, width)[1]), channels)
    else:
        initial, query_draws = draws[:2], lambda i: (draws[2][i], draws[3][i])

    def candidate(i, x_best):
        uniforms, signs = query_draws(i)
        windows = _l2_windows(height, width, p_init, i, uniforms)
        return _l2_candidate(x, x_best, eps, *windows, signs)

    return _search(logits_fn, x, y, _l2_start(x, eps, initial), correct, n_queries, candidate)
