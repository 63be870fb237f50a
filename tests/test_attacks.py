"""Attacks: constraints, monotonicity, APGD schedule and DLR formulas, AutoAttack checks."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpcm_jax import attacks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 8 / 255
FAST = {  # few iterations: these tests check behaviour, not strength
    "fgsm": {}, "pgd5": {}, "cw5": {}, "apgd-ce": {"n_iter": 10}, "apgd-dlr": {"n_iter": 10},
    "apgd-t": {"n_iter": 10, "n_target_classes": 3}, "fab-t": {"n_iter": 10,
    "n_target_classes": 3}, "square": {"n_queries": 60},
}


def tiny_problem(seed=0, size=24):
    """A fixed random linear classifier on 6x6x3 images whose labels it mostly gets right."""
    rng = np.random.default_rng(seed)
    weights = jnp.asarray(rng.normal(size=(6 * 6 * 3, 10)).astype(np.float32)) * 0.5
    x = jnp.asarray(rng.random((size, 6, 6, 3), dtype=np.float32))

    def logits_fn(inputs):
        return inputs.reshape(inputs.shape[0], -1) @ weights

    clean = np.asarray(logits_fn(x))
    y = clean.argmax(1)
    y[: size // 4] = (y[: size // 4] + 1) % 10  # some points start misclassified
    return logits_fn, x, jnp.asarray(y, jnp.int32)


def accuracy(logits_fn, x, y):
    return float(np.mean(np.asarray(logits_fn(x)).argmax(1) == np.asarray(y)))


@pytest.mark.parametrize("name", list(FAST))
def test_attack_stays_in_the_ball_and_never_helps(name):
    logits_fn, x, y = tiny_problem()
    attack = jax.jit(lambda x, y, k: attacks.get(name, eps=EPS, **FAST[name])(logits_fn, x, y, k))
    x_adv = np.asarray(attack(x, y, jax.random.key(1)))
    assert x_adv.shape == x.shape
    assert np.abs(x_adv - np.asarray(x)).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean_correct = np.asarray(logits_fn(x)).argmax(1) == np.asarray(y)
    adv_correct = np.asarray(logits_fn(jnp.asarray(x_adv))).argmax(1) == np.asarray(y)
    assert adv_correct.sum() < clean_correct.sum()  # the attack found something
    if name not in ("fgsm", "pgd5", "cw5"):  # reference semantics: only correct points move
        assert not np.any(adv_correct & ~clean_correct)


def test_autoattack_is_at_most_each_component():
    logits_fn, x, y = tiny_problem(seed=2, size=40)
    options = dict(eps=EPS, batch_size=16, n_iter=10, n_queries=60, n_target_classes=3)
    events, components = [], []
    full = attacks.autoattack(logits_fn, x, y, jax.random.key(0), **options,
                              on_batch=lambda *event: events.append(event),
                              progress=lambda *done: components.append(done))
    assert full["robust_accuracy"] <= full["clean_accuracy"]
    # Progress: each stage starts at 0 and ends with all its points; components report their
    # accuracy in order; the robust count never grows.
    assert [name for name, _ in components] == list(attacks.STANDARD)
    assert [acc for _, acc in components] == list(full["accuracy_after"].values())
    stages = {(name, stage): [e for e in events if e[:2] == (name, stage)]
              for name, stage, *_ in events}
    assert len([key for key in stages if key[0] == "apgd-t"]) == 3  # one per target class
    for (name, stage), seen in stages.items():
        assert seen[0][3] == 0 and seen[-1][3] == seen[-1][4], (name, stage)
    robust_counts = [event[5] for event in events]
    assert robust_counts == sorted(robust_counts, reverse=True)
    after = list(full["accuracy_after"].values())
    assert after == sorted(after, reverse=True)
    for name in attacks.STANDARD:
        alone = attacks.autoattack(logits_fn, x, y, jax.random.key(0), attacks_to_run=[name],
                                   **options)
        assert full["robust_accuracy"] <= alone["robust_accuracy"], name
        assert not np.any(full["robust_flags"] & ~alone["robust_flags"]), name
    x_adv = full["x_adv"]
    assert np.abs(x_adv - np.asarray(x)).max() <= EPS + 1e-6
    fooled = np.asarray(logits_fn(jnp.asarray(x_adv))).argmax(1) != np.asarray(y)
    np.testing.assert_array_equal(~full["robust_flags"], fooled | ~full["clean_flags"])


def test_autoattack_reuses_its_compiled_stages_for_the_same_logits_fn():
    base_fn, x, y = tiny_problem(seed=3, size=16)
    traces = []

    def logits_fn(params, inputs):  # the weights are an argument: nothing baked in
        traces.append(1)
        return base_fn(inputs) * params

    options = dict(eps=EPS, batch_size=8, n_iter=5, n_queries=20, n_target_classes=2)
    first = attacks.autoattack(logits_fn, x, y, jax.random.key(0), params=jnp.float32(1.0),
                               **options)
    traced = len(traces)
    again = attacks.autoattack(logits_fn, x, y, jax.random.key(0), params=jnp.float32(1.0),
                               **options)
    assert traced > 0 and len(traces) == traced  # the second run traced (compiled) nothing
    assert again["robust_accuracy"] == first["robust_accuracy"]


def test_apgd_checkpoints_follow_the_published_schedule():
    is_checkpoint, window = attacks.checkpoint_schedule(100)
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): checkpoints after
    # 22, 41, 57, 70, 80, 87, 93 and 99 iterations.
    assert list(np.flatnonzero(is_checkpoint) + 1) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert list(window[is_checkpoint]) == [22, 19, 16, 13, 10, 7, 6, 6]


def test_dlr_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 10)).astype(np.float32)
    y = rng.integers(0, 10, 7)
    y[0] = z[0].argmax()
    t = (y + 3) % 10
    ordered = np.sort(z, axis=1)
    best_other = np.array([np.max(np.delete(z[i], y[i])) for i in range(7)])
    expected = -(z[np.arange(7), y] - best_other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)
    np.testing.assert_allclose(attacks.dlr_loss(z, y), expected, rtol=1e-5)
    expected_t = -(z[np.arange(7), y] - z[np.arange(7), t]) / (
        ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12)
    np.testing.assert_allclose(attacks.dlr_targeted_loss(z, y, t), expected_t, rtol=1e-5)


def test_square_p_schedule():
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 201: 0.1, 501: 0.05, 1001: 0.025,
                2001: 0.0125, 4001: 0.8 / 128, 6001: 0.8 / 256, 8001: 0.8 / 512}
    for iteration, p in expected.items():
        assert float(attacks.p_selection(iteration, 0.8)) == pytest.approx(p)


def check_warning(logits_fn, needle, **options):
    _, x, y = tiny_problem(seed=3, size=16)
    settings = dict(eps=EPS, batch_size=16, n_iter=10, n_queries=200, n_target_classes=3)
    settings.update(options)
    result = attacks.autoattack(logits_fn, x, y, jax.random.key(0), **settings)
    assert any(needle in warning for warning in result["warnings"]), result["warnings"]
    return result


def test_sanity_check_randomised_output():
    """A model with noisy logits is flagged randomised; the final re-classification may then
    disagree with the flags (counted, not raised), while x_adv is still checked to lie in the ball
    and the box."""
    base, _, _ = tiny_problem(seed=3)
    rng = np.random.default_rng(0)
    noise = lambda shape: rng.normal(size=shape).astype(np.float32)

    def noisy(x):
        logits = base(x)
        return logits + jax.pure_callback(noise, jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                                          logits.shape)

    result = check_warning(noisy, "randomised", attacks_to_run=["apgd-ce"])
    assert result["randomised"]
    assert result["consistency"]["inside_ball_and_box"]
    assert "randomised_model_disagreements" in result["consistency"]  # its exact count:
    # test_autoattack_checks.test_a_randomised_models_disagreements_are_counted_exactly


def test_sanity_check_probability_output():
    base, _, _ = tiny_problem(seed=3)
    check_warning(lambda x: jax.nn.softmax(base(x)), "probabilities", attacks_to_run=["apgd-ce"])


def test_sanity_checks_masked_gradient():
    base, _, _ = tiny_problem(seed=3)
    quantised = lambda x: base(jnp.round(x * 4) / 4)  # zero gradient almost everywhere
    result = check_warning(quantised, "zero gradient")
    assert any("Square Attack lowered" in warning for warning in result["warnings"])


def test_unknown_attack_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, fgsm, fgm, pgdN"):
        attacks.get("pgd")
    with pytest.raises(ValueError, match="no steps; give N >= 1"):
        attacks.get("pgd0")


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_eval_cli_errors_are_one_line(tmp_path):
    unknown = run_main("--config", "configs/tiny.py", "--workdir", str(tmp_path), "--mode",
                       "eval", "--attack", "pgd20,deepfool")
    assert unknown.returncode == 1 and "deepfool" in unknown.stderr
    assert "valid:" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = run_main("--config", "configs/tiny.py", "--workdir", str(tmp_path), "--mode",
                       "eval", "--attack", "pgd20")
    assert missing.returncode == 1 and "No model checkpoint" in missing.stderr
    assert "best_robust/ or best_sum/" in missing.stderr
    assert "Traceback" not in missing.stderr
