"""The L2 attacks against the official AutoAttack code, step by step.

fixtures/make_l2_attack_traces.py runs the official code (norm='L2') on small fixed problems
and records what it computes (outside CI, with torch): FAB's L2 projection on random
hyperplanes, every point FAB-T evaluates, every candidate Square tries (its random draws
recorded and replayed here), every point APGD-CE evaluates. fpcm-jax must reproduce them to
float32 rounding: this pins the L2 branches (the projection and its box, step sizes and best
norms measured in L2, the final in-eps check, Square's centred windows and its norm-preserving
update, the acceptance, APGD's L2 start, steps and projection).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpcm_jax import attacks
from fpcm_jax.attacks.fab import projection_l2

HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on any backend (no TF32 on a GPU)


@functools.lru_cache(maxsize=None)
def traces():
    """tests/fixtures/official_l2_attack_traces.npz (made by fixtures/make_l2_attack_traces.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                        "official_l2_attack_traces.npz")
    return dict(np.load(path))


def recording_mlp(prefix, seen):
    """The fixture's MLP `prefix` as a logits_fn that appends every batch it is given to
    `seen`, in order."""
    arrays = traces()
    w1, b1, w2, b2 = (jnp.asarray(arrays[f"{prefix}/{k}"]) for k in ("w1", "b1", "w2", "b2"))

    def logits_fn(inputs):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), inputs, ordered=True)
        hidden = jnp.matmul(inputs.reshape(inputs.shape[0], -1), w1, precision=HIGHEST) + b1
        return jnp.matmul(jax.nn.relu(hidden), w2, precision=HIGHEST) + b2

    return logits_fn


def problem(prefix):
    """(x, y, eps) of the fixture's problem `prefix` as JAX arrays and a float."""
    arrays = traces()
    return (jnp.asarray(arrays[f"{prefix}/x"]), jnp.asarray(arrays[f"{prefix}/y"]),
            float(arrays.get(f"{prefix}/eps", 0.0)))


def test_fab_l2_projection_equals_the_official():
    """projection_l2 returns the official step on 60 random problems whose hyperplanes lie
    near and far from the points (30% of the coordinates on the box's faces, some weights
    zero), so the box decides most steps: the unclipped step -c w / |w|^2 differs from the
    official on 50 rows, of which 44 still reach the hyperplane within the box (the other 6
    stop at the box's nearest corner, as the official does)."""
    arrays = traces()
    points, w, b = (arrays[f"projection/{k}"] for k in ("points", "w", "b"))
    official = arrays["projection/d"]
    d = np.asarray(jax.jit(projection_l2)(jnp.asarray(points), jnp.asarray(w), jnp.asarray(b)))
    np.testing.assert_allclose(d, official, atol=2e-5, rtol=1e-5)
    c = np.sum(w * points, axis=1) - b
    unclipped = -(c / np.sum(w * w, axis=1))[:, None] * w
    boxed = np.abs(unclipped - official).max(axis=1) > 1e-3
    assert boxed.sum() == 50
    projected = points + d
    assert projected.min() >= -1e-6 and projected.max() <= 1 + 1e-6
    reached = np.abs(np.sum(w * projected, axis=1) - b) < 1e-3
    assert np.sum(boxed & reached) == 44
    np.testing.assert_array_equal(d[::6, :3], 0.0)  # zero weights: those coordinates stay


def test_fab_t_l2_follows_the_official_iterates():
    """From the clean point (no random start), every point FAB-T L2 evaluates (the iterate,
    then the stepped point, 20 iterations) equals the official one, and so does its output:
    steps and alpha in L2, the final check of the L2 norm against eps (0.1 here: 3 of the 6
    points are fooled within it, 3 only beyond). Over 3 target classes (100 iterations, eps
    0.3) the outputs are equal too: one point is fooled only by a later target, one only
    beyond eps, and the best perturbations kept (by their L2 norm) are the official's."""
    arrays = traces()
    x, y, eps = problem("fab")
    seen = []
    x_adv, robust = jax.jit(lambda x, y: attacks.fab_targeted_stage(
        recording_mlp("fab", seen), x, y, jax.random.key(0), eps, n_iter=20, norm="l2"))(x, y)
    jax.effects_barrier()
    points = np.stack(seen[1:-1])  # without the clean pass and the final check
    official = arrays["fab/points"]
    assert points.shape == official.shape
    for i, (ours, theirs) in enumerate(zip(points, official)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"evaluation {i}")
    np.testing.assert_allclose(np.asarray(x_adv), arrays["fab/x_adv"], atol=1e-5)
    assert np.sum(~np.asarray(robust)) == 3
    targets = jax.jit(lambda x, y: attacks.fab_targeted(
        recording_mlp("fab", []), x, y, jax.random.key(0), float(arrays["fab/targets_eps"]),
        n_target_classes=3, n_iter=100, norm="l2"))(x, y)
    np.testing.assert_allclose(np.asarray(targets), arrays["fab/x_adv_targets"], atol=1e-5)


