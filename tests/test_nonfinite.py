"""NaN or infinity never becomes a figure (issue 37, item 1): a model that is finite on the clean
uint8 images and NaN wherever an attack moves a pixel off the 1/255 grid (`own_models.NaNOffGrid`)
stops PGD and AutoAttack, through `--mode eval` and `fpcm_jax.evaluate_model`, with one line
naming the attack, the count of points and the first one, and no report; the corruptions, the
analyses and AutoAttack's own checks refuse non-finite values too. The counts and first indices
expected here come from the data (which images are bright), not from the code under test."""

import glob
import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpcm_jax
import own_models
from conftest import tiny_config
from fpcm_jax import attacks, experiment
autoattack_module = importlib.import_module("fpcm_jax.attacks.autoattack")  # not the function
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import accuracy, analysis
from fpcm_jax.runs import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT = 16


def nan_config(**kwargs):
    config = tiny_config(model__name="own_models:NaNOffGrid", model__widths=None,
                         model__stage_sizes=None)
    config.model.kwargs = kwargs
    return config


def nan_model(**kwargs):
    model = own_models.NaNOffGrid(**kwargs)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_clean_logits_are_finite_and_attacked_ones_are_not():
    """The model is what the tests below rely on: finite on uint8 images, NaN 1/1000 of a grey
    level away from them."""
    model, variables = nan_model()
    _, _, test = datasets.load_for(nan_config())
    x = np.asarray(datasets.to_float(test.images[:COUNT]))
    assert np.isfinite(np.asarray(model.apply(variables, x))).all()
    assert np.isnan(np.asarray(model.apply(variables, x + 2e-3 / 255 * 4))).all()


def no_report_in(workdir):
    return [path for path in glob.glob(os.path.join(workdir, "*.json"))
            if not path.endswith(".partial.json")]


def attacked_points(model, variables):
    """The indices of the first COUNT test digits the model classifies correctly: those
    AutoAttack attacks."""
    _, _, test = datasets.load_for(nan_config())
    logits = model.apply(variables, datasets.to_float(test.images[:COUNT]))
    return np.flatnonzero(np.asarray(logits).argmax(1) == test.labels[:COUNT])


@pytest.mark.parametrize("attack, where, what", [
    ("pgd3", "pgd3", "logits at the adversarial examples"),
    ("apgd-ce", "AutoAttack's apgd-ce", "logits at its adversarial examples"),
    ("square", "AutoAttack's square", "logits at its adversarial examples"),
])
def test_evaluate_model_refuses_nan_under_attack(attack, where, what, tmp_path):
    """PGD attacks every point, AutoAttack's components the points classified correctly:
    each of them is counted (a point whose NaN logits pick class 0, its label, included).
    Square's steps are multiples of eps: at 8/255 it never leaves the grid, so eps is 0.03."""
    model, variables = nan_model()
    workdir = str(tmp_path / "eval")
    points = np.arange(COUNT) if attack == "pgd3" else attacked_points(model, variables)
    assert len(points)
    options = {} if attack == "pgd3" else {"autoattack_options": {"n_iter": 3, "n_queries": 3}}
    if attack == "square":
        options["eps"] = 0.03
    with pytest.raises(attacks.NonFiniteError) as raised:
        fpcm_jax.evaluate_model(nan_config(), workdir, [attack], model=model,
                                variables=variables, num_examples=COUNT, batch_size=8, **options)
    message = str(raised.value)
    assert message.startswith(f"{where}: {len(points)} point(s) with non-finite {what}")
    assert f"first: index {points[0]})" in message and "\n" not in message
    assert no_report_in(workdir) == []


def bright_images(count):
    """Indices of the first `count` test digits whose mean pixel exceeds the median's and the
    first image's: where
    `NaNOffGrid(nan_above=...)` is NaN even on clean images."""
    _, _, test = datasets.load_for(nan_config())
    means = test.images[:count].reshape(count, -1).mean(axis=1) / 255.0
    lowest = max(float(np.median(means)), float(means[0]))  # the first image is not bright
    above = means[means > lowest + 1e-6]
    threshold = (lowest + float(above.min())) / 2  # midway: float32 rounding cannot cross it
    return threshold, np.flatnonzero(means > threshold)


