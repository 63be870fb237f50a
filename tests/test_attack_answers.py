"""Attacks against exact answers: linear models, whose L-inf robust accuracy in [0, 1] is known.

For logits z = x W + b and a pair (y, k), the smallest z_y - z_k over the eps-ball intersected
with the [0, 1] box is reached coordinate by coordinate at the lower bound max(x - eps, 0) where
w_y - w_k > 0 and at the upper bound min(x + eps, 1) elsewhere; a point is robust iff all these
minima over k != y are positive (the worst case over the ball is separable by pair). The fixed
problems put points on both sides of eps with a gap (their smallest adversarial radius is below
0.7 eps or above 1.2 eps) and several whose verdict the box decides, so an attack that is exact
must match the closed form point for point, and one that steps outside the box is caught.
FAB's projection is checked against the LP it solves (`scipy.optimize.linprog`). APGD's schedule
and Square's acceptance are checked iteration by iteration against traces of the official
AutoAttack code (fixtures/make_attack_traces.py records them, outside CI).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from fpcm_jax import attacks

EPS = 0.1
SHAPE = (4, 4, 1)  # NHWC images: Square needs a height and a width
CANDIDATES = 20000
# How many points of each kind a problem holds (see `_pick_points`); the last MISCLASSIFIED
# robust ones get a wrong label.
KINDS = {"fooled": 8, "fooled_box_matters": 4, "robust_by_box": 5, "robust": 11}
MISCLASSIFIED = 3
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on any backend (no TF32 on a GPU)


def worst_case_margins(W, b, x, y, eps, box=True):
    """(N, C): min of z_y - z_k over the eps-ball (and the [0, 1] box); +inf at k = y."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    low, high = flat - eps, flat + eps
    if box:
        low, high = np.maximum(low, 0.0), np.minimum(high, 1.0)
    gaps = W.T[y][:, None, :] - W.T[None, :, :]  # w_y - w_k, (N, C, D)
    worst = np.where(gaps > 0, low[:, None, :], high[:, None, :])
    margins = np.sum(gaps * worst, axis=-1) + (b[y][:, None] - b[None, :])
    margins[np.arange(len(y)), y] = np.inf
    return margins


def exact_robust(W, b, x, y, eps, box=True):
    """The closed-form robust flags: every pairwise worst-case margin positive."""
    return worst_case_margins(W, b, x, y, eps, box).min(axis=1) > 0


def smallest_radius(W, b, x, y, box=True):
    """Per point, the smallest eps at which it is fooled (bisection on the closed form)."""
    low, high = np.zeros(len(x)), np.ones(len(x))
    for _ in range(40):
        middle = (low + high) / 2
        robust = exact_robust(W, b, x, y, middle[:, None], box)
        low, high = np.where(robust, middle, low), np.where(robust, high, middle)
    return low


def _pick_points(radius_box, radius_free):
    """Indices of the candidates of each kind, in units of EPS (radius > 1: robust)."""
    rb, rf = radius_box / EPS, radius_free / EPS
    kinds = {
        "fooled": (rb > 0.3) & (rb < 0.7) & (np.abs(rb - rf) < 1e-6),
        "fooled_box_matters": (rb > 0.3) & (rb < 0.7) & (rb - rf > 0.1),
        "robust_by_box": (rf < 0.85) & (rb > 1.2) & (rb < 3.0),
        "robust": (rb > 1.2) & (rb < 3.0) & (np.abs(rb - rf) < 1e-6),
    }
    chosen = [np.flatnonzero(mask)[:KINDS[name]] for name, mask in kinds.items()]
    assert all(len(c) == KINDS[name] for c, name in zip(chosen, kinds)), "too few candidates"
    return np.concatenate(chosen)