def square_draws():
    """The official run's uniforms as fpcm-jax's L2 draws (signs are sign(2 u - 1), as the
    official random_choice)."""
    arrays = traces()
    sign = lambda uniform: np.sign(2 * uniform - 1)
    return tuple(jnp.asarray(d) for d in (
        arrays["square/tile_uniform"], sign(arrays["square/tile_signs_uniform"]),
        arrays["square/query_uniform"], sign(arrays["square/query_signs_uniform"])))


def test_square_l2_tries_the_official_candidates():
    """Replaying the official draws, every candidate Square L2 tries for a point it still
    attacks equals the official one: the first 12 queries in full, all 120 by their
    projections on 4 fixed random directions (a stored summary: the full candidates would
    not fit the fixture). A candidate is the kept point with two windows changed, so this
    pins the start (centred windows), the update that keeps the norm at eps, the window
    sides' schedule (9, 7, 5 here) and which candidates are kept; 3 of the 4 points are
    fooled, at different queries."""
    arrays = traces()
    x, y, eps = problem("square")
    seen = []
    official = arrays["square/projections"]
    x_adv, robust = jax.jit(lambda x, y, draws: attacks.square_stage(
        recording_mlp("square", seen), x, y, jax.random.key(0), eps, len(official), draws=draws,
        norm="l2"))(x, y, square_draws())
    jax.effects_barrier()
    queries = np.stack(seen[2:-1])  # without the clean pass, the start and the final check
    assert len(queries) == len(official)
    attacked = ~np.isnan(official).any(axis=2)
    full = arrays["square/candidates"]
    for i, (ours, theirs) in enumerate(zip(queries[:len(full)], full)):
        np.testing.assert_allclose(ours[attacked[i]], theirs[attacked[i]], atol=1e-6,
                                   err_msg=f"query {i}")
    projections = queries.reshape(len(queries), len(x), -1) @ arrays["square/directions"]
    for i, (ours, theirs) in enumerate(zip(projections, official)):
        np.testing.assert_allclose(ours[attacked[i]], theirs[attacked[i]], atol=2e-5,
                                   err_msg=f"query {i}")
    assert np.sum(~np.asarray(robust)) == 3
    np.testing.assert_allclose(np.asarray(x_adv), arrays["square/x_adv"], atol=1e-6)


# Point 3 of the problem (clean margin 0.0076) is fooled at once and then sits on a plateau of
# the cross-entropy: from iteration 30 to 38 its official loss (2.8444) changes by 3e-9 to
# 3.4e-7 per step, at or below float32's resolution there (2.4e-7). The step-size checkpoint at
# iteration 37 counts the loss increases of its window (`loss_steps[i] > loss_steps[i - 1]`),
# so whether it halves the step and restarts from the best point is decided by rounding; after
# it the official loss jumps by 8.4e-4 (iteration 39), and ours may take the other branch.
# Measured 2026-12-07 (2-core CPU): point 3 within 1e-7 of the official iterates up to
# iteration 38 and at most 9.6e-5 from 39 on when compiled as one program (8.6e-6 op by op);
# on two other 2-core machines (2026-12-02/03) at most 6e-5 and 9.6e-5. The other five points
# stay within 3e-7 (bound 1e-5). Point 3's bound is 3e-4; a wrong step, projection, momentum
# or schedule moves every point by 1e-2 or more. (The earlier note put point 3 on a ReLU
# kink: its pre-activations stay at least 0.022 from 0 at every official iterate, the largest
# margin of the six points, so that was not the cause.)
SENSITIVE_POINT, SENSITIVE_ATOL = 3, 3e-4


@pytest.mark.parametrize("jitted", [False, True])
def test_apgd_ce_l2_follows_the_official_iterates(jitted):
    """From the official gaussian start, every point APGD-CE L2 evaluates (50 iterations)
    equals the official one: the start scaled to the eps-sphere, steps along the normalised
    gradient, the L2 projection, and the step-size schedule (halved 5 times here); op by op
    and compiled as one program (jax.jit, as AutoAttack runs every stage)."""
    arrays = traces()
    x, y, eps = problem("fab")
    eps = float(arrays["apgd/eps"])
    official = arrays["apgd/points"]
    seen = []
    stage = lambda x, y, start: attacks.apgd_stage(recording_mlp("fab", seen), x, y,
                                                   jax.random.key(0), eps, len(official) - 1,
                                                   "ce", start_noise=start, norm="l2")
    x_adv, _, _ = (jax.jit(stage) if jitted else stage)(
        x, y, jnp.asarray(arrays["apgd/start_normal"]))
    jax.effects_barrier()
    points = np.stack(seen[1:])  # without the clean pass
    assert points.shape == official.shape
    steps = arrays["apgd/step_size"]
    others = np.arange(len(x)) != SENSITIVE_POINT
    for i, (ours, theirs) in enumerate(zip(points, official)):
        message = f"iteration {i}; official step sizes / eps there: {steps[i] / eps}"
        np.testing.assert_allclose(ours[others], theirs[others], atol=1e-5, err_msg=message)
        np.testing.assert_allclose(ours, theirs, atol=SENSITIVE_ATOL, err_msg=message)
    np.testing.assert_allclose(np.asarray(x_adv)[others], arrays["apgd/x_adv"][others],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_adv), arrays["apgd/x_adv"], atol=SENSITIVE_ATOL)
