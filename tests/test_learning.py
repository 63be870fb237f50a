"""Short learning check: PGD-AT gives clearly higher PGD-20 accuracy than standard training.

A shortened tiny config on scikit-learn's digits: ResNet widths 8-64, 8 epochs of batch 32
(344 SGD steps), PGD-5 at eps 16/255 (step 4/255) for training and PGD-20 at the same eps for
the final test (297 digits). At 16/255 a standard model keeps well under half of its
accuracy; small batches give enough SGD steps for adversarial training to converge (with
batch 128, 12 epochs, the outcome swung with the seed: PGD-AT clean accuracy 36% to 71%).

Each run is `main.py` on DEVICES = 2 fake CPU devices, in a process of its own: on the
suite's 4 the same runs cost more CPU (measured alone, 2026-12-07: standard 127 -> 75 s,
PGD-AT 256 -> 207 s of CPU), and 4-device training is checked step by step elsewhere
(tests/test_train.py, tests/test_frameworks.py, tests/test_multiprocess.py).

Measured on 2 devices over config.seed 0-3 (2-core CPU, JAX 0.10.2, 2026-12-07):
  float32 PGD-AT:  clean 0.987-0.990, PGD-20 0.906-0.946
  bfloat16 PGD-AT + AWP (gamma 0.01): clean 0.946-0.970, PGD-20 0.835-0.872
  float32 standard: clean 0.987-0.997, PGD-20 0.381-0.650
  gap to standard training, same seed: PGD-AT 0.296-0.525, bfloat16 + AWP 0.222-0.455
On 4 devices (earlier sittings): PGD-AT clean 0.990-0.997, PGD-20 0.916-0.943; bfloat16
PGD-AT clean 0.987-0.993, PGD-20 0.892-0.946; bfloat16 + AWP clean 0.95-0.96, PGD-20
0.83-0.86 (seed 0 on a 2-core AMD EPYC machine: clean 0.892); standard clean 0.987-0.993,
PGD-20 0.370-0.609.
Standard training's robust accuracy is the loosest (a range of 0.27), so the checks are
absolute bounds that sit well outside every measured range (a run of another machine's
arithmetic is another draw from these ranges), plus a gap over standard training that the
measured runs exceed by at least 0.12.

bfloat16 with AWP is trained once (issue 37, item 12: the coverage had been dropped for the
suite's time, 173 to 282 s): mixed precision and AWP's perturbed-weight step together still
learn robustness. Its bounds are looser (clean 0.85: the AMD machine's 0.892 lies under the
others' 0.95; PGD-20 0.7, measured >= 0.83), and it must beat standard training by GAP too.
AWP's step is also checked exactly (tests/test_train_rules.py, tests/test_frameworks.py), and
bfloat16 logits against float32 (tests/test_models.py).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import cpu_env

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2   # fake CPU devices of each run (see the docstring)
CLEAN = 0.9    # clean accuracy of PGD-AT and standard training (measured >= 0.987)
ROBUST = 0.8   # PGD-20 accuracy of PGD-AT (measured >= 0.906; standard training <= 0.650)
GAP = 0.1      # over standard training of the same seed (measured >= 0.222)


def short_run(workdir, attack_steps, dtype="float32", **train_changes):
    """`main.py` with `short_run_changes`, on DEVICES fake CPU devices: its summary.json."""
    changes = dict(short_run_changes(attack_steps, dtype),
                   **{f"train.{name}": value for name, value in train_changes.items()})
    flags = [f"--config.{name}={value}" for name, value in changes.items()]
    done = subprocess.run([sys.executable, "main.py", "--config", "configs/tiny.py",
                           "--workdir", str(workdir), *flags], cwd=REPO, env=cpu_env(DEVICES),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as handle:
        return json.load(handle)


def short_run_changes(attack_steps, dtype="float32"):
    """The short learning run's changes to configs/tiny.py, as config field: value."""
    return {"model.dtype": dtype, "model.widths": (8, 16, 32, 64), "train.epochs": 8,
            "train.batch_size": 32, "train.lr": 0.05, "train.warmup_epochs": 1,
            "train.eval_every_epochs": 0, "attack.steps": attack_steps, "attack.eps": 16 / 255,
            "attack.step_size": 4 / 255, "logging.tensorboard": False, "logging.curves": False}


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return short_run(tmp_path_factory.mktemp("standard"), attack_steps=0)


BF16_AWP_CLEAN = 0.85   # measured 0.946-0.970 (4 devices: 0.892-0.963)
BF16_AWP_ROBUST = 0.7   # measured 0.835-0.872 (4 devices: 0.83-0.86)


def test_bfloat16_with_awp_learns_robustness(standard, tmp_path):
    awp = short_run(tmp_path, attack_steps=5, dtype="bfloat16", awp_gamma=0.01)
    assert awp["test_clean_acc"] > BF16_AWP_CLEAN
    assert awp["test_pgd20_acc"] > BF16_AWP_ROBUST
    assert awp["test_pgd20_acc"] > standard["test_pgd20_acc"] + GAP


def test_pgd_at_beats_standard_training_under_pgd20(standard, tmp_path):
    adversarial = short_run(tmp_path, attack_steps=5)
    assert standard["test_clean_acc"] > CLEAN  # the model and data are fine
    assert adversarial["test_clean_acc"] > CLEAN
    assert adversarial["test_pgd20_acc"] > ROBUST
    assert adversarial["test_pgd20_acc"] > standard["test_pgd20_acc"] + GAP