@functools.lru_cache(maxsize=None)
def linear_problem(classes):
    """(W, b, x, y, logits_fn): a fixed linear model and points around its eps-boundary.

    Candidates are uniform in [-0.5, 1.5] clipped to [0, 1] (half their pixels saturated, so
    the box matters); labels are the model's predictions, except for MISCLASSIFIED points.
    """
    rng = np.random.default_rng(classes)
    dim = int(np.prod(SHAPE))
    W = (2 * rng.random((dim, classes)) - 1).astype(np.float32)
    b = (0.2 * (2 * rng.random(classes) - 1)).astype(np.float32)
    x = np.clip(2 * rng.random((CANDIDATES,) + SHAPE) - 0.5, 0, 1).astype(np.float32)
    y = (x.reshape(CANDIDATES, -1) @ W + b).argmax(axis=1)
    chosen = _pick_points(smallest_radius(W, b, x, y), smallest_radius(W, b, x, y, False))
    x, y = x[chosen], y[chosen].copy()
    y[-MISCLASSIFIED:] = (y[-MISCLASSIFIED:] + 1) % classes
    weights, bias = jnp.asarray(W), jnp.asarray(b)

    def logits_fn(inputs):
        return jnp.matmul(inputs.reshape(inputs.shape[0], -1), weights, precision=HIGHEST) + bias

    return W, b, x, y.astype(np.int32), logits_fn


def run_attack(name, classes, seed=0, **options):
    """(x_adv, robust flags) of the attack `name` on the problem with `classes` classes."""
    W, b, x, y, logits_fn = linear_problem(classes)
    attack = attacks.get(name, eps=EPS, **options)
    x_adv = np.asarray(jax.jit(lambda x, y, k: attack(logits_fn, x, y, k))(
        jnp.asarray(x), jnp.asarray(y), jax.random.key(seed)))
    robust = np.asarray(logits_fn(jnp.asarray(x_adv))).argmax(axis=1) == y
    return x_adv, robust


def assert_in_ball_and_box(x_adv, x):
    assert np.abs(x_adv - x).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_the_problems_are_sharp():
    """eps and the box both decide verdicts: the closed form is not a trivial target."""
    for classes in (2, 4):
        W, b, x, y, logits_fn = linear_problem(classes)
        clean = np.asarray(logits_fn(jnp.asarray(x))).argmax(axis=1) == y
        exact = exact_robust(W, b, x, y, EPS)
        assert clean.sum() == len(y) - MISCLASSIFIED
        assert (clean & ~exact).sum() == KINDS["fooled"] + KINDS["fooled_box_matters"]
        free = exact_robust(W, b, x, y, EPS, box=False)
        assert np.sum(exact & ~free) >= KINDS["robust_by_box"]


def worst_case_point(W, b, x, y):
    """Binary models: the closed-form minimiser x - eps sign(w_y - w_k), clipped to [0, 1]."""
    gaps = W.T[y] - W.T[1 - y]
    step = -EPS * np.sign(gaps).reshape(x.shape)
    return np.clip(np.clip(x + step, x - EPS, x + EPS), 0.0, 1.0)


@pytest.mark.parametrize("name,options", [("fgsm", {}), ("pgd4", {"step_size": EPS / 2})])
def test_sign_attacks_land_on_the_worst_case_point_of_a_binary_model(name, options):
    """On two classes the sign of the CE gradient is sign(w_k - w_y) everywhere, so FGSM (one
    step of eps) and PGD (4 steps of eps/2: just enough to cross the ball from any start) end on
    the closed-form minimiser, for robust and fooled points alike."""
    W, b, x, y, _ = linear_problem(2)
    x_adv, robust = run_attack(name, 2, **options)
    assert_in_ball_and_box(x_adv, x)
    np.testing.assert_allclose(x_adv, worst_case_point(W, b, x, y), atol=1e-6)
    np.testing.assert_array_equal(robust, exact_robust(W, b, x, y, EPS))


WHITE_BOX = {"pgd10": {"step_size": EPS / 4}, "cw10": {"step_size": EPS / 4},
             "apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_target_classes": 3},
             "fab-t": {"n_iter": 10, "n_target_classes": 3}, "fgsm": {}}


@pytest.mark.parametrize("name", list(WHITE_BOX))
def test_white_box_attacks_reach_the_exact_robust_accuracy(name):
    """Four classes: each attack's per-point verdicts equal the closed form. Measured over
    keys 0-4 (`run_attack(name, 4, key)`): 0 differing points for every attack and key.
    FGSM is not exact on several classes in general; here its single step suffices because
    every fooled point is fooled at 0.7 eps (deterministic: no random start)."""
    W, b, x, y, _ = linear_problem(4)
    x_adv, robust = run_attack(name, 4, **WHITE_BOX[name])
    assert_in_ball_and_box(x_adv, x)
    np.testing.assert_array_equal(robust, exact_robust(W, b, x, y, EPS))


