"""Short learning check: PGD-AT gives clearly higher PGD-20 accuracy than standard training.

A shortened tiny config on scikit-learn's digits: ResNet widths 8-64, 8 epochs of batch 32
(344 SGD steps), PGD-5 at eps 16/255 (step 4/255) for training and PGD-20 at the same eps for
the final test (297 digits). At 16/255 a standard model keeps well under half of its
accuracy; small batches give enough SGD steps for adversarial training to converge (with
batch 128, 12 epochs, the outcome swung with the seed: PGD-AT clean accuracy 36% to 71%).

Measured here over seeds 0-3 (2-core CPU, JAX 0.10.2):
  float32 PGD-AT:  clean 0.990-0.997, PGD-20 0.916-0.943
  bfloat16 PGD-AT: clean 0.987-0.993, PGD-20 0.892-0.946
  bfloat16 PGD-AT + AWP (gamma 0.01): clean 0.95-0.96, PGD-20 0.83-0.86 (2026-12-02); seed 0
    on a 2-core AMD EPYC machine clean 0.892 (2026-12-03); seed 0 again 2026-12-07: clean
    0.963, PGD-20 0.842, 173 s
  float32 standard: clean 0.987-0.993, PGD-20 0.370-0.609
Standard training's robust accuracy is the loosest (a range of 0.24), so the checks are
absolute bounds that sit well outside every measured range (a run of another machine's
arithmetic is another draw from these ranges), plus a gap of PGD-AT over standard training
that the measured runs exceed by at least 0.18.

bfloat16 with AWP is trained once (issue 37, item 12: the coverage had been dropped for the
suite's time, 173 to 282 s): mixed precision and AWP's perturbed-weight step together still
learn robustness. Its bounds are looser (clean 0.85: the AMD machine's 0.892 lies under the
others' 0.95; PGD-20 0.7, measured >= 0.83), and it must beat standard training by GAP too.
AWP's step is also checked exactly (tests/test_train_rules.py, tests/test_frameworks.py), and
bfloat16 logits against float32 (tests/test_models.py).
"""

import pytest

from configs import tiny
from fpcm_jax.training import train

pytestmark = pytest.mark.slow

CLEAN = 0.9    # clean accuracy every run reaches (measured >= 0.987)
ROBUST = 0.8   # PGD-20 accuracy of PGD-AT (measured >= 0.892; standard training <= 0.609)
GAP = 0.1      # PGD-AT over standard training in the same sitting (measured >= 0.28)


def short_run(workdir, attack_steps, dtype="float32", **train_changes):
    config = short_run_config(attack_steps, dtype)
    config.train.update(train_changes)
    return train.train_and_evaluate(config, str(workdir))


def short_run_config(attack_steps, dtype="float32"):
    config = tiny.get_config()
    config.model.dtype = dtype
    config.model.widths = (8, 16, 32, 64)
    config.train.epochs = 8
    config.train.batch_size = 32
    config.train.lr = 0.05
    config.train.warmup_epochs = 1
    config.train.eval_every_epochs = 0
    config.attack.steps = attack_steps
    config.attack.eps = 16 / 255
    config.attack.step_size = 4 / 255
    config.logging.tensorboard = False
    config.logging.curves = False
    return config


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return short_run(tmp_path_factory.mktemp("standard"), attack_steps=0)


BF16_AWP_CLEAN = 0.85   # measured 0.892-0.963
BF16_AWP_ROBUST = 0.7   # measured 0.83-0.86


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
