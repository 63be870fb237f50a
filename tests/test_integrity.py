"""Fault injection: damaged checkpoints are never loaded silently, and a process killed while
saving leaves something the next run resumes from.

Every file of each kind of checkpoint (training, best, converted) gets 64 bytes flipped in its
middle, or is cut to half its length. The load must then either stop with the one-line
`DamagedCheckpoint` error naming the checkpoint, or (the damage fell on bytes never read, such
as orbax's timestamps) give arrays bit-identical to those saved: never anything else.

Saves are also cut at each of their phases, deterministically: a best model's through
`checkpoint.save_phase_hook`, a training checkpoint's in a process that exits inside orbax's
renames and pruning. Each cut is seen on disk, and the next load or resume gives exactly the
last complete save.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import experiment, models
from fpcm_jax.runs import checkpoint, convert, loading, run_dir
from fpcm_jax.training import train, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


def damage(path, how):
    content = bytearray(open(path, "rb").read())
    if how == "flip":
        middle = len(content) // 2
        for index in range(middle, min(middle + 64, len(content))):
            content[index] ^= 0xFF
    else:
        content = content[:len(content) // 2]
    with open(path, "wb") as handle:
        handle.write(bytes(content))


def host_leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def identical(tree, reference):
    found, wanted = host_leaves(tree), host_leaves(reference)
    return len(found) == len(wanted) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(found, wanted))


def assert_one_line_damage_error(error, directory):
    message = str(error)
    assert "\n" not in message and "is damaged" in message and directory in message, message


def data_files(directory):
    """The files of orbax's OCDBT databases (arrays and their index; which file holds what,
    and whether the top-level `d/` repeats process 0's, varies from run to run)."""
    return [name for name in files_under(directory) if f"{os.sep}d{os.sep}" in name]


def some_data_damage_detected(detected, directory):
    """Damage to the data that a load reads is caught: for each kind of damage, at least one
    data file's (the one read) is among the detected."""
    return all(any((name, how) in detected for name in data_files(directory))
               for how in ("flip", "truncate"))


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    model, _ = experiment.build(config)
    return config, model


def random_variables(model, seed):
    """Normal draws for every leaf, running variances positive (|draw| + 0.5): a model whose
    logits are finite (a negative variance gives NaN, which evaluation now refuses)."""
    template = models.variables_template(model)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.normal(size=leaf.shape)
        if jax.tree_util.keystr(path).endswith("['var']"):
            values = np.abs(values) + 0.5
        return values.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, template)


def check_every_file(saved_dir, load, reference, tmp_path):
    """Damage each file of a model checkpoint in turn; returns the files whose damage the
    load reported."""
    detected = set()
    for name in files_under(saved_dir):
        for how in ("flip", "truncate"):
            work = str(tmp_path / "work")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(saved_dir, work)
            damage(os.path.join(work, name), how)
            try:
                loaded = load(work)
            except checkpoint.DamagedCheckpoint as error:
                assert_one_line_damage_error(error, work)
                detected.add((name, how))
                continue
            assert identical(loaded, reference), f"{how} {name}: loaded different arrays"
    return detected


@pytest.mark.parametrize("kind", ["best", "converted"])
def test_damaged_model_checkpoint_is_an_error_never_a_different_model(kind, tiny_model, tmp_path,
                                                                      official_wrn16_2):
    if kind == "best":
        config, model = tiny_model
        variables = random_variables(model, 0)
        run = run_dir.RunDirectory(str(tmp_path / "run"), experiment.describe(config))
        run.save_best("best_robust", variables, {"step": 1, "epoch": 1})
        saved = str(tmp_path / "run" / "best_robust")
    else:
        _, state_dict = official_wrn16_2
        info = {**experiment.official_model_section("wrn-16-2"), "num_classes": 10}
        variables = convert.from_official(state_dict, experiment.model_from_description(info))
        saved = str(tmp_path / "converted")
        checkpoint.save_variables(saved, variables, info)  # as `python -m fpcm_jax.runs.convert`
    assert identical(loading.load_model(saved)[1], variables)
    detected = check_every_file(saved, lambda path: loading.load_model(path)[1], variables,
                                tmp_path)
    assert some_data_damage_detected(detected, saved)
    assert {("model.json", "flip"), ("checksums.json", "truncate")} <= detected
    # Every failed read above left orbax working in this process: a new save and a read of it
    # give the same arrays. (A read that fails inside orbax can leave a TensorStore callback
    # that later finds orbax's event loop closed: Python then reports "Event loop is closed"
    # as an unraisable exception, after the read, harmless; main.py drops those reports and
    # pytest.ini filters them.)
    again = str(tmp_path / "again")
    checkpoint.save_variables(again, variables, checkpoint.read_model_info(saved))
    assert identical(loading.load_model(again)[1], variables)