@pytest.mark.parametrize("classes,most_missed", [(2, 5), (4, 8)])
def test_square_is_sound_and_finds_most(classes, most_missed):
    """Square never fools a robust point and misses at most `most_missed` of the 12 fooled
    correct points. Over keys 0-19 with 300 queries it missed 0-4 (binary, mean 0.7) and 4-7
    (four classes, mean 5.9), measured with `run_attack("square", classes, key)`. It cannot
    be exact here: as in the reference (`random_int(0, h - s)`), a window of side s < h starts
    at row/column h - s - 1 at most, so it never covers the last row or column, whose pixels
    keep their initial stripe (and the greedy search on a margin over several classes can
    stall at a local minimum)."""
    W, b, x, y, _ = linear_problem(classes)
    x_adv, robust = run_attack("square", classes, n_queries=300)
    assert_in_ball_and_box(x_adv, x)
    exact = exact_robust(W, b, x, y, EPS)
    assert not np.any(exact & ~robust)
    assert np.sum(robust & ~exact) <= most_missed


def test_fab_finds_the_minimal_adversarial_radius():
    """With eps = 1 every point is fooled; on a linear model FAB's first step lands at 1.05
    times the smallest radius (extrapolation eta) and its second within 1.01 (measured:
    1.0052-1.0086, so 1.02 leaves room); more iterations keep that."""
    W, b, x, y, logits_fn = linear_problem(2)
    correct = np.asarray(logits_fn(jnp.asarray(x))).argmax(axis=1) == y
    stage = jax.jit(lambda x, y: attacks.fab_targeted_stage(logits_fn, x, y, jax.random.key(0),
                                                            eps=1.0, n_iter=2))
    x_adv, robust = stage(jnp.asarray(x), jnp.asarray(y))
    assert not np.any(np.asarray(robust))
    radius = np.abs(np.asarray(x_adv) - x).reshape(len(x), -1).max(axis=1)
    ratio = radius[correct] / smallest_radius(W, b, x, y)[correct]
    assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.02


def linprog_step(point, w, b):
    """The smallest L-inf step d with <w, point + d> = b and point + d in [0, 1], as an LP in
    (d, t): minimise t subject to -t <= d_j <= t."""
    dim = len(point)
    cost = np.r_[np.zeros(dim), 1.0]
    rows = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    bounds = [(-p, 1.0 - p) for p in point] + [(0, None)]
    solution = linprog(cost, A_ub=rows, b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None],
                       b_eq=[b - w @ point], bounds=bounds, method="highs")
    assert solution.status == 0
    return solution.x[-1]


def test_fab_projection_is_the_lp_solution():
    """projection_linf's step has the LP's optimal L-inf norm (and meets its constraints) on
    random seeded problems, including hyperplanes cut by the box and zero weights."""
    rng = np.random.default_rng(7)
    points = rng.random((40, 12))
    w = rng.normal(size=(40, 12))
    w[::5, :4] = 0.0  # zero weights: those coordinates must not move
    b = np.sum(w * points, axis=1) + rng.normal(scale=1.0, size=40)
    d = np.asarray(attacks.projection_linf(jnp.asarray(points, jnp.float32),
                                           jnp.asarray(w, jnp.float32),
                                           jnp.asarray(b, jnp.float32)), np.float64)
    projected = points + d
    assert projected.min() >= -1e-6 and projected.max() <= 1 + 1e-6
    np.testing.assert_allclose(np.sum(w * projected, axis=1), b, atol=1e-4)
    np.testing.assert_array_equal(d[::5, :4], 0.0)
    optimal = np.array([linprog_step(p, wi, bi) for p, wi, bi in zip(points, w, b)])
    np.testing.assert_allclose(np.abs(d).max(axis=1), optimal, rtol=1e-4, atol=1e-6)


@functools.lru_cache(maxsize=None)
def official_traces():
    """tests/fixtures/official_attack_traces.npz (made by fixtures/make_attack_traces.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                        "official_attack_traces.npz")
    return dict(np.load(path))


def recording_mlp(seen):
    """The fixture's MLP as a logits_fn that appends every batch it is given to `seen`."""
    arrays = official_traces()
    w1, b1, w2, b2 = (jnp.asarray(arrays[k]) for k in ("w1", "b1", "w2", "b2"))

    def logits_fn(inputs):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), inputs, ordered=True)
        hidden = jnp.matmul(inputs.reshape(inputs.shape[0], -1), w1, precision=HIGHEST) + b1
        return jnp.matmul(jax.nn.relu(hidden), w2, precision=HIGHEST) + b2

    return logits_fn


