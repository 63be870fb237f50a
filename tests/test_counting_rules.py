"""Two rules every path that counts accuracy must keep, each made observable by a model built to
break it (tests/own_models.py):

- evaluation runs the model at the final FPCM cutoff (progress 1.0): `ProgressProbe` leans to
  class 0 by 10 (1 - progress), so validation, the final test, `--mode eval` and the analysis
  report the accuracy at progress 1.0 exactly, which differs from that at any other progress;
- a point misclassified clean is not robust, even where its adversarial example is classified
  correctly (README): `OnGridIsWrong` misclassifies every uint8 image (label 1) and classifies
  every image off the 1/255 grid correctly, so robust accuracy must be 0 in `accuracy.py`,
  `--mode eval`, AutoAttack and the training step's metrics, while the adversarial examples
  themselves are all classified correctly.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import read_train_state, tiny_config
from fpcm_jax import attacks, experiment, parallel
from fpcm_jax.training import checks as training_checks
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import accuracy, analysis, evaluate
from fpcm_jax.runs import checkpoint, loading
from fpcm_jax.training import train, train_step


def own_config(name, **changes):
    config = tiny_config(model__name=name, model__widths=None, model__stage_sizes=None,
                         **changes)
    config.model.kwargs = {}
    return config


def accuracy_at(model, variables, split, progress):
    logits = model.apply(variables, datasets.to_float(split.images), train=False, progress=progress)
    return float(np.mean(np.asarray(logits).argmax(1) == split.labels))


def test_every_evaluation_runs_at_the_final_cutoff(tmp_path):
    """Standard training (1 epoch) of ProgressProbe; every figure equals the accuracy at
    progress 1.0 computed here, and differs from the one at progress 0.5."""
    config = own_config("own_models:ProgressProbe", attack__steps=0, train__epochs=1,
                        train__final_test_attack_steps=0)
    training_checks.check_training(config)
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(config, workdir)
    _, val_split, test_split = datasets.load_for(config)
    model, variables, info, _ = loading.load_model(os.path.join(workdir, "best_sum"))
    state = read_train_state(workdir, config)
    final = {"params": state.params, "batch_stats": state.batch_stats}
    assert info["val_clean_acc"] == accuracy_at(model, variables, val_split, 1.0)
    assert info["val_clean_acc"] != accuracy_at(model, variables, val_split, 0.5)
    assert summary["test_clean_acc"] == accuracy_at(model, final, test_split, 1.0)
    assert summary["test_clean_acc"] != accuracy_at(model, final, test_split, 0.5)
    report = evaluate.run_evaluation(config, workdir, ["none", "apgd-ce"], num_examples=100,
                                     autoattack_options={"n_iter": 1})
    first = datasets.Split(test_split.images[:100], test_split.labels[:100])
    best, best_variables, _, _ = loading.load_model(workdir)
    at_end = accuracy_at(best, best_variables, first, 1.0)
    assert report["attacks"]["none"]["clean_acc"] == at_end
    assert report["attacks"]["apgd-ce"]["clean_acc"] == at_end  # AutoAttack's clean pass
    analyzer = analysis.Analyzer(best, best_variables)
    x = np.asarray(datasets.to_float(first.images))
    assert analyzer.accuracy(x, first.labels) == at_end
    # The analyses' own forwards: noise and basis images of norm 0 leave the images as they are
    assert analyzer.band_noise(x, first.labels, jax.random.key(0), 2, 0.0) == [at_end] * 2
    heat = analyzer.fourier_heat_map(x[:20], first.labels[:20], jax.random.key(0), 0.0)
    first20 = datasets.Split(first.images[:20], first.labels[:20])
    np.testing.assert_allclose(heat, 1 - accuracy_at(best, best_variables, first20, 1.0),
                               atol=1e-6)
    assert accuracy_at(best, best_variables, first, 1.0) != accuracy_at(best, best_variables,
                                                                        first, 0.5)


def grid_model_and_data(count=24):
    config = own_config("own_models:OnGridIsWrong")
    model = experiment.model_from_description(experiment.describe(config))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    _, _, test_split = datasets.load_for(config)
    images = test_split.images[:count]
    return config, model, variables, images, np.ones(count, np.int32)


def test_misclassified_clean_is_never_robust(tmp_path):
    config, model, variables, images, labels = grid_model_and_data()
    logits_fn = lambda x: model.apply(variables, x, train=False, progress=1.0)
    x = datasets.to_float(images)
    x_adv = attacks.get("pgd2", eps=8 / 255)(logits_fn, x, labels, jax.random.key(0))
    assert np.all(np.asarray(logits_fn(x)).argmax(1) == 0)      # wrong clean
    assert np.all(np.asarray(logits_fn(x_adv)).argmax(1) == 1)  # right when perturbed
    mesh = parallel.make_mesh()
    step = accuracy.pgd_eval_step(model, mesh, 2)
    counted = accuracy.evaluate_split(step, variables, datasets.Split(images, labels), 8,
                                      jax.random.key(0), mesh)
    assert counted["clean_acc"] == 0.0 and counted["robust_acc"] == 0.0
    # AutoAttack attacks only the points classified correctly: none here. (Its stages also
    # return the clean image for a point misclassified clean, so its robust accuracy alone
    # would be 0 by construction: the count of points attacked is what pins the rule.)
    attacked = []
    result = attacks.autoattack(logits_fn, x, labels, jax.random.key(0), 8 / 255, n_iter=2,
                                n_queries=5, n_target_classes=1, batch_size=8,
                                on_batch=lambda *report: attacked.append(report[4]))
    assert result["clean_accuracy"] == 0.0 and result["robust_accuracy"] == 0.0
    assert not result["robust_flags"].any()
    assert attacked and set(attacked) == {0}  # every stage started with 0 points to attack
    saved = str(tmp_path / "ckpt")
    checkpoint.save_variables(saved, variables, experiment.describe(config))
    config.data.name = "digits"
    report = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["pgd2", "apgd-ce"], saved,
                                     num_examples=24, batch_size=8,
                                     autoattack_options={"n_iter": 2})
    for name in ("pgd2", "apgd-ce"):
        assert report["attacks"][name]["robust_acc"] == 0.0, name


def test_training_metrics_count_robust_only_where_clean_is_right():
    """One training step of OnGridIsWrong on label-1 images: clean accuracy 0, and the batch's
    robust accuracy 0 although every adversarial example is classified correctly."""
    config, model, variables, images, labels = grid_model_and_data(8)
    config.data.crop_padding, config.data.flip = 0, False
    tx, learning_rate = train_step.make_optimizer(config.train, steps_per_epoch=5)
    state = train_step.create_state(model, tx, jax.random.key(0), 32)
    step = train_step.make_train_step(model, tx, learning_rate, config, 5)
    batch = {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}
    _, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["clean_acc"]) == 0.0 and float(metrics["adv_acc"]) == 0.0