def test_arrays_swapped_under_their_checksums_are_caught(tiny_model, tmp_path):
    config, model = tiny_model
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    checkpoint.save_variables(first, random_variables(model, 0), experiment.describe(config))
    checkpoint.save_variables(second, random_variables(model, 1), experiment.describe(config))
    shutil.rmtree(os.path.join(first, "variables"))
    shutil.copytree(os.path.join(second, "variables"), os.path.join(first, "variables"))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="does not match the checksum"):
        loading.load_model(first)


STATE_TEMPLATES = {}  # config (JSON) -> a train state of it (creating one takes seconds)


def make_state(config, model, value):
    """A train state of step `value` whose arrays are random numbers drawn from seed `value`."""
    described = config.to_json_best_effort(sort_keys=True)
    if described not in STATE_TEMPLATES:
        tx, _ = train_step.make_optimizer(config.train, 10)
        STATE_TEMPLATES[described] = train_step.create_state(model, tx, jax.random.key(0), 32)
    state = STATE_TEMPLATES[described]
    rng = np.random.default_rng(value)
    state = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), state)
    return state.replace(step=np.asarray(value, np.int32))


@pytest.mark.slow
def test_damaged_training_checkpoint_falls_back_to_the_previous_one(tiny_model, tmp_path,
                                                                    capfd):
    config, model = tiny_model
    description = experiment.describe(config)
    saved = str(tmp_path / "saved")
    run = run_dir.RunDirectory(saved, description)
    run.checkpoints.save(make_state(config, model, 1), {"sum": 0.5})
    run.checkpoints.save(make_state(config, model, 2), {"sum": 0.75})
    template = make_state(config, model, 0)
    newest = os.path.join("checkpoints", "2")
    fell_back = set()
    for name in files_under(os.path.join(saved, newest)):
        for how in ("flip", "truncate"):
            work = tmp_path / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(saved, work)
            damage(os.path.join(work, newest, name), how)
            run = run_dir.RunDirectory(str(work), description)
            state, best = run.checkpoints.restore_latest(template)
            if int(state.step) == 2:
                assert identical(state, make_state(config, model, 2)) and best == {"sum": 0.75}
                continue
            assert identical(state, make_state(config, model, 1)) and best == {"sum": 0.5}
            assert os.listdir(work / "checkpoints") == ["1"]
            assert [n.startswith("checkpoint_2_") for n in os.listdir(work / "damaged")] == [True]
            fell_back.add((name, how))
            warning = capfd.readouterr().err
            assert f"skipped training checkpoint {work / 'checkpoints' / '2'} is damaged" in warning
            assert "resuming from an older checkpoint" in warning
    assert some_data_damage_detected(fell_back, os.path.join(saved, newest))
    # Both damaged: an error that says what to do, and nothing moved.
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(saved, work)
    for step in ("1", "2"):
        for name in data_files(os.path.join(saved, "checkpoints", step)):
            damage(os.path.join(work, "checkpoints", step, name), "truncate")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="No intact training checkpoint.*"
                       "Move .* away to train from the start"):
        run_dir.RunDirectory(str(work), description).checkpoints.restore_latest(template)
    assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]


