"""`main.py --mode eval` machinery: checkpoint loading, padding and masking, the JSON report."""

import json
import os
import re

import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import experiment, models
from fpcm_jax.training import checks as training_checks
from fpcm_jax.evaluation import checks as evaluation_checks
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import evaluate
from fpcm_jax.runs import checkpoint


def test_eval_counts_every_example_once_and_writes_a_report(tiny_run):
    workdir, config = tiny_run
    report = evaluate.run_evaluation(config, str(workdir), ["none", "pgd3", "apgd-ce"],
                                     num_examples=50, batch_size=16,
                                     autoattack_options={"n_iter": 5})
    assert report["examples"] == 50 and report["checkpoint"].endswith("best_robust")
    # Clean accuracy computed directly over the same 50 test images.
    model, spec = experiment.build(config)
    variables, _ = checkpoint.load_variables(report["checkpoint"],
                                             models.variables_template(model))
    _, _, test_split = datasets.load("digits", validation_size=config.data.validation_size)
    logits = model.apply(variables, datasets.to_float(test_split.images[:50]), train=False)
    direct = float(np.mean(np.asarray(logits).argmax(1) == test_split.labels[:50]))
    for name in ("none", "pgd3", "apgd-ce"):
        entry = report["attacks"][name]
        assert entry["clean_acc"] == direct
        assert entry["robust_acc"] <= entry["clean_acc"]
    assert report["attacks"]["none"]["robust_acc"] == direct
    with open(report["report_path"]) as handle:
        saved = json.load(handle)
    assert saved["attacks"]["pgd3"]["parameters"]["eps"] == config.attack.eps
    assert saved["attacks"]["apgd-ce"]["parameters"]["apgd"]["n_iter"] == 5
    assert os.path.basename(report["report_path"]) == (
        "eval_test_none_pgd3_apgd-ce_linf-eps8-255_step2-255_n50.json")
    # The threat model and the largest perturbation each attack produced (PGD's clip reaches
    # eps; the clean images are not perturbed).
    assert saved["norm"] == "linf" and saved["eps"] == config.attack.eps
    assert saved["attacks"]["none"]["max_perturbation"] == 0.0
    assert abs(saved["attacks"]["pgd3"]["max_perturbation"] - config.attack.eps) < 1e-6
    assert saved["complete"] and not [n for n in os.listdir(workdir) if "partial" in n]
    # Other settings get another name; a rerun of the same settings keeps the history.
    again = evaluate.run_evaluation(config, str(workdir), ["none"], num_examples=40, eps=0.01,
                                    seed=3, split="validation")
    assert os.path.basename(again["report_path"]) == (
        "eval_validation_none_linf-eps0.01_n40_seed3.json")
    evaluate.run_evaluation(config, str(workdir), ["none"], num_examples=40, eps=0.01, seed=3,
                            split="validation")
    history = [json.loads(line) for line in open(workdir / evaluate.HISTORY_FILE)]
    assert [entry["examples"] for entry in history] == [50, 40, 40]
    assert os.path.exists(report["report_path"])