def test_the_count_and_the_first_index_are_those_of_the_data(tmp_path):
    """NaN on the bright half of the clean images: the clean pass of a single attack and of
    AutoAttack name exactly those points."""
    threshold, bright = bright_images(COUNT)
    assert 0 < len(bright) < COUNT and bright[0] > 0
    model, variables = nan_model(nan_above=threshold)
    for attack, where in (("none", "none"), ("autoattack", "AutoAttack's clean pass")):
        with pytest.raises(attacks.NonFiniteError) as raised:
            fpcm_jax.evaluate_model(nan_config(nan_above=threshold), str(tmp_path / attack),
                                    [attack], model=model, variables=variables,
                                    num_examples=COUNT, batch_size=8)
        assert str(raised.value).startswith(f"{where}: {len(bright)} point(s) with non-finite "
                                            f"logits")
        assert f"first: index {bright[0]})" in str(raised.value)


@pytest.mark.slow
def test_mode_eval_stops_with_one_line_and_no_report(tmp_path):
    """`main.py --mode eval` on a saved NaNOffGrid checkpoint: PGD and AutoAttack each exit 1
    with the one-line error, and the workdir holds no report."""
    config = nan_config()
    saved = str(tmp_path / "ckpt")
    model, variables = nan_model()
    checkpoint.save_variables(saved, variables, experiment.describe(config))
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/tests")
    attacked = attacked_points(model, variables)  # AutoAttack attacks these (some, not all)
    assert 0 < len(attacked) < COUNT
    for attack, where, count in (("pgd2", "pgd2", COUNT),
                                 ("apgd-ce", "AutoAttack's apgd-ce", len(attacked))):
        workdir = str(tmp_path / attack)
        command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--mode", "eval",
                   "--workdir", workdir, "--checkpoint", saved, "--attack", attack,
                   "--num_examples", str(COUNT), "--batch_size", "8",
                   "--config.model.name=own_models:NaNOffGrid", "--config.model.widths=None",
                   "--config.model.stage_sizes=None"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {where}: {count} point(s) "
                                                       f"with non-finite logits"), result.stderr
        assert no_report_in(workdir) == []


def test_corruptions_and_analyses_refuse_nan():
    """The analyses name themselves: NaN on the bright images fails the clean accuracy, and
    NaN off the grid fails the band-noise analysis (noise leaves the grid)."""
    threshold, bright = bright_images(COUNT)
    _, _, test = datasets.load_for(nan_config())
    x = np.asarray(datasets.to_float(test.images[:COUNT]))
    y = test.labels[:COUNT]
    model, variables = nan_model(nan_above=threshold)
    with pytest.raises(attacks.NonFiniteError, match=re.escape(
            f"analysis on the clean images: {len(bright)} point(s) with non-finite logits "
            f"(NaN or infinity; first: index {bright[0]})")):
        analysis.Analyzer(model, variables).accuracy(x, y)
    model, variables = nan_model()
    with pytest.raises(attacks.NonFiniteError, match=re.escape(
            f"analysis on band-limited noise (band 0): {COUNT} point(s)")):
        analysis.Analyzer(model, variables).band_noise(x, y, jax.random.key(0), 4, 1.0)


def test_the_eval_step_counts_nonfinite_points_of_a_split():
    """accuracy.evaluate_split over two batches: the bright images (NaN clean logits) are
    counted across batches, the first named by its index in the split."""
    from fpcm_jax import parallel
    threshold, bright = bright_images(COUNT)
    _, _, test = datasets.load_for(nan_config())
    model, variables = nan_model(nan_above=threshold)
    mesh = parallel.make_mesh()
    step = accuracy.make_eval_step(model, attacks.get("none"), mesh)
    split = datasets.Split(test.images[:COUNT], test.labels[:COUNT])
    with pytest.raises(attacks.NonFiniteError, match=re.escape(
            f"the test: {len(bright)} point(s) with non-finite logits on the clean images "
            f"(NaN or infinity; first: index {bright[0]})")):
        accuracy.evaluate_split(step, variables, split, 8, jax.random.key(0), mesh,
                                name="the test")


