"""L2 attacks against exact answers: linear models, whose L2 robust accuracy in [0, 1] is known.

For logits z = x W + b, a correctly classified point x is fooled within eps iff for some k != y
the half-space {z_k >= z_y} intersected with the box [0, 1]^D lies within L2 distance eps.
With g = w_y - w_k and c = b_y - b_k, that distance is (g.x + c) / ||g||_2 without the box;
with it, the nearest point is clip(x - lam g, 0, 1) for the lam >= 0 at which g.x' + c = 0
(the QP's optimality condition: the margin falls monotonically in lam), found by bisection.
The fixed problems put points on both sides of eps with a gap (smallest adversarial radius
below 0.7 eps or above 1.2 eps) and several whose verdict the box decides, so an attack that is
exact must match the closed form point for point, and one that leaves the box is caught.
The closed form is checked against a general QP solver; PGD's L2 start and projection
(torchattacks' PGDL2) and APGD's first L2 iterates (the official formulas) are pinned directly;
FAB-T's radius is compared with the smallest one, Square's misses with measured bounds.
Attacks run eagerly (`run_attack`); EPS = 0.3 suits these 5x5 images as 0.5 suits CIFAR-10's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from fpcm_jax import attacks

EPS = 0.3
SHAPE = (5, 5, 1)  # NHWC images: Square needs a height and a width (the official L2 one, 5)
CANDIDATES = 6000
# How many points of each kind a problem holds (see `_pick_points`); the last MISCLASSIFIED
# robust ones get a wrong label.
KINDS = {"fooled": 8, "fooled_box_matters": 4, "robust_by_box": 5, "robust": 11}
MISCLASSIFIED = 3
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on any backend (no TF32 on a GPU)
BISECTIONS = 60


def pair_gaps(W, b, x, y):
    """(g, c) per point and class: z_y - z_k = g . x + c; g (N, C, D), c (N, C)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    g = W.T[y][:, None, :].astype(np.float64) - W.T[None, :, :]
    c = (b[y][:, None] - b[None, :]).astype(np.float64)
    return flat, g, c


def pair_distances(W, b, x, y, box=True):
    """(N, C): the L2 distance from each point to {z_k >= z_y} (within the box); +inf at k = y
    and where the box holds no such point."""
    flat, g, c = pair_gaps(W, b, x, y)
    point = np.broadcast_to(flat[:, None, :], g.shape)
    margin0 = np.sum(g * point, axis=-1) + c
    if not box:
        with np.errstate(invalid="ignore"):  # 0 / 0 at k = y
            distance = np.maximum(margin0, 0.0) / np.linalg.norm(g, axis=-1)
    else:
        # margin(lam) = g . clip(x - lam g, 0, 1) + c falls with lam; every coordinate with
        # g_j != 0 is at a face of the box once lam >= 1 / |g_j|.
        lam_high = 1.0 / np.maximum(np.abs(g).min(axis=-1, where=g != 0, initial=np.inf), 1e-12)
        reachable = np.sum(g * np.clip(point - lam_high[..., None] * g, 0, 1), -1) + c <= 0
        low, high = np.zeros(margin0.shape), lam_high
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            above = np.sum(g * np.clip(point - middle[..., None] * g, 0, 1), -1) + c > 0
            low, high = np.where(above, middle, low), np.where(above, high, middle)
        nearest = np.clip(point - high[..., None] * g, 0, 1)
        distance = np.where(reachable, np.linalg.norm(nearest - point, axis=-1), np.inf)
        distance = np.where(margin0 <= 0, 0.0, distance)
    distance[np.arange(len(y)), y] = np.inf
    return distance


def smallest_radius(W, b, x, y, box=True):
    """Per point, the smallest L2 eps at which it is fooled (0 if misclassified)."""
    return pair_distances(W, b, x, y, box).min(axis=1)


def exact_robust(W, b, x, y, eps, box=True):
    """The closed-form robust flags."""
    return smallest_radius(W, b, x, y, box) > eps