@pytest.mark.parametrize("option, value, message", [
    ("num_examples", 0, "--num_examples=0 must be positive"),
    ("num_examples", -5, "--num_examples=-5 must be positive"),
    ("batch_size", 0, "--batch_size=0 must be positive"),
    ("eps", -0.03, "--eps=-0.03 must lie in"),
    ("step_size", 2.0, "--step_size=2.0 must lie in"),
    ("norm", "l1", "--norm='l1' is not a threat model; use one of linf, l2"),
])
def test_bad_eval_options_are_refused(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluation_checks.check_evaluation(tiny_config(), "pgd3", **{option: value})


@pytest.mark.parametrize("options, message", [
    ({"norm": "l2", "eps": 0.0}, "--eps=0.0 must lie in (0, 55.426] for the l2 norm on digits"),
    ({"norm": "l2", "eps": 56.0}, "--eps=56.0 must lie in (0, 55.426]"),
    ({"norm": "l2", "eps": 0.5, "step_size": -0.1}, "--step_size=-0.1 must lie in [0, 55.426]"),
    ({"norm": "linf", "eps": 1.5}, "--eps=1.5 must lie in (0, 1] for the linf norm"),
    ({"norm": "l2", "attack": "none,fgsm"}, "'fgsm' is an L-inf attack; with norm 'l2' use fgm"),
])
def test_bad_threat_models_are_refused(options, message):
    """An eps outside (0, the largest distance of two 32x32x3 images = sqrt(3072)], and an
    L-inf-only attack in L2, are one-line errors before anything runs."""
    options = dict(options)
    attack = options.pop("attack", "pgd3")
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluation_checks.check_evaluation(tiny_config(), attack, **options)


@pytest.mark.parametrize("changes, message", [
    ({"attack__norm": "l1"}, "--config.attack.norm='l1' is not valid"),
    ({"attack__norm": "l2", "attack__eps": 60.0}, "--config.attack.eps=60.0 must lie in (0, 55.426]"),
    ({"attack__eps": 0.0}, "--config.attack.eps=0.0 must lie in (0, 1] for the linf norm"),
])
def test_bad_training_threat_models_are_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        training_checks.check_training(tiny_config(**changes))


def test_an_interrupted_autoattack_keeps_the_components_it_finished(tiny_run, monkeypatch):
    workdir, config = tiny_run
    real_autoattack = evaluate.attacks.autoattack

    def stopped_after_the_first_component(*args, progress=None, **kwargs):
        def progress_then_interrupt(part, accuracy):
            progress(part, accuracy)
            raise KeyboardInterrupt

        return real_autoattack(*args, progress=progress_then_interrupt, **kwargs)

    monkeypatch.setattr(evaluate.attacks, "autoattack", stopped_after_the_first_component)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_evaluation(config, str(workdir), ["pgd2", "autoattack"], num_examples=24,
                                batch_size=8, autoattack_options={"n_iter": 3, "n_queries": 5})
    [partial] = [name for name in os.listdir(workdir) if name.startswith("eval_")]
    assert partial.endswith(".partial.json")
    saved = json.load(open(workdir / partial))
    assert saved["complete"] is False and saved["attacks"]["pgd2"]["robust_acc"] >= 0
    assert saved["attacks"]["autoattack"]["components_done"] == "apgd-ce"
    assert 0 <= saved["attacks"]["autoattack"]["robust_acc_so_far"] <= 1


def constant7():
    import jax
    import jax.numpy as jnp

    import own_models
    model = own_models.Constant7()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("changes, options, message", [
    ({"data__name": "cifar100"}, {"split": "cifar10.1"},
     "--split cifar10.1 is a new test set of CIFAR-10; the config's dataset is cifar100."),
    ({}, {"corruptions": ["fog"]}, "--corruptions and --severities choose what --attack "
                                   "corruptions evaluates: add corruptions to --attack."),
    ({"data__name": "cifar10"}, {"split": "train", "attacks": ["corruptions"]},
     "--split train has none"),
])
def test_evaluate_model_checks_what_the_command_line_checks(changes, options, message,
                                                            tmp_path):
    """Issue 37, item 5: fpcm_jax.evaluate_model refuses what --mode eval refuses, before any
    work (no dataset is read: CIFAR-100 is not here)."""
    import fpcm_jax
    model, variables = constant7()
    attacks = options.pop("attacks", ["none"])
    with pytest.raises(ValueError) as raised:
        fpcm_jax.evaluate_model(tiny_config(**changes), str(tmp_path), attacks, model=model,
                                variables=variables, **options)
    assert message in str(raised.value)
    assert not os.path.exists(tmp_path / "eval") and os.listdir(tmp_path) == []


def test_an_evaluation_of_the_test_split_needs_no_validation_split(tmp_path):
    """Issue 37, item 9: data.validation_size larger than the training split (1,500 digits)
    does not stop an evaluation of the test split, which never reads it; it still stops one
    of the validation split."""
    import fpcm_jax
    model, variables = constant7()
    config = tiny_config(data__validation_size=5000)
    report = fpcm_jax.evaluate_model(config, str(tmp_path / "test"), ["none"], model=model,
                                     variables=variables, num_examples=20)
    _, _, test = datasets.load("digits")
    assert report["attacks"]["none"]["clean_acc"] == np.mean(test.labels[:20] == 7)
    with pytest.raises(datasets.DatasetError, match="validation_size=5000 must lie in"):
        fpcm_jax.evaluate_model(config, str(tmp_path / "val"), ["none"], model=model,
                                variables=variables, num_examples=20, split="validation")
