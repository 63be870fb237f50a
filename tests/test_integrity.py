"""Fault injection: damaged checkpoints are never loaded silently, and a process killed while
saving leaves something the next run resumes from.

Every file of each kind of checkpoint (training, best, converted) gets 64 bytes flipped in its
middle, or is cut to half its length. The load must then either stop with the one-line
`DamagedCheckpoint` error naming the checkpoint, or (the damage fell on bytes never read, such
as orbax's timestamps) give arrays bit-identical to those saved: never anything else.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax import checkpoint, convert, experiment, loading, models, run_dir, train, train_step

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
    template = models.variables_template(model)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), template)


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
        checkpoint.save_variables(saved, variables, info)  # as `python -m fpcm_jax.convert`
    assert identical(loading.load_model(saved)[1], variables)
    detected = check_every_file(saved, lambda path: loading.load_model(path)[1], variables,
                                tmp_path)
    assert some_data_damage_detected(detected, saved)
    assert {("model.json", "flip"), ("checksums.json", "truncate")} <= detected


def test_arrays_swapped_under_their_checksums_are_caught(tiny_model, tmp_path):
    config, model = tiny_model
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    checkpoint.save_variables(first, random_variables(model, 0), experiment.describe(config))
    checkpoint.save_variables(second, random_variables(model, 1), experiment.describe(config))
    shutil.rmtree(os.path.join(first, "variables"))
    shutil.copytree(os.path.join(second, "variables"), os.path.join(first, "variables"))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="does not match the checksum"):
        loading.load_model(first)


def make_state(config, model, value):
    """A train state of step `value` whose arrays are random numbers drawn from seed `value`."""
    tx, _ = train_step.make_optimizer(config.train, 10)
    state = train_step.create_state(model, tx, jax.random.key(0), 32)
    rng = np.random.default_rng(value)
    state = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), state)
    return state.replace(step=np.asarray(value, np.int32))


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


SAVER = r"""
import sys
sys.path.insert(0, "tests")
import numpy as np
from conftest import tiny_config
from fpcm_jax import checkpoint, experiment, parallel, run_dir
from test_integrity import make_state
parallel.setup()
config = tiny_config()
model, _ = experiment.build(config)
run = run_dir.RunDirectory(sys.argv[1], experiment.describe(config))
template = make_state(config, model, 0)
state, best = run.checkpoints.restore_latest(template)
start = int(state.step)
print("resumed", start, flush=True)
for value in range(start + 1, start + 10_000):
    run.checkpoints.save(make_state(config, model, value), {"sum": float(value)})
    variables = make_state(config, model, value)
    run.save_best("best_sum", {"params": variables.params, "batch_stats": variables.batch_stats},
                  {"step": value})
    print("saved", value, flush=True)
"""


def test_killed_while_saving_the_next_run_resumes_from_an_intact_checkpoint(tiny_model,
                                                                            tmp_path):
    """SIGKILL at several moments after a save completed: on the 2-core development machine,
    delays of 41, 60 and 77 ms left an orbax `N.orbax-checkpoint-tmp` behind, 130 ms a
    `best_sum.partial` (the moments vary with the machine; the assertions hold at any). After
    each kill, the next process resumes from the last completed save, intact, or from one
    newer that completed too."""
    config, model = tiny_model
    workdir = str(tmp_path / "run")
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    last_saved = 0
    for round_index, delay in enumerate([0.0, 0.041, 0.06, 0.077, 0.13]):
        process = subprocess.Popen([sys.executable, str(script), workdir], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().split() == ["resumed", str(last_saved)]
            for _ in range(2 + round_index % 2):
                words = process.stdout.readline().split()
                assert words[0] == "saved", (words, process.stderr.read())
                last_saved = int(words[1])
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            process.kill()
        run = run_dir.RunDirectory(workdir, experiment.describe(config))
        state, best = run.checkpoints.restore_latest(make_state(config, model, 0))
        restored = int(state.step)
        assert restored in (last_saved, last_saved + 1)
        assert identical(state, make_state(config, model, restored))
        assert best == {"sum": float(restored)}
        _, variables, info, _ = loading.load_model(workdir)
        assert info["step"] in (last_saved, last_saved + 1)
        assert identical(variables["params"], make_state(config, model, info["step"]).params)
        last_saved = restored


def test_a_best_model_swap_cut_between_its_renames_is_recovered(tiny_model, tmp_path):
    config, model = tiny_model
    run = run_dir.RunDirectory(str(tmp_path), experiment.describe(config))
    first, second = random_variables(model, 0), random_variables(model, 1)
    run.save_best("best_sum", first, {"step": 1})
    os.replace(tmp_path / "best_sum", tmp_path / "best_sum.old")  # killed between the renames
    assert identical(loading.load_model(str(tmp_path))[1], first)
    run.save_best("best_sum", second, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["best_sum", "checkpoints", "run.json"]
    assert identical(loading.load_model(str(tmp_path))[1], second)