@pytest.mark.slow
def test_training_resumes_past_a_truncated_checkpoint(tmp_path, capfd):
    config = tiny_config(train__stop_after_steps=4, train__checkpoint_every_steps=2)
    assert train.train_and_evaluate(config, str(tmp_path))["stopped_at_step"] == 4
    step_4 = os.path.join(str(tmp_path), "checkpoints", "4")
    for name in data_files(step_4):  # every array file: which one holds what varies by run
        damage(os.path.join(step_4, name), "truncate")
    capfd.readouterr()
    config = tiny_config(train__stop_after_steps=1, train__checkpoint_every_steps=2)
    assert train.train_and_evaluate(config, str(tmp_path))["stopped_at_step"] == 3
    assert "skipped training checkpoint" in capfd.readouterr().err
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_eval_of_a_damaged_best_model_stops_or_falls_back_when_asked(tiny_model, tmp_path):
    config, model = tiny_model
    workdir = tmp_path / "run"
    run = run_dir.RunDirectory(str(workdir), experiment.describe(config))
    run.save_best("best_sum", random_variables(model, 0), {"step": 1, "epoch": 1})
    run.save_best("best_robust", random_variables(model, 1), {"step": 2, "epoch": 2})
    for name in data_files(str(workdir / "best_robust")):
        damage(str(workdir / "best_robust" / name), "flip")
    command = ["--config", "configs/tiny.py", "--config.model.widths=8,8,8,8", "--workdir",
               str(workdir), "--mode", "eval", "--attack", "none", "--num_examples", "20"]
    refused = run_main(*command)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "best_robust is damaged" in refused.stderr and "--allow_fallback" in refused.stderr
    assert not [name for name in os.listdir(workdir) if name.startswith("eval")]
    fallen_back = run_main(*command, "--allow_fallback")
    assert fallen_back.returncode == 0, fallen_back.stderr
    assert "\r" not in fallen_back.stdout  # not a terminal: no progress bar redraws
    assert "best_robust is damaged" in fallen_back.stderr and "Traceback" not in fallen_back.stderr
    report = json.load(open(next(workdir / name for name in os.listdir(workdir)
                                 if name.startswith("eval_") and name.endswith(".json"))))
    assert report["checkpoint"] == str(workdir / "best_sum")


class Cut(Exception):
    """A save cut short by the test's phase hook."""


def cut_at(phase):
    def hook(reached):
        if reached == phase:
            raise Cut(phase)
    return hook


# What a best-model directory's parent holds after a save cut at each phase (apart from
# checkpoints/ and run.json), and the files of the staging folder `best_sum.partial` then.
LEFT_BY_A_CUT = {
    "staging_ready": (["best_sum"], None),
    "arrays_written": (["best_sum", "best_sum.partial"], ["variables"]),
    "checksums_written": (["best_sum", "best_sum.partial"], ["checksums.json", "variables"]),
    "complete": (["best_sum", "best_sum.partial"], ["checksums.json", "model.json", "variables"]),
    "previous_set_aside": (["best_sum.old", "best_sum.partial"],
                           ["checksums.json", "model.json", "variables"]),
    "in_place": (["best_sum", "best_sum.old"], None),
}


