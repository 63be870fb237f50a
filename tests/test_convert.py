"""Official state_dict conversion: formats, prefixes, errors, the CLI and orbax round trip."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from fpcm_jax import experiment, models
from fpcm_jax.runs import checkpoint, convert, export, torch_zip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wrn():
    return models.create("wrn-16-2")


def logits(model, variables, x):
    return np.asarray(model.apply(variables, x, train=False))


def test_module_prefix_and_ignored_entries(official_wrn16_2, wrn):
    arrays, state_dict = official_wrn16_2
    plain = convert.from_official(state_dict, wrn)
    wrapped = {f"module.{key}": value for key, value in state_dict.items()}
    wrapped["module.attn1.learnable_freq_control"] = np.ones(160, np.float32)
    converted = convert.from_official({"state_dict": wrapped}, wrn)
    chex_equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), plain, converted)
    assert all(jax.tree.leaves(chex_equal))


def test_npz_file_gives_the_same_variables(official_wrn16_2, wrn, tmp_path):
    arrays, state_dict = official_wrn16_2
    path = tmp_path / "official.npz"
    np.savez(path, **state_dict)
    from_file = convert.from_official(str(path), wrn)
    np.testing.assert_allclose(logits(wrn, from_file, arrays["x_eval"]),
                               arrays["logits_eval_60"], rtol=1e-4, atol=1e-4)


def test_missing_unexpected_and_misshaped_entries_are_named(official_wrn16_2, wrn):
    _, state_dict = official_wrn16_2
    missing = {k: v for k, v in state_dict.items() if k != "block2.layer.1.conv2.weight"}
    with pytest.raises(convert.ConversionError, match="block2.layer.1.conv2.weight"):
        convert.from_official(missing, wrn)
    extra = dict(state_dict, **{"head.weight": np.zeros((10, 128), np.float32)})
    with pytest.raises(convert.ConversionError, match="head.weight"):
        convert.from_official(extra, wrn)
    wrong = dict(state_dict, **{"fc.weight": np.zeros((100, 128), np.float32)})
    with pytest.raises(convert.ConversionError, match="'fc.weight' has shape \\(100, 128\\)"):
        convert.from_official(wrong, wrn)


def test_checkpoint_of_another_model_is_refused(official_resnet18, official_wrn16_2, wrn):
    with pytest.raises(convert.ConversionError, match="another model"):
        convert.from_official(official_resnet18[1], wrn)
    with pytest.raises(convert.ConversionError, match="another model"):
        convert.from_official(official_wrn16_2[1], models.create("wrn-16-2", fpcm=False))


def numbered_variables(model):
    """The model's variables in Flax layout, each element a distinct number."""
    template = models.variables_template(model)
    leaves, tree = jax.tree.flatten(template)
    counter = iter(range(1, len(leaves) + 1))
    return jax.tree.unflatten(tree, [
        next(counter) * 1e-3 + np.arange(np.prod(leaf.shape), dtype=np.float32)
        .reshape(leaf.shape) for leaf in leaves])


@pytest.mark.parametrize("name, fixture_name", [("resnet18", "official_resnet18"),
                                                 ("wrn-16-2", "official_wrn16_2")])
def test_export_has_the_official_names_shapes_and_layouts(name, fixture_name, request):
    """Names, shapes and dtypes as the official model's state_dict (its key list recorded by
    the official code in the fixture); each element where PyTorch keeps it: conv OIHW[o,i,h,w]
    = HWIO[h,w,i,o], linear (out, in), FPCM projections as Conv1d weights."""
    arrays, official = request.getfixturevalue(fixture_name)
    official_shapes = {key: tuple(shape) for key, shape in
                       json.loads(str(arrays["keys_json"])).items()}
    variables = numbered_variables(models.create(name))
    exported = convert.to_official(variables)
    assert {key: value.shape for key, value in exported.items()} == official_shapes
    for key, value in exported.items():
        assert value.dtype == official[key].dtype, key
    params = variables["params"]
    stem = params["conv1"]["kernel"]
    np.testing.assert_array_equal(exported["conv1.weight"], np.einsum("hwio->oihw", stem))
    head = params["linear" if name == "resnet18" else "fc"]["kernel"]
    np.testing.assert_array_equal(exported["linear.weight" if name == "resnet18" else "fc.weight"],
                                  np.einsum("io->oi", head))
    projection = params["attn2"]["projection"]["kernel"]
    official_projection = exported["attn2.projection.weight"]
    if name == "resnet18":  # depthwise: weight[c, 0, 0] scales channel c
        np.testing.assert_array_equal(official_projection[:, 0, 0], projection)
    else:  # dense: weight[out, in, 0]
        np.testing.assert_array_equal(official_projection[:, :, 0], np.einsum("io->oi",
                                                                              projection))
    np.testing.assert_array_equal(exported["bn1.running_var"], variables["batch_stats"]["bn1"]
                                  ["var"])


@pytest.mark.parametrize("name, fixture_name", [("resnet18", "official_resnet18"),
                                                 ("wrn-16-2", "official_wrn16_2")])
def test_official_arrays_come_back_from_a_conversion_and_export_unchanged(name, fixture_name,
                                                                         request):
    _, official = request.getfixturevalue(fixture_name)
    exported = convert.to_official(convert.from_official(official, models.create(name)))
    assert set(exported) == set(official)
    for key, value in official.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.slow
