"""The command line as a new user meets it: help, and every bad input of issue 14's table is
a one-line error with a non-zero exit that leaves the workdir exactly as it was."""

import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from fpcm_jax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/tiny.py"]


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def snapshot(directory):
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


@pytest.mark.parametrize("args, message", [
    (["--config.model.widths=16,32"], "four positive integers"),
    (["--config.model.name=wrn-16-2"], "unset it with --config.model.widths=()"),
    (["--config.attack.eps=-0.03"], "attack.eps=-0.03 must lie in (0, 1] for the linf norm"),
    (["--config.train.batch_size=0"], "train.batch_size=0 must be positive"),
    (["--mode", "eval", "--num_examples", "0"], "--num_examples=0 must be positive"),
    (["--mode", "eval", "--num_examples", "-5"], "--num_examples=-5 must be positive"),
    (["--mode", "eval", "--eps", "-0.03"], "--eps=-0.03 must lie in (0, 1]"),
    (["--mode", "eval", "--norm", "l1"], "--norm='l1' is not a threat model; use one of linf, l2"),
    (["--mode", "eval", "--attack", "pgd0"], "no steps; give N >= 1"),
    (["--mode", "eval", "--batch_size", "0"], "--batch_size=0 must be positive"),
    (["--mode", "analyze", "--checkpoints", "runs/none"], "pass --checkpoints PATH"),
    (["--mode", "report", "--checkpoints", "runs/none"], "runs/none does not exist"),
    (["--config.attack.norm=l2"], "the usual linf value: give the l2 radius and step too"),
    (["--config.model.name=no_such_package.nets:Net"], "cannot import the model"),
    (["--mode", "eval", "--attack", "corruptions"], "digits has none"),
    (["--mode", "eval", "--attack", "corruptions", "--config.data.name=cifar10",
      "--severities", "1,7"], "--severities: 7 is not a severity"),
    (["--mode", "eval", "--attack", "corruptions", "--config.data.name=cifar10",
      "--corruptions", "fogg"], "unknown corruption 'fogg'"),
])
def test_bad_input_is_one_line_and_leaves_the_workdir_as_it_was(tmp_path, args, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's own file")
    before = snapshot(workdir)
    result = run_main(*TINY, "--workdir", str(workdir), *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert snapshot(workdir) == before


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_lists_the_modes_and_flags(flag):
    result = run_main(flag)
    assert result.returncode == 0 and result.stderr == ""
    for text in ("--mode: <train|eval|analyze|report|export|info>", "--attack", "allow_fallback",
                 "--workdir", "python main.py --config configs/cifar10_resnet18.py"):
        assert text in result.stdout
    assert ("checkpoint_every_steps: 500" in result.stdout) == (flag == "--helpfull")


def test_a_wide_resnet_on_a_resnet_config_once_its_widths_are_unset():
    config = tiny_config(model__name="wrn-16-2", model__widths=(), model__stage_sizes=())
    description = experiment.describe(config)
    assert description["widths"] is None and description["stage_sizes"] is None
    model, _ = experiment.build(config)
    assert model.__class__.__name__ == "WideResNet"


def test_every_config_file_is_valid(tmp_path):
    import importlib

    from fpcm_jax.training import checks as training_checks

    names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and f != "__init__.py")
    assert "cifar10_wrn28_10_swish_edm" in names
    import tensorflow_datasets as tfds

    import test_own_data
    folder = test_own_data.image_folder(tmp_path / "folder", size=16)
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        if config.data.extra_fraction:
            (tmp_path / "extra.npz").write_bytes(b"")
            config.data.extra_path = str(tmp_path / "extra.npz")
        if config.data.name.startswith("folder:"):  # your own data: made here
            config.data.name, config.data.validation_size = f"folder:{folder}", 2
        config.data.data_dir = str(tmp_path / "tfds")
        with tfds.testing.mock_data(as_data_source_fn=test_own_data.mnist_like(40)):
            training_checks.check_training(config)


def test_an_own_model_on_the_command_line_drops_the_config_files_registry_fields():
    """Issue 37, item 10: configs/tiny.py sets widths and stage_sizes for the registry's
    ResNet; naming an own model on the command line drops them with one note, while a
    registry field given on the same command line stays an error; `=None` unsets a tuple."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/tests")
    own = ["--mode", "info", "--config.model.name=own_models:TinyCNN"]
    result = subprocess.run([sys.executable, "main.py", *TINY, *own], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: own_models:TinyCNN is your own model: the config file's "
                     "registry-model fields widths=(16, 32, 64, 128), stage_sizes=(1, 1, 1, 1) "
                     "were dropped (its options come from config.model.kwargs)."]
    assert "own_models:TinyCNN for digits: 1,634 parameters" in result.stdout
    result = subprocess.run([sys.executable, "main.py", *TINY, *own,
                             "--config.model.widths=8,8,8,8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("error: --config.model.widths=[8, 8, 8, 8] applies to the "
                             "registry's models; own_models:TinyCNN takes its options from "
                             "config.model.kwargs (reset the field, e.g. in your config "
                             "file).\n")
    result = run_main(*TINY, "--mode", "info", "--config.model.widths=None",
                      "--config.model.stage_sizes=None")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("resnet18 (FPCM: True) for digits")  # the default widths


def test_give_way_to_import_path_resets_only_the_config_files_fields():
    config = tiny_config(model__name="own_models:TinyCNN", model__activation="swish")
    dropped = experiment.give_way_to_import_path(config, ["name", "activation"])
    assert dropped == {"widths": (8, 8, 8, 8), "stage_sizes": (1, 1, 1, 1)}
    assert config.model.widths is None and config.model.stage_sizes is None
    assert config.model.activation == "swish"  # given on the command line: describe refuses it
    registry = tiny_config()
    assert experiment.give_way_to_import_path(registry, ["name"]) == {}
    assert registry.model.widths == (8, 8, 8, 8)
