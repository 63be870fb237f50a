"""`main.py --mode eval` machinery: checkpoint loading, padding and masking, the JSON report."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config, train_tiny_run
from fpcm_jax import checkpoint, data, evaluate, experiment, models


def test_eval_counts_every_example_once_and_writes_a_report(tmp_path):
    config = train_tiny_run(tmp_path)
    report = evaluate.run_evaluation(config, str(tmp_path), ["none", "pgd3", "apgd-ce"],
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
    assert os.path.basename(report["report_path"]) == "eval_none_pgd3_apgd-ce.json"


@pytest.mark.parametrize("option, value, message", [
    ("num_examples", 0, "--num_examples=0 must be positive"),
    ("num_examples", -5, "--num_examples=-5 must be positive"),
    ("batch_size", 0, "--batch_size=0 must be positive"),
    ("eps", -0.03, "--eps=-0.03 must lie in"),
    ("step_size", 2.0, "--step_size=2.0 must lie in"),
])
def test_bad_eval_options_stop_before_anything_is_loaded_or_written(tmp_path, option, value,
                                                                    message):
    config = tiny_config()
    with pytest.raises(ValueError, match=message):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), ["pgd3"], **{option: value})
    assert not os.path.exists(tmp_path / "eval")