def _pick_points(radius_box, radius_free):
    """Indices of the first candidates of each kind of KINDS, by their smallest adversarial
    radius with and without the box, in units of EPS (above 1: robust)."""
    rb, rf = radius_box / EPS, radius_free / EPS
    fooled, robust = (rb > 0.3) & (rb < 0.7), (rb > 1.2) & (rb < 3.0)
    box_free = np.abs(rb - rf) < 1e-6  # the box does not change the radius
    masks = {"fooled": fooled & box_free, "fooled_box_matters": fooled & (rb - rf > 0.1),
             "robust_by_box": robust & (rf < 0.85), "robust": robust & box_free}
    chosen = [np.flatnonzero(masks[name])[:count] for name, count in KINDS.items()]
    assert [len(c) for c in chosen] == list(KINDS.values()), "too few candidates"
    return np.concatenate(chosen)


@functools.lru_cache(maxsize=None)
def linear_problem(classes):
    """(W, b, x, y, logits_fn): a fixed linear model and points around its eps-boundary.

    Half the candidates are uniform in [-2, 3] clipped to [0, 1] (80% of their pixels
    saturated, so the box matters), half uniform in [0.1, 0.9] (the box rarely matters);
    labels are the model's predictions, except for MISCLASSIFIED points.
    """
    rng = np.random.default_rng(classes)
    dim = int(np.prod(SHAPE))
    W = (2 * rng.random((dim, classes)) - 1).astype(np.float32)
    b = (0.2 * (2 * rng.random(classes) - 1)).astype(np.float32)
    saturated = np.clip(5 * rng.random((CANDIDATES // 2,) + SHAPE) - 2, 0, 1)
    inner = 0.1 + 0.8 * rng.random((CANDIDATES // 2,) + SHAPE)
    x = np.stack([saturated, inner], axis=1).reshape((CANDIDATES,) + SHAPE).astype(np.float32)
    y = (x.reshape(CANDIDATES, -1) @ W + b).argmax(axis=1)
    chosen = _pick_points(smallest_radius(W, b, x, y), smallest_radius(W, b, x, y, False))
    labels = y[chosen].astype(np.int32)
    labels[-MISCLASSIFIED:] = (labels[-MISCLASSIFIED:] + 1) % classes
    return W, b, x[chosen], labels, linear_logits_fn(W, b)


def linear_logits_fn(W, b):
    """inputs -> flat(inputs) W + b (float32 matmuls on any backend)."""
    weights, bias = jnp.asarray(W), jnp.asarray(b)
    return lambda inputs: jnp.matmul(inputs.reshape(len(inputs), -1), weights,
                                     precision=HIGHEST) + bias


def run_attack(attack, classes, seed=0, **options):
    """(x_adv, robust flags) of `attack` in L2 on the problem with `classes` classes.

    Run eagerly (op by op, loops unrolled): every attack here reuses the same few compiled
    primitives, where compiling each attack under jit cost about 1.4 s of CPU time."""
    W, b, x, y, logits_fn = linear_problem(classes)
    x_adv = attack(logits_fn, jnp.asarray(x), jnp.asarray(y), jax.random.key(seed), eps=EPS,
                   norm="l2", **options)
    x_adv = np.asarray(x_adv)
    robust = np.asarray(logits_fn(jnp.asarray(x_adv))).argmax(axis=1) == y
    return x_adv, robust


def l2_lengths(x_adv, x):
    """Per-example L2 norms of x_adv - x, in float64."""
    return np.linalg.norm((x_adv - x).reshape(len(x), -1).astype(np.float64), axis=1)


def assert_in_ball_and_box(x_adv, x, eps=EPS):
    assert l2_lengths(x_adv, x).max() <= eps * (1 + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("classes", [2, 4])
def test_the_problems_are_sharp(classes):
    """eps and the box both decide verdicts: the closed form is not a trivial target (points
    the box keeps robust, fooled points whose radius the box lengthens)."""
    W, b, x, y, logits_fn = linear_problem(classes)
    correct = np.asarray(logits_fn(jnp.asarray(x))).argmax(axis=1) == y
    radius, free = smallest_radius(W, b, x, y), smallest_radius(W, b, x, y, box=False)
    np.testing.assert_array_equal(correct, np.arange(len(y)) < len(y) - MISCLASSIFIED)
    fooled = correct & (radius <= EPS)
    assert fooled.sum() == KINDS["fooled"] + KINDS["fooled_box_matters"]
    assert np.sum(fooled & (radius > free + 0.1 * EPS)) == KINDS["fooled_box_matters"]
    assert np.sum(correct & (radius > EPS) & (free <= EPS)) >= KINDS["robust_by_box"]


def qp_distance(point, g, c):
    """min ||d||_2 with g . (point + d) + c <= 0 and point + d in [0, 1], by SLSQP."""
    solution = minimize(lambda d: d @ d, np.zeros_like(point), jac=lambda d: 2 * d,
                        bounds=[(-p, 1.0 - p) for p in point], method="SLSQP",
                        constraints=[{"type": "ineq", "fun": lambda d: -(g @ (point + d) + c),
                                      "jac": lambda d: -g}], options={"ftol": 1e-12})
    assert solution.success
    return np.sqrt(solution.fun)


def test_the_closed_form_is_the_qp_solution():
    """The bisection's distances equal a general QP solver's (SLSQP) for every pair of a few
    points of each kind, box-bound ones included; without the box they are the plain
    hyperplane distances."""
    W, b, x, y, _ = linear_problem(4)
    flat, g, c = pair_gaps(W, b, x, y)
    ours = pair_distances(W, b, x, y)
    some = np.arange(0, len(x), 3)
    for i in some:
        for k in set(range(4)) - {y[i]}:
            np.testing.assert_allclose(ours[i, k], qp_distance(flat[i], g[i, k], c[i, k]),
                                       rtol=1e-5, atol=1e-7)
    free = pair_distances(W, b, x, y, box=False)
    hyperplane = (np.sum(g * flat[:, None], -1) + c) / np.linalg.norm(g, axis=-1).clip(1e-30)
    others = ~np.eye(4, dtype=bool)[y]
    np.testing.assert_allclose(free[others], np.maximum(hyperplane[others], 0), rtol=1e-9)
    assert np.all(ours[others] >= free[others] - 1e-9)
    assert np.sum(ours[some][others[some]] > 1.1 * free[some][others[some]]) >= 3  # box-bound


def worst_case_point(W, x, y):
    """Binary models: the minimiser of z_y - z_k over the L2 ball, x - eps g / ||g||_2 with
    g = w_y - w_k (the box left aside)."""
    gaps = (W.T[y] - W.T[1 - y]).astype(np.float64)
    step = EPS * gaps / np.linalg.norm(gaps, axis=1, keepdims=True)
    return x - step.reshape(x.shape)


@pytest.mark.parametrize("name,attack,options", [
    ("fgm", attacks.fgm, {}),
    ("pgd10", attacks.pgd, {"step_size": 2 * EPS, "steps": 10})])
def test_fgm_and_pgd_land_on_the_worst_case_point_of_a_binary_model(name, attack, options):
    """On two classes the CE gradient is a positive multiple of w_k - w_y everywhere, so FGM
    (one normalised step of eps) lands on the closed-form minimiser, and so does PGD (steps of
    2 eps: after each projection onto the sphere the perturbation's part off that direction
    shrinks at least 3-fold, 3^-9 eps < 1e-5 after 10 steps) wherever the box does not cut it;
    verdicts equal the closed form for every point."""
    W, b, x, y, _ = linear_problem(2)
    x_adv, robust = run_attack(attack, 2, **options)
    assert_in_ball_and_box(x_adv, x)
    worst = worst_case_point(W, x, y)
    inside = np.all((worst >= 0) & (worst <= 1), axis=(1, 2, 3))
    assert inside.sum() >= 12
    np.testing.assert_allclose(x_adv[inside], worst[inside], atol=1e-5)
    np.testing.assert_array_equal(robust, exact_robust(W, b, x, y, EPS))


WHITE_BOX = {  # name: (attack, options)
    "fgm": (attacks.fgm, {}),
    "pgd10": (attacks.pgd, {"step_size": EPS / 4, "steps": 10}),
    "cw10": (attacks.cw, {"step_size": EPS / 4, "steps": 10}),
    "apgd-ce": (attacks.apgd, {"n_iter": 10, "loss": "ce", "unroll": True}),
    "apgd-t": (attacks.apgd_targeted, {"n_iter": 10, "n_target_classes": 3, "unroll": True}),
    "fab-t": (attacks.fab_targeted, {"n_iter": 10, "n_target_classes": 3, "unroll": True}),
}


@pytest.mark.parametrize("name", list(WHITE_BOX))
def test_white_box_l2_attacks_reach_the_exact_robust_accuracy(name):
    """Four classes: each attack's per-point verdicts equal the closed form, and every x_adv
    lies in the L2 ball and the box. Measured over keys 0-4 (and on the binary problem, APGD-T
    aside): 0 differing points for every attack and key. FGM is not exact in general (one
    step, which the box cuts); here it suffices because every fooled point is fooled at 0.7 eps
    (and it is deterministic)."""
    W, b, x, y, _ = linear_problem(4)
    attack, options = WHITE_BOX[name]
    x_adv, robust = run_attack(attack, 4, **options)
    assert_in_ball_and_box(x_adv, x)
    np.testing.assert_array_equal(robust, exact_robust(W, b, x, y, EPS))


def test_pgd_l2_start_and_projection():
    """uniform_start (L2): directions isotropic and lengths uniform in [0, eps] (as
    torchattacks' PGDL2), inside the box; project: a perturbation longer than eps is scaled
    back to length eps along its direction, a shorter one is kept, then the box clips.
    (Batches shaped as the problem's, so the attacks' compiled operations are reused.)"""
    batch = len(linear_problem(4)[2])
    centre = np.full((batch,) + SHAPE, 0.5, np.float32)  # a ball of radius 0.3 stays inside
    starts = np.concatenate([np.asarray(attacks.uniform_start(jax.random.key(i), centre, EPS,
                                                              "l2")) for i in range(64)])
    lengths = l2_lengths(starts, np.full_like(starts, 0.5))
    assert lengths.max() <= EPS * (1 + 1e-6) and lengths.min() < 0.02 * EPS
    assert abs(lengths.mean() - EPS / 2) < 0.03 * EPS and lengths.max() > 0.98 * EPS
    directions = (starts - 0.5).reshape(len(starts), -1) / lengths[:, None]
    assert np.linalg.norm(directions.mean(axis=0)) < 0.1
    corner = np.zeros_like(centre)
    start = np.asarray(attacks.uniform_start(jax.random.key(0), corner, EPS, "l2"))
    assert_in_ball_and_box(start, corner)
    assert np.all(l2_lengths(start, corner) > 0)

    rng = np.random.default_rng(0)
    x = rng.random(centre.shape).astype(np.float32)
    delta = rng.normal(size=x.shape)
    wanted = np.resize([0.1, 0.5, 1.0, 2.0, 4.0, 0.0], batch) * EPS
    delta = (delta * (wanted / l2_lengths(delta, 0 * delta)).reshape(-1, 1, 1, 1))
    projected = np.asarray(attacks.project(jnp.asarray(x + delta, jnp.float32), jnp.asarray(x),
                                           EPS, "l2"))
    scale = np.minimum(1.0, EPS / np.maximum(wanted, 1e-30)).reshape(-1, 1, 1, 1)
    expected = np.clip(x + delta * scale, 0, 1)
    np.testing.assert_allclose(projected, expected, atol=1e-6)
    assert np.abs(projected - np.clip(x + delta, 0, 1)).max() > 0.1  # the ball acted
    assert np.abs(projected - (x + delta * scale)).max() > 0.01  # and the box


def _official_projection(point, x):
    """The official APGD's L2 projection: x + d / (||d|| + 1e-12) * min(eps, ||d||), clipped."""
    d = (point - x).reshape(len(x), -1)
    length = np.linalg.norm(d, axis=1, keepdims=True)
    return np.clip(x + (d / (length + 1e-12) * np.minimum(EPS, length)).reshape(x.shape), 0, 1)


def _official_step(point, gradient):
    """point + 2 eps * gradient / (||gradient||_2 + 1e-12): APGD's first (L2) step."""
    flat = gradient.reshape(len(point), -1)
    length = np.linalg.norm(flat, axis=1).reshape(-1, 1, 1, 1)
    return point + 2 * EPS * gradient / (length + 1e-12)


def test_apgd_l2_first_iterates_follow_the_official_formulas():
    """From a given gaussian draw t, APGD's first evaluated points equal the official L2
    formulas (autopgd_base.py, norm='L2'): the start x + eps t / ||t||_2 clipped; iteration 0
    a step of 2 eps along grad / ||grad||_2, projected (no momentum); iteration 1 the same
    step, projected, mixed with the previous move by momentum 0.75, projected again."""
    W, b, x, y, logits_fn = linear_problem(4)
    seen = []

    def recording(inputs):
        jax.debug.callback(lambda v: seen.append(np.asarray(v, np.float64)), inputs,
                           ordered=True)
        return logits_fn(inputs)

    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    attacks.apgd_stage(recording, jnp.asarray(x), jnp.asarray(y), jax.random.key(0), EPS, 10,
                       "ce", start_noise=jnp.asarray(noise), unroll=True, norm="l2")
    jax.effects_barrier()
    x64 = x.astype(np.float64)

    def gradient(point):  # of the summed cross-entropy of the linear model
        logits = point.reshape(len(x), -1) @ W + b
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = probs / probs.sum(axis=1, keepdims=True) - np.eye(4)[y]
        return (probs @ W.T).reshape(x.shape)

    length = np.linalg.norm(noise.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
    start = np.clip(x64 + EPS * noise / (length + 1e-12), 0, 1)
    first = _official_projection(_official_step(start, gradient(start)), x64)
    towards = _official_projection(_official_step(first, gradient(first)), x64)
    second = _official_projection(first + 0.75 * (towards - first) + 0.25 * (first - start), x64)
    for i, expected in enumerate([start, first, second]):
        np.testing.assert_allclose(seen[i + 1], expected, atol=2e-6, err_msg=f"point {i}")
    assert np.abs(second - towards).max() > 1e-3  # the momentum term acted


def test_fab_l2_finds_the_minimal_adversarial_radius():
    """With eps = 10 every point is fooled; on a linear model FAB's L2 projection is exact, so
    its first step lands at 1.05 times the smallest radius within the box (extrapolation eta;
    less where the box clips it) and its second within 1.01 (measured: 1.0051-1.0053, so 1.02
    leaves room)."""
    W, b, x, y, logits_fn = linear_problem(2)
    correct = np.asarray(logits_fn(jnp.asarray(x))).argmax(axis=1) == y
    x_adv, robust = attacks.fab_targeted_stage(logits_fn, jnp.asarray(x), jnp.asarray(y),
                                               jax.random.key(0), eps=10.0, n_iter=2,
                                               unroll=True, norm="l2")
    assert not np.any(np.asarray(robust))
    ratio = l2_lengths(np.asarray(x_adv), x)[correct] / smallest_radius(W, b, x, y)[correct]
    assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.02


@pytest.mark.parametrize("classes,most_missed", [(2, 6), (4, 9)])
def test_square_l2_is_sound_and_finds_most(classes, most_missed):
    """Square (L2) never fools a robust point, stays in the ball and the box, and misses at
    most `most_missed` of the 12 fooled correct points. Over keys 0-19 with 300 queries it
    missed 2-5 (binary, mean 2.7) and 2-8 (four classes, mean 5.6); the official code on the
    same problems (seeds 0-19) missed 2-9 (mean 6.0) and 4-8 (mean 6.2). A 5x5 image leaves it
    few windows, and its updates keep the perturbation's norm at eps: it is far from exact."""
    W, b, x, y, logits_fn = linear_problem(classes)
    x_adv, robust = run_attack(attacks.square_attack, classes, n_queries=300)
    assert_in_ball_and_box(x_adv, x)
    exact = exact_robust(W, b, x, y, EPS)
    assert not np.any(exact & ~robust)
    assert np.sum(robust & ~exact) <= most_missed


@pytest.mark.parametrize("attack,norm,message", [
    (attacks.fgsm, "l2", "fgsm is the L-inf attack; use fgm for L2"),
    (attacks.fgm, "l1", "Unknown norm 'l1'"), (attacks.pgd, "L2", "Unknown norm 'L2'"),
    (attacks.cw, "l1", "Unknown norm"), (attacks.apgd, "l1", "Unknown norm"),
    (attacks.apgd_targeted, "l1", "Unknown norm")])
def test_bad_norms_are_one_line_errors(attack, norm, message):
    """A norm an attack does not take is a one-line ValueError before any work (the model is
    never called)."""
    def never_called(inputs):
        raise AssertionError("the model was called")

    x = jnp.zeros((2,) + SHAPE)
    with pytest.raises(ValueError, match=message):
        attack(never_called, x, jnp.zeros(2, jnp.int32), jax.random.key(0), eps=EPS, norm=norm)
