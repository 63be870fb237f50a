"""AutoAttack as a whole: its verdicts come from the model at the examples it returns, and its
robust accuracy is the exact one on linear problems whose answer is known in closed form.

- A component whose in-loop flags lie (says "robust" at a misclassified example, or "fooled"
  at the clean image) must not change the verdict: the returned examples are classified again,
  as the reference implementation does after every attack.
- A bookkeeping error (a point counted fooled whose x_adv was not kept) is caught by the final
  consistency check (`ConsistencyError`), never reported as a figure.
- The standard ensemble on the linear problems of `test_attack_answers` (L-inf) and
  `test_l2_attacks` (L2) gives every point's closed-form verdict, misclassified points
  included.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_attack_answers as linf_problems
import test_l2_attacks as l2_problems
from fpcm_jax import attacks
from fpcm_jax.attacks import registry

autoattack_module = importlib.import_module("fpcm_jax.attacks.autoattack")  # the module, not
# the function `fpcm_jax.attacks.autoattack` that shadows it
# Short runs: the linear problems need few iterations (test_attack_answers: 10 iterations
# and 3 targets reach the exact verdicts); Square then finds nothing new.
SHORT = {"n_iter": 10, "n_target_classes": 3, "n_queries": 100, "batch_size": 16}


def binary_worst_case(x, y, W, eps):
    """The closed-form minimiser of z_y - z_(1-y) of a binary linear model (JAX)."""
    gaps = jnp.asarray(W.T)[y] - jnp.asarray(W.T)[1 - y]
    step = -eps * jnp.sign(gaps).reshape(x.shape)
    return jnp.clip(x + step, 0.0, 1.0)


def lying_component(monkeypatch, name, stage):
    """Replace AutoAttack's component `name` by one with the given stage."""
    monkeypatch.setitem(registry.ATTACKS, name, registry.Attack(lambda **o: None, stage))


def test_verdicts_come_from_the_returned_examples_not_the_in_loop_flags(monkeypatch):
    """Stage 1 returns the exact worst-case points but claims every point is still robust;
    stage 2 returns the clean images and claims every point is fooled. The verdict after
    each must be the model's at what was returned: the closed form after the first, nothing
    new after the second (flags taken from the stages would give all robust, then none)."""
    W, b, x, y, logits_fn = linf_problems.linear_problem(2)
    eps = linf_problems.EPS

    def claims_robust(logits_fn, x, y, keys, shared_key, target_rank, **_):
        return binary_worst_case(x, y, W, eps), jnp.ones(y.shape, bool), jnp.zeros(y.shape, bool)

    def claims_fooled(logits_fn, x, y, keys, shared_key, target_rank, **_):
        return x, jnp.zeros(y.shape, bool), jnp.zeros(y.shape, bool)

    lying_component(monkeypatch, "apgd-ce", claims_robust)
    lying_component(monkeypatch, "square", claims_fooled)
    result = attacks.autoattack(logits_fn, x, y, jax.random.key(0), eps,
                                attacks_to_run=("apgd-ce", "square"), **SHORT)
    exact = linf_problems.exact_robust(W, b, x, y, eps)
    assert 0 < exact.sum() < result["clean_flags"].sum()  # both kinds of point are there
    np.testing.assert_array_equal(result["flags_after"]["apgd-ce"], exact)
    np.testing.assert_array_equal(result["flags_after"]["square"], exact)
    assert result["consistency"]["fooled_at_x_adv"] == int(np.sum(result["clean_flags"] & ~exact))


def test_a_point_counted_fooled_without_its_example_is_refused(monkeypatch):
    """A bookkeeping bug (the fooled points' x_adv not kept) is a ConsistencyError naming the
    disagreement, not a robust accuracy."""
    original = autoattack_module._run_stage_batches

    def forgets_examples(call, run, where, stage_key, target_rank, robust, x_adv):
        kept = x_adv.copy()
        zero = original(call, run, where, stage_key, target_rank, robust, x_adv)
        x_adv[:] = kept
        return zero

    monkeypatch.setattr(autoattack_module, "_run_stage_batches", forgets_examples)
    W, b, x, y, logits_fn = linf_problems.linear_problem(2)
    with pytest.raises(attacks.ConsistencyError,
                       match="counted fooled but classified correctly at its x_adv"):
        attacks.autoattack(logits_fn, x, y, jax.random.key(0), linf_problems.EPS,
                           attacks_to_run=("apgd-ce",), **SHORT)


@pytest.mark.parametrize("norm,classes", [("linf", 2), ("linf", 4), ("l2", 4)])
def test_autoattack_gives_the_exact_verdict_of_every_point(norm, classes):
    """The whole standard ensemble (short runs) on the fixed linear problems: every point's
    robust flag equals the closed form; the 3 misclassified points are not robust and keep
    their clean image. Measured over keys 0-4 (2026-12-03): 0 differing points for each
    problem and key."""
    problems = linf_problems if norm == "linf" else l2_problems
    W, b, x, y, logits_fn = problems.linear_problem(classes)
    result = attacks.autoattack(logits_fn, x, y, jax.random.key(0), problems.EPS, norm=norm,
                                **SHORT)
    exact = problems.exact_robust(W, b, x, y, problems.EPS)
    np.testing.assert_array_equal(result["robust_flags"], exact)
    assert result["robust_accuracy"] == pytest.approx(exact.mean())
    misclassified = ~result["clean_flags"]
    assert misclassified.sum() == problems.MISCLASSIFIED
    np.testing.assert_array_equal(result["x_adv"][misclassified], x[misclassified])
    assert result["consistency"]["inside_ball_and_box"]


def test_a_randomised_models_disagreements_are_counted_exactly():
    """Issue 37, items 11 and 13: for a model flagged randomised the final check counts the
    points whose flags disagree with a new classification (and raises otherwise). Built point
    by point (C: correct clean, R: counted robust, A: correct at x_adv): p0 (R, not C), p1 (R,
    neither C nor A: one disagreement, not two), p2 (C, R, not A) and p4 (C, A, not R)
    disagree; p3 (C, R, A), p5 (C, fooled), p6 and p7 (not C, not R) agree: 4 of 8."""
    x = np.full((8, 2, 2, 3), 0.49, np.float32)
    y = np.zeros(8, np.int32)
    wrong_at_adv = np.array([0, 1, 1, 0, 0, 1, 0, 1], bool)
    x_adv = x.copy()
    x_adv[wrong_at_adv, 0, 0, 0] = 0.51  # within 8/255 of x: class 1 there, 0 elsewhere
    logits_fn = lambda inputs: jax.nn.one_hot((inputs[:, 0, 0, 0] > 0.5).astype(jnp.int32), 10)
    clean = np.array([0, 0, 1, 1, 1, 1, 0, 0], bool)
    robust = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    call = autoattack_module._Call(x, y, jax.random.key(0), None,
                                   lambda params, inputs: logits_fn(inputs), {}, jnp.asarray,
                                   np.asarray, 8, 8 / 255, "linf", 1, 1, 1, False, None)
    result = {"clean_flags": clean, "robust_flags": robust, "x_adv": x_adv}
    with pytest.raises(attacks.ConsistencyError, match="2 point"):  # p0, p1: robust, not C
        autoattack_module.check_consistency(call, result)
    checked = autoattack_module.check_consistency(call, {**result, "randomised": True})
    assert checked["randomised_model_disagreements"] == 4
    assert checked["inside_ball_and_box"] and checked["reclassified"] == 8