def traced_apgd(loss, n_iter, jitted=False):
    """fpcm-jax's APGD on the fixture's MLP from the official start: (every point it
    evaluates, in order, without the clean pass; x_adv). jitted: the stage compiled as one
    program, as AutoAttack runs it."""
    arrays = official_traces()
    seen = []
    logits_fn = recording_mlp(seen)
    noise = 2.0 * arrays["start_uniform"] - np.float32(1.0)  # the official 2 * rand - 1
    stage = lambda x, y, start_noise: attacks.apgd_stage(
        logits_fn, x, y, jax.random.key(0), float(arrays["eps"]), n_iter, loss, target_rank=2,
        start_noise=start_noise)
    x_adv, _, _ = (jax.jit(stage) if jitted else stage)(
        jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"]), jnp.asarray(noise))
    jax.effects_barrier()
    return np.stack(seen[1:]), np.asarray(x_adv)


# The largest difference from the official iterates, measured 2026-12-07 on the 2-core CPU:
# 5.96e-8 (one float32 step at 0.5) for both losses, op by op and compiled as one program
# (where XLA fuses and reorders float32 arithmetic); the tolerance below, 1e-5, leaves room
# for another machine's fusions.


@pytest.mark.parametrize("jitted", [False, True])
@pytest.mark.parametrize("loss,n_iter", [("ce", 100), ("dlr-targeted", 30)])
def test_apgd_follows_the_official_iterates(loss, n_iter, jitted):
    """From the same start, every point APGD evaluates equals the official code's, iteration
    by iteration: this pins the step sizes and their halving at the checkpoints, the restarts
    from the best point and the momentum. The official run halves its step size many times
    (2 eps down to eps/128 and below) and restarts; the first differing iteration is named.
    Also compiled as one program (jax.jit, as AutoAttack runs every stage)."""
    arrays = official_traces()
    official = arrays[f"{loss}/points"]
    steps = arrays[f"{loss}/step_size"]
    assert len(np.unique(steps[1:])) >= 5  # the schedule acts: the step size is halved
    points, x_adv = traced_apgd(loss, n_iter, jitted)
    assert points.shape == official.shape
    for i, (ours, theirs) in enumerate(zip(points, official)):
        np.testing.assert_allclose(
            ours, theirs, atol=1e-5, err_msg=f"iteration {i} (0: the start); official step "
            f"sizes / eps there: {steps[i] / arrays['eps']}")
    np.testing.assert_allclose(x_adv, arrays[f"{loss}/x_adv"], atol=1e-5)


def test_square_accepts_as_the_official_code_does():
    """Replaying the official run's draws (stripes, window positions and signs), every
    candidate Square tries for a point it still attacks equals the official one, query by
    query: a candidate is the kept point plus the new window, so this pins which changes are
    kept (a lower margin, or a misclassification) and that fooled points stop. In the official
    run 4 of the 6 points are fooled (at different queries) and 2 survive 200 queries."""
    arrays = official_traces()
    official = arrays["square/candidates"]
    seen = []
    sign = lambda uniform: np.sign(2 * uniform - 1)  # the official random_choice
    draws = (sign(arrays["square/stripes_uniform"]).transpose(0, 2, 3, 1),
             arrays["square/window_uniform"], sign(arrays["square/signs_uniform"]))
    x_adv, robust = attacks.square_stage(
        recording_mlp(seen), jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"]),
        jax.random.key(0), float(arrays["square/eps"]), len(official),
        draws=tuple(jnp.asarray(d) for d in draws))
    jax.effects_barrier()
    queries = np.stack(seen[2:-1])  # without the clean pass, the start and the final check
    assert queries.shape == official.shape
    for i, (ours, theirs) in enumerate(zip(queries, official)):
        attacked = ~np.isnan(theirs).any(axis=(1, 2, 3))
        np.testing.assert_allclose(ours[attacked], theirs[attacked], atol=1e-6,
                                   err_msg=f"query {i}")
    assert np.sum(~np.asarray(robust)) == 4
    np.testing.assert_allclose(np.asarray(x_adv), arrays["square/x_adv"], atol=1e-6)