def consistency_call(x, y, eps, logits_fn):
    return autoattack_module._Call(
        x, y, jax.random.key(0), None, lambda params, inputs: logits_fn(inputs), {},
        jnp.asarray, np.asarray, 4, eps, "linf", 1, 1, 1, False, None)


def beyond_the_ball(x, eps):
    return x + 1.5 * eps  # x in [0.2, 0.8]: still in the box


def below_the_box(x, eps):
    x_adv = x.copy()
    x_adv[..., 0] = -eps / 2  # x[..., 0] is 0: still in the ball
    return x_adv


def not_a_number(x, eps):
    return np.full_like(x, np.nan)


@pytest.mark.parametrize("change, what", [
    (beyond_the_ball, "x_adv outside the linf ball of radius 0.0313725"),
    (below_the_box, r"x_adv outside \[0, 1\]"),
    (not_a_number, "x_adv outside the linf ball"),
])
def test_the_consistency_pass_enforces_the_ball_and_the_box(change, what):
    """AutoAttack's final check on a result whose x_adv lie at 1.5 times the radius (inside
    the box), eps/2 below 0 (inside the ball) or at NaN: each is a ConsistencyError, also for
    a randomised model (whose disagreements are only counted). x_adv = x passes."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (4, 2, 2, 3)).astype(np.float32)
    x[..., 0] = 0.0
    y = np.zeros(4, np.int32)
    eps = 8 / 255
    logits_fn = lambda inputs: jnp.zeros((inputs.shape[0], 10)).at[:, 0].set(1.0)
    call = consistency_call(x, y, eps, logits_fn)
    flags = np.ones(4, bool)
    good = {"clean_flags": flags, "robust_flags": flags, "x_adv": x.copy()}
    assert autoattack_module.check_consistency(call, good)["inside_ball_and_box"]
    for randomised in (False, True):
        bad = {**good, "x_adv": change(x, eps).astype(np.float32), "randomised": randomised}
        with pytest.raises(attacks.ConsistencyError, match=what):
            autoattack_module.check_consistency(call, bad)


def test_the_perturbation_check_refuses_nan():
    settings = {"eps": 8 / 255, "norm": "linf"}
    accuracy.check_perturbation("pgd20", settings, 8 / 255, 0.0)
    for largest, outside in ((float("nan"), 0.0), (0.0, float("nan")), (2 * 8 / 255, 0.0),
                             (0.0, 1e-3)):
        with pytest.raises(accuracy.PerturbationError, match="pgd20 produced"):
            accuracy.check_perturbation("pgd20", settings, largest, outside)


def class0_unless_off_grid(inputs):
    """Class 0 by 5 on uint8 images, NaN logits off the 1/255 grid."""
    pixels = inputs.reshape(inputs.shape[0], -1) * 255.0
    off_grid = jnp.max(jnp.abs(pixels - jnp.round(pixels)), axis=1) > 1e-3
    return jnp.where(off_grid[:, None], jnp.nan, 5.0 * jax.nn.one_hot(0, 10)[None, :])


@pytest.mark.parametrize("component, eps", [("apgd-ce", 8 / 255), ("apgd-t", 8 / 255),
                                            ("square", 0.03)])
def test_nan_logits_that_pick_the_label_are_not_robust(component, eps):
    """Every point is of class 0, which the argmax of a NaN row also picks: a component that
    trusted it would keep every point robust at its clean image (no NaN returned, accuracy 1).
    Each component counts NaN as fooled, so AutoAttack returns the points and stops. (FAB-T
    is not here: the model's gradient is zero, so FAB's own step is undefined and it never
    asks the model about a point off the grid; it returns the clean images, as for any
    constant model.)"""
    _, _, test = datasets.load_for(nan_config())
    x = np.asarray(datasets.to_float(test.images[:8]))
    y = np.zeros(8, np.int32)
    with pytest.raises(attacks.NonFiniteError, match=f"AutoAttack's {component}: 8 point"):
        attacks.autoattack(class0_unless_off_grid, x, y, jax.random.key(0), eps,
                           attacks_to_run=[component], n_iter=3, n_queries=3,
                           n_target_classes=1, batch_size=8)
