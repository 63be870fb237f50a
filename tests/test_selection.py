"""Best-model selection: best_sum/ and best_robust/ hold the model of the epoch whose recorded
validation figures are the best, not the last epoch's nor the worst's.

The validation figures are scripted (the evaluation is replaced by one that returns them and
keeps the variables it was given), so the best epochs are known, differ between the two
criteria and are not the last: a run that kept the last epoch, or the worst, fails.
"""

import json

import jax
import pytest

from conftest import tiny_config
from fpcm_jax.evaluation import accuracy
from fpcm_jax.runs import loading
from fpcm_jax.training import train
from test_integrity import identical

# (clean, robust) validation accuracy of epochs 1-3. Best robust: epoch 1, best clean + robust:
# epoch 2; the worst are epochs 2 and 1, the last is 3.
SCRIPTED = [(0.05, 0.45), (0.8, 0.1), (0.3, 0.3)]
BEST_EPOCHS = {"best_sum": 2, "best_robust": 1}  # by hand from SCRIPTED
VALIDATION_SIZE = 1436  # leaves 64 training images: 2 steps of 32 an epoch
CRITERIA = {"best_sum": lambda record: record["val_clean_acc"] + record["val_robust_acc"],
            "best_robust": lambda record: record["val_robust_acc"]}


def scripted_run(workdir, monkeypatch, stop_after_steps=None):
    """(validation records, the variables validated at each epoch) of a 3-epoch run (standard
    training, 2 steps an epoch) validated with the scripted figures; with `stop_after_steps`,
    stopped there and resumed by a second call (as the same command run again)."""
    validated = []

    def scripted_evaluation(eval_step, variables, split, batch_size, key, mesh, name=""):
        if len(split) != VALIDATION_SIZE:  # the final test
            return {"clean_acc": 0.0, "robust_acc": 0.0, "examples": len(split)}
        clean, robust = SCRIPTED[len(validated)]
        validated.append(jax.device_get(variables))
        return {"clean_acc": clean, "robust_acc": robust, "examples": len(split)}

    monkeypatch.setattr(accuracy, "evaluate_split", scripted_evaluation)
    config = tiny_config(train__epochs=3, train__batch_size=32, attack__steps=0,
                         data__validation_size=VALIDATION_SIZE, train__warmup_epochs=0,
                         train__final_test_attack_steps=0, logging__tensorboard=False,
                         logging__curves=False)
    if stop_after_steps:
        stopped = config.copy_and_resolve_references()
        stopped.train.stop_after_steps = stop_after_steps
        assert "stopped_at_step" in train.train_and_evaluate(stopped, str(workdir))
    train.train_and_evaluate(config, str(workdir))
    with open(workdir / "metrics.jsonl") as handle:
        records = [line for line in map(json.loads, handle) if "val_clean_acc" in line]
    return records, validated


@pytest.mark.parametrize("stop_after_steps", [None, 4])
def test_best_models_are_the_states_of_the_best_recorded_epochs(tmp_path, monkeypatch,
                                                               stop_after_steps):
    """Also across a resume after epoch 2 (step 4): epoch 3, worse than the best before by
    both criteria, must not replace them (the best figures are restored with the state)."""
    records, validated = scripted_run(tmp_path, monkeypatch, stop_after_steps)
    assert [record["epoch"] for record in records] == [1, 2, 3] and len(validated) == 3
    assert [(r["val_clean_acc"], r["val_robust_acc"]) for r in records] == SCRIPTED
    assert BEST_EPOCHS == {name: 1 + max(range(3), key=lambda i: CRITERIA[name](records[i]))
                           for name in CRITERIA}
    for name, criterion in CRITERIA.items():
        figures = [criterion(record) for record in records]
        best = figures.index(max(figures))
        assert best != len(records) - 1, "the scripted figures must not make the last epoch best"
        _, variables, info, _ = loading.load_model(str(tmp_path / name))
        assert (info["epoch"], info["step"]) == (BEST_EPOCHS[name], 2 * BEST_EPOCHS[name])
        assert (info["val_clean_acc"], info["val_robust_acc"]) == SCRIPTED[best]
        assert info["selected_by"] == name
        assert identical(variables, validated[best]), name
        others = [index for index in range(len(validated)) if index != best]
        assert not any(identical(variables, validated[index]) for index in others), name
