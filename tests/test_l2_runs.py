"""The L2 threat model end to end: a tiny L2 PGD-AT run, AutoAttack in L2 on it, and an
evaluation that stops when an attack leaves its ball or the box."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax.evaluation import accuracy, evaluate
from fpcm_jax.training import train

pytestmark = pytest.mark.slow

L2 = {"attack__norm": "l2", "attack__eps": 0.5, "attack__step_size": 0.1}


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    """(workdir, config) of a one-epoch L2 PGD-AT run of the tiny model."""
    workdir = tmp_path_factory.mktemp("l2") / "run"
    config = tiny_config(attack__steps=1, train__epochs=1, **L2)
    train.train_and_evaluate(config, str(workdir))
    return workdir, config


def test_an_l2_run_trains_validates_and_tests_in_l2(l2_run):
    workdir, _ = l2_run
    with open(workdir / "summary.json") as handle:
        summary = json.load(handle)
    assert summary["norm"] == "l2" and summary["eps"] == 0.5
    assert 0 <= summary["test_pgd1_acc"] <= summary["test_clean_acc"]


def test_autoattack_in_l2_reports_its_norm_and_stays_in_the_ball(l2_run):
    """`--mode eval --norm l2 --attack autoattack` (short APGD/FAB, 2 targets, 30 Square
    queries): the report names the norm and eps, and every component's largest perturbation
    lies within the L2 ball."""
    workdir, config = l2_run
    report = evaluate.run_evaluation(config, str(workdir), ["none", "autoattack"],
                                     num_examples=24, batch_size=24, norm="l2",
                                     autoattack_options={"n_iter": 5, "n_queries": 30,
                                                         "n_target_classes": 2})
    assert os.path.basename(report["report_path"]) == "eval_test_none_autoattack_l2-eps0.5_n24.json"
    with open(report["report_path"]) as handle:
        saved = json.load(handle)
    assert saved["norm"] == "l2" and saved["eps"] == 0.5
    entry = saved["attacks"]["autoattack"]
    assert entry["parameters"]["norm"] == "l2"
    assert 0 < entry["max_perturbation"] <= 0.5 * (1 + 1e-5)
    after = [entry["accuracy_after"][name] for name in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert after == sorted(after, reverse=True) and after[-1] == entry["robust_acc"]
    history = [json.loads(line) for line in open(workdir / evaluate.HISTORY_FILE)]
    assert history[-1]["norm"] == "l2" and history[-1]["eps"] == 0.5


@pytest.mark.parametrize("norm, broken, message", [
    ("l2", lambda x, eps: jnp.clip(x + 2 * eps / np.sqrt(x[0].size), 0.0, 1.0),
     "outside the l2 ball"),
    ("linf", lambda x, eps: x + 0.5 * eps, "outside [0, 1]"),
])
def test_an_attack_outside_its_ball_or_the_box_stops_the_evaluation(tiny_run, monkeypatch,
                                                                    norm, broken, message):
    """An attack whose examples leave the ball (L2 norm 2 eps where nothing is clipped) or
    [0, 1] (white pixels pushed above 1) is an error, and no report is written."""
    workdir, config = tiny_run
    monkeypatch.setattr(evaluate.attacks, "get", lambda name, **options: (
        lambda logits_fn, x, y, key: broken(x, options["eps"])))
    before = sorted(os.listdir(workdir))
    with pytest.raises(accuracy.PerturbationError, match=re.escape(message)):
        evaluate.run_evaluation(config, str(workdir), ["pgd1"], num_examples=8, batch_size=8,
                                norm=norm)
    assert sorted(os.listdir(workdir)) == before