def test_cli_writes_a_checkpoint_that_loads(official_wrn16_2, wrn, tmp_path):
    arrays, state_dict = official_wrn16_2
    source = tmp_path / "official.npz"
    np.savez(source, **state_dict)
    out = tmp_path / "converted"
    command = [sys.executable, "-m", "fpcm_jax.runs.convert", str(source), "--model", "wrn-16-2",
               "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "713,402 parameters" in result.stdout
    variables, info = checkpoint.load_variables(str(out), models.variables_template(wrn))
    assert info["name"] == "wrn-16-2" and info["fpcm"] is True
    np.testing.assert_allclose(logits(wrn, variables, arrays["x_eval"]),
                               arrays["logits_eval_60"], rtol=1e-4, atol=1e-4)
    # A second run must not overwrite it; a wrong model must fail with a one-line error.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds a checkpoint" in again.stderr
    wrong = subprocess.run(command[:-4] + ["--model", "resnet18", "--out", str(tmp_path / "r")],
                           cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ")
    assert "Traceback" not in wrong.stderr and not (tmp_path / "r").exists()


def test_loading_into_another_model_names_the_difference(official_wrn16_2, wrn, tmp_path):
    variables = convert.from_official(official_wrn16_2[1], wrn)
    checkpoint.save_variables(str(tmp_path / "ckpt"), variables, {"name": "wrn-16-2"})
    other = models.variables_template(models.create("wrn-16-2", num_classes=100))
    with pytest.raises(ValueError, match="does not fit the model.*fc"):
        checkpoint.load_variables(str(tmp_path / "ckpt"), other)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        checkpoint.load_variables(str(tmp_path / "elsewhere"))


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_export_gives_the_official_state_dict_and_eval_takes_it_directly(official_wrn16_2, wrn,
                                                                         tmp_path):
    arrays, state_dict = official_wrn16_2
    variables = convert.from_official(state_dict, wrn)
    info = experiment.official_description("wrn-16-2", 10)
    checkpoint.save_variables(str(tmp_path / "converted"), variables, info)
    exported = tmp_path / "export" / "model.npz"
    result = run_main("--config", "configs/tiny.py", "--mode", "export", "--checkpoint",
                      str(tmp_path / "converted"), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    with np.load(exported) as archive:
        assert set(archive.files) == set(convert.to_official(variables))
    again = convert.from_official(str(exported), wrn)
    np.testing.assert_array_equal(logits(wrn, again, arrays["x_eval"]),
                                  logits(wrn, variables, arrays["x_eval"]))
    assert json.load(open(str(exported) + ".json"))["name"] == "wrn-16-2"
    # An existing --out is a one-line error.
    existing = run_main("--config", "configs/tiny.py", "--mode", "export", "--checkpoint",
                        str(tmp_path / "converted"), "--out", str(exported))
    assert existing.returncode == 1 and "exists" in existing.stderr
    # A .pt export (no torch needed) holds the same arrays.
    export.export(str(tmp_path / "converted"), str(tmp_path / "model.pt"))
    from_pt = torch_zip.load(tmp_path / "model.pt")
    with np.load(exported) as archive:
        assert list(from_pt) == list(archive.files)
        for name in archive.files:
            assert from_pt[name].dtype == archive[name].dtype, name
            np.testing.assert_array_equal(from_pt[name], archive[name], err_msg=name)
    # Eval takes the official file directly, converted on the fly: the same accuracy as the
    # converted checkpoint. The exported file's model.json companion says which model it holds
    # (wrn-16-2, though the config names resnet18); without it, the config's model is assumed.
    bare = tmp_path / "bare" / "model.npz"
    os.makedirs(bare.parent)
    shutil.copy(exported, bare)
    wrn_flags = ["--config", "configs/tiny.py", "--config.model.name=wrn-16-2",
                 "--config.model.widths=()", "--config.model.stage_sizes=()"]
    eval_flags = ["--mode", "eval", "--attack", "none", "--num_examples", "40"]
    reports = {}
    for name, source, flags in (("converted", tmp_path / "converted", wrn_flags),
                                ("file", exported, ["--config", "configs/tiny.py"]),
                                ("bare", bare, wrn_flags)):
        result = run_main(*flags, *eval_flags, "--checkpoint", str(source), "--workdir",
                          str(tmp_path / f"eval_{name}"))
        assert result.returncode == 0, result.stderr
        [report] = [f for f in os.listdir(tmp_path / f"eval_{name}") if f.startswith("eval_")]
        reports[name] = json.load(open(tmp_path / f"eval_{name}" / report))
    assert reports["file"]["checkpoint"] == str(exported)
    assert reports["file"]["model"]["name"] == "wrn-16-2"
    accuracies = {name: report["attacks"]["none"]["clean_acc"] for name, report in reports.items()}
    assert accuracies["file"] == accuracies["converted"] == accuracies["bare"], accuracies
    wrong = run_main("--config", "configs/tiny.py", "--mode", "eval", "--attack", "none",
                     "--checkpoint", str(bare), "--workdir", str(tmp_path / "wrong"))
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ")
    assert "Traceback" not in wrong.stderr