@pytest.mark.parametrize("phase", checkpoint.SAVE_PHASES)
def test_a_best_model_save_cut_at_each_phase_leaves_the_last_complete_one(phase, tiny_model,
                                                                          tmp_path, monkeypatch):
    """A save cut after each of its phases (as a kill would: nothing after it runs) leaves the
    last complete model loadable, never the partial one; the next save completes and tidies up.
    From `in_place` on the new model is the last complete one."""
    config, model = tiny_model
    run = run_dir.RunDirectory(str(tmp_path), experiment.describe(config))
    saved = [random_variables(model, seed) for seed in range(3)]
    run.save_best("best_sum", saved[0], {"step": 1})
    monkeypatch.setattr(checkpoint, "save_phase_hook", cut_at(phase))
    with pytest.raises(Cut):
        run.save_best("best_sum", saved[1], {"step": 2})
    monkeypatch.setattr(checkpoint, "save_phase_hook", None)
    names, staged = LEFT_BY_A_CUT[phase]
    assert sorted(set(os.listdir(tmp_path)) - {"checkpoints", "run.json"}) == names
    if staged is not None:
        assert sorted(os.listdir(tmp_path / "best_sum.partial")) == staged
    if staged is not None and "model.json" not in staged:
        with pytest.raises(FileNotFoundError, match="No model checkpoint"):
            loading.load_model(str(tmp_path / "best_sum.partial"))
    last_complete = 2 if phase == "in_place" else 1
    _, variables, info, _ = loading.load_model(str(tmp_path))
    assert info["step"] == last_complete and identical(variables, saved[last_complete - 1])
    run.save_best("best_sum", saved[2], {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["best_sum", "checkpoints", "run.json"]
    _, variables, info, _ = loading.load_model(str(tmp_path))
    assert info["step"] == 3 and identical(variables, saved[2])


CUT_EXIT = 75  # the exit status of a saving process cut at its phase
# A process that saves training checkpoint 3 and exits (os._exit: as `kill -9` would) at one
# phase of that save. The phases are orbax's: `writing` before the first of the checkpoint's
# items (state, best, checksums) is renamed into place inside its temporary folder,
# `written` before the temporary folder is renamed to `3`, `in_place` before the oldest
# checkpoint is pruned, `saved` after the save returned.
CUTTER = r"""
import os, sys
from orbax.checkpoint._src.path import async_path, deleter
from conftest import tiny_config
from fpcm_jax import experiment
from fpcm_jax.runs import run_dir
from test_integrity import CUT_EXIT, make_state

workdir, phase = sys.argv[1], sys.argv[2]
def cut(reached):
    if reached == phase:
        os._exit(CUT_EXIT)

rename, delete_steps = async_path.rename, deleter.StandardCheckpointDeleter.delete_steps
async def cut_rename(source, target, *args, **kwargs):
    cut("written" if target.name == "3" else "writing")
    return await rename(source, target, *args, **kwargs)
def cut_delete_steps(self, steps):
    cut("in_place")
    return delete_steps(self, steps)
async_path.rename, deleter.StandardCheckpointDeleter.delete_steps = cut_rename, cut_delete_steps
config = tiny_config()
model, _ = experiment.build(config)
run = run_dir.RunDirectory(workdir, experiment.describe(config))
run.checkpoints.save(make_state(config, model, 3), {"sum": 3.0})
cut("saved")
"""
TRAINING_PHASES = ("writing", "written", "in_place", "saved")


def checkpoint_steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.slow
def test_a_training_save_cut_at_each_phase_resumes_from_the_last_complete_one(tiny_model,
                                                                              tmp_path):
    """Checkpoints 1 and 2 saved; a process saving 3 is cut at each phase (one process per
    phase, all at once). Each cut is seen on disk; resuming gives exactly the last complete
    checkpoint (2 before the rename into place, 3 after), a temporary folder is never used,
    and the next save completes, leaving the newest two."""
    config, model = tiny_model
    description = experiment.describe(config)
    base = str(tmp_path / "base")
    run = run_dir.RunDirectory(base, description)
    for value in (1, 2):
        run.checkpoints.save(make_state(config, model, value), {"sum": float(value)})
    script = tmp_path / "cutter.py"
    script.write_text(CUTTER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    processes = {}
    for phase in TRAINING_PHASES:
        shutil.copytree(base, tmp_path / phase)
        processes[phase] = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / phase), phase], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for process in processes.values():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == CUT_EXIT, stderr[-3000:]
    temporary = "3.orbax-checkpoint-tmp"
    assert checkpoint_steps(tmp_path / "writing") == ["1", "2", temporary]
    assert not {"best", "checksums", "state"} & set(
        os.listdir(tmp_path / "writing" / "checkpoints" / temporary))  # none renamed yet
    assert checkpoint_steps(tmp_path / "written") == ["1", "2", temporary]
    assert {"best", "checksums", "state"} <= set(
        os.listdir(tmp_path / "written" / "checkpoints" / temporary))
    assert checkpoint_steps(tmp_path / "in_place") == ["1", "2", "3"]
    assert checkpoint_steps(tmp_path / "saved") == ["2", "3"]
    template = make_state(config, model, 0)
    for phase in TRAINING_PHASES:
        run = run_dir.RunDirectory(str(tmp_path / phase), description)
        state, best = run.checkpoints.restore_latest(template)
        last_complete = 2 if phase in ("writing", "written") else 3
        assert int(state.step) == last_complete, phase
        assert identical(state, make_state(config, model, last_complete))
        assert best == {"sum": float(last_complete)}
        run.checkpoints.save(make_state(config, model, last_complete + 1), {"sum": 9.0})
        run = run_dir.RunDirectory(str(tmp_path / phase), description)
        assert checkpoint_steps(tmp_path / phase) == [str(last_complete),
                                                      str(last_complete + 1)], phase
        state, best = run.checkpoints.restore_latest(template)
        assert identical(state, make_state(config, model, last_complete + 1))
