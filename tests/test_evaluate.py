"""`main.py --mode eval` machinery: checkpoint loading, padding and masking, the JSON report."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import checkpoint, config_checks, data, evaluate, experiment, models


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
    _, _, test_split = data.load("digits", validation_size=config.data.validation_size)
    logits = model.apply(variables, data.to_float(test_split.images[:50]), train=False)
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
        "eval_test_none_pgd3_apgd-ce_eps8-255_step2-255_n50.json")
    assert saved["complete"] and not [n for n in os.listdir(workdir) if "partial" in n]
    # Other settings get another name; a rerun of the same settings keeps the history.
    again = evaluate.run_evaluation(config, str(workdir), ["none"], num_examples=40, eps=0.01,
                                    seed=3, split="validation")
    assert os.path.basename(again["report_path"]) == "eval_validation_none_eps0.01_n40_seed3.json"
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
])
def test_bad_eval_options_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        config_checks.check_evaluation(tiny_config(), "pgd3", **{option: value})


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
