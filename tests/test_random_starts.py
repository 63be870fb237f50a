"""The random starts of the attacks, checked as distributions, not only as points in the ball.

A model with a constant output has a zero gradient everywhere, so every attack's signed or
normalised steps are zero and what it returns is its start (projected). On images at 0.5 (no
pixel near the box) over 64 x 32 x 32 x 3 = 196,608 pixels:
- PGD, CW and the training attack (L-inf): (x_adv - x) / eps is U(-1, 1) per pixel;
- PGD in L2: the perturbation's length / eps is U(0, 1) per image (torchattacks' PGDL2);
- the TRADES attack and MART with mart_attack_start='normal': x + 0.001 N(0, 1) per pixel.
Each is a Kolmogorov-Smirnov distance to the intended distribution. With 196,608 samples the
5% critical value is 1.36 / sqrt(n) = 0.0031 (per image, 64 samples: 0.17); measured with keys
0-4 over all of the cases below (2026-12-03): at most 0.0031 per pixel, 0.19 per image. A
start in [0, eps] is at 0.5, one in [-eps/2, eps/2] at 0.25, no start at all at 0.5 (per
image 1.0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config
from fpcm_jax import attacks
from fpcm_jax.training import train_step

SHAPE = (64, 32, 32, 3)
EPS = 8 / 255
PIXEL_BOUND = 0.006  # about 2x the largest measured; every wrong start is 40x above it
IMAGE_BOUND = 0.35  # the largest measured 0.19; no start at all is at 1.0


def constant_logits(inputs):
    """Logits that do not depend on the input (a zero gradient), of the right shape."""
    return jnp.zeros((inputs.shape[0], 10)) + 0.0 * inputs.reshape(inputs.shape[0], -1)[:, :10]


def images():
    return jnp.full(SHAPE, 0.5, jnp.float32)


def labels():
    return jnp.zeros((SHAPE[0],), jnp.int32)


def uniform_distance(delta, eps):
    """KS distance of delta / eps (every pixel) to U(-1, 1)."""
    return stats.kstest(np.asarray(delta).ravel() / eps, stats.uniform(-1, 2).cdf).statistic


@pytest.mark.parametrize("name", ["pgd10", "cw10"])
@pytest.mark.parametrize("key", [0, 1])
def test_linf_attacks_start_uniformly_in_the_ball(name, key):
    x = images()
    attack = attacks.get(name, eps=EPS, step_size=2 / 255)
    x_adv = attack(constant_logits, x, labels(), jax.random.key(key))
    assert uniform_distance(x_adv - x, EPS) < PIXEL_BOUND


def training_attack(config):
    """The step's training attack with a constant model (train mode, no BatchNorm)."""
    forward = lambda params, stats, x, progress, train, dropout_key=None: (constant_logits(x),
                                                                           stats)
    attack = train_step._training_attack(forward, config)
    x = images()
    clean_logits = constant_logits(x)
    return lambda key: attack(None, {}, x, labels(), clean_logits, 1.0, key,
                              jax.random.key(9))[0] - x


@pytest.mark.parametrize("loss", ["ce", "mart", "trades"])
def test_training_attack_starts_uniformly_in_the_ball(loss):
    """PGD-AT, MART (default start) and TRADES with its official CE attack."""
    delta = training_attack(tiny_config(train__loss=loss))(jax.random.key(3))
    assert uniform_distance(delta, tiny_config().attack.eps) < PIXEL_BOUND


@pytest.mark.parametrize("changes", [{"train__loss": "mart", "train__mart_attack_start": "normal"},
                                     {"train__loss": "trades", "train__trades_attack": "kl"}])
def test_mart_and_trades_code_starts_are_small_normal_noise(changes):
    """x + 0.001 N(0, 1) (the MART and TRADES codes), not U(-eps, eps)."""
    delta = np.asarray(training_attack(tiny_config(**changes))(jax.random.key(4)))
    assert stats.kstest(delta.ravel() / 0.001, stats.norm.cdf).statistic < PIXEL_BOUND
    assert uniform_distance(delta, tiny_config().attack.eps) > 0.4


def test_l2_start_has_a_uniform_radius():
    """PGD in L2 (torchattacks' PGDL2): a Gaussian direction scaled to length U(0, 1) * eps
    per image; the directions point everywhere (mean pixel of the perturbations near 0)."""
    x, eps = images(), 0.5
    x_adv = attacks.get("pgd10", eps=eps, step_size=0.1, norm="l2")(
        constant_logits, x, labels(), jax.random.key(0))
    lengths = np.asarray(attacks.norms(x_adv - x, "l2")) / eps
    assert stats.kstest(lengths, stats.uniform(0, 1).cdf).statistic < IMAGE_BOUND
    assert lengths.max() <= 1 + 1e-5
    assert abs(float(jnp.mean(x_adv - x))) < 0.01 * eps


def test_trades_l2_loop_replaces_a_zero_gradient_by_noise():
    """The TRADES code's L2 loop (the default for TRADES with the KL attack in L2): where the
    gradient is zero it steps against N(0, 1) noise of lr 2 eps / steps per pixel (length
    ~5.5 here), which the renorm brings back to the sphere: every perturbation has length eps,
    each its own direction. Leaving delta alone would stay at the start (length ~0.055), and
    dividing by the zero norm gives NaN."""
    eps = 0.5
    config = tiny_config(train__loss="trades", train__trades_attack="kl", attack__norm="l2",
                         attack__eps=eps, attack__step_size=0.1)
    delta = np.asarray(training_attack(config)(jax.random.key(5)))
    assert np.all(np.isfinite(delta))
    np.testing.assert_allclose(np.asarray(attacks.norms(delta, "l2")), eps, rtol=1e-5)
    flat = delta.reshape(len(delta), -1)
    cosines = (flat @ flat.T) / eps ** 2
    assert np.abs(cosines[~np.eye(len(flat), dtype=bool)]).max() < 0.1


def test_trades_l2_zero_gradient_noise_is_fresh_and_unnormalised_each_step():
    """Issue 37, item 13: the TRADES code's rule written out step by step (numpy, from its
    definition): where the gradient is zero, delta -= lr * n_k with n_k ~ N(0, 1) per pixel,
    drawn anew at every step k (fold_in(key, k)) and for every example, not normalised; then
    x + delta into [0, 1], then delta renormed to eps when longer (eps / (norm + 1e-7)). The
    loop must return exactly that; the same noise at every step, or normalised noise, would
    not."""
    from fpcm_jax.attacks.pgd import trades_l2_iterate
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (4, 6, 6, 3)).astype(np.float32)
    start = x + 0.001 * rng.standard_normal(x.shape).astype(np.float32)
    eps, steps, key = 0.5, 6, jax.random.key(11)
    flat_loss = lambda x_adv, carry: (0.0 * jnp.sum(x_adv), carry)
    got, carry = trades_l2_iterate(flat_loss, jnp.asarray(x), jnp.asarray(start),
                                   jnp.float32(7), eps, steps, key, unroll=True)
    assert float(carry) == 7.0
    delta = (start - x).astype(np.float64)
    for k in range(steps):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32))
        delta = delta - (2 * eps / steps) * noise
        delta = np.clip(x + delta, 0, 1) - x
        length = np.sqrt((delta.reshape(len(x), -1) ** 2).sum(1))[:, None, None, None]
        delta = np.where(length > eps, delta * eps / (length + 1e-7), delta)
    np.testing.assert_allclose(np.asarray(got), np.clip(x + delta, 0, 1), atol=1e-5)
