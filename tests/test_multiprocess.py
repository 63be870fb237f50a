"""Several processes and device counts, as users run them: real `main.py` processes.

Two processes on 127.0.0.1 (a local coordinator, 2 fake CPU devices each, gloo collectives)
train, stop on SIGTERM and evaluate like one process with 4 devices; a run saved on 4 devices
is evaluated on 1 and 2 and resumed on 2. Every subprocess is bounded by a timeout.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from conftest import (assert_leaves_close, cpu_env, free_port, needs_four_devices,
                      read_train_state, tiny_config)
from fpcm_jax.data import datasets
from fpcm_jax.runs import checkpoint, loading

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds, per subprocess
# The tiny config, very small; the FFT filter rounds alike for any per-device batch (see
# test_train.test_four_device_step_matches_one_device). The attack is L2, whose steps are
# continuous in the gradient (L-inf's sign() turns rounding into flipped pixels).
TINY = ["--config", "configs/tiny.py", "--config.model.widths=(8,8,8,8)",
        "--config.attack.steps=2", "--config.train.epochs=2", "--config.eval.attack_steps=1",
        "--config.train.final_test_attack_steps=1", "--config.model.fpcm_lowpass=fft",
        "--config.attack.norm=l2", "--config.attack.eps=0.5", "--config.attack.step_size=0.1"]
EARLY_STEP = 3  # where the one- and two-process states are compared (see the test)


def tiny_run_config(**changes):
    """The config that TINY gives on the command line."""
    return tiny_config(model__fpcm_lowpass="fft", attack__norm="l2", attack__eps=0.5,
                       attack__step_size=0.1, **changes)


def start(args, processes=1, devices=4):
    """`processes` main.py processes with `devices` fake CPU devices each."""
    port = free_port()
    started = []
    for index in range(processes):
        extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={index}"] if processes > 1 else [])
        started.append(subprocess.Popen([sys.executable, "main.py", *args, *extra], cwd=REPO,
                                        env=cpu_env(devices), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    return started


def finish(started):
    """[(returncode, stdout, stderr)] once every process has ended (killed after TIMEOUT)."""
    results = []
    for process in started:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in started:
                other.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"a process did not finish within {TIMEOUT} s: {stderr[-2000:]}")
        results.append((process.returncode, stdout, stderr))
    return results


def succeed(started):
    """`finish`, each process having exited with status 0."""
    results = finish(started)
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    return results


def run(args, processes=1, devices=4):
    return succeed(start(args, processes, devices))


def metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny training run by one process with 4 devices (keeping its checkpoints of
    steps 13 and 20) and by two with 2 each, started together; both stopped at EARLY_STEP
    (copies kept as one_early, two_early) and resumed by the same command."""
    base = tmp_path_factory.mktemp("multiprocess")
    one, two = str(base / "one"), str(base / "two")

    def both(*extra):
        succeed(start(TINY + ["--workdir", one, "--config.train.checkpoint_every_steps=13",
                              *extra], processes=1, devices=4) +
                start(TINY + ["--workdir", two, *extra], processes=2, devices=2))

    both(f"--config.train.stop_after_steps={EARLY_STEP}")
    for name in ("one", "two"):
        shutil.copytree(str(base / name), str(base / f"{name}_early"))
    both()
    return {"one": one, "two": two, "base": base, "one_early": str(base / "one_early"),
            "two_early": str(base / "two_early")}


def test_two_processes_train_like_one_process_with_four_devices(runs):
    """Same steps, losses and states as one process with 4 devices.

    The two runs differ only in the order in which the cross-process all-reduce adds the four
    devices' gradients and BatchNorm sums: 1e-7 relative at step 1, which the training then
    amplifies (after 20 steps the states differ by up to 27% in some leaf, whichever the
    attack), so the states are compared at step EARLY_STEP = 3, where rounding is still
    small and one training step is not. Measured (L2 attack, config.seed 0-2, 2-core AMD EPYC,
    2026-12-03), per leaf max|two - one| / max|one| (`leaf_differences`) at step 3:
    parameters 0.022-0.035 (median over leaves 1.5e-5 to 3.0e-5), running statistics
    8.7e-5 to 1.3e-4 (median 3.4e-5 to 4.7e-5). The two-process state at step 3 against the
    one-process state at step 2 (one step behind): parameters 1.04-1.27 (median 0.0013-0.0021),
    statistics 0.29-0.31 (median 0.26); a run whose second process fed the first one's shard
    (seed 0): parameters 0.56 (median 0.0018), statistics 0.023 (median 0.0059), and its loss
    at step 1 is 1.2e-2 off. The bounds (parameters 0.15, median 3e-4; statistics 1e-3,
    median 3e-4) sit 4x to 10x above the same-step figures and 4x or more below both errors.
    Losses, relative: step 1 at most 9.5e-8, step 2 at most 4.8e-6 (bounds 1e-6 and 4e-5),
    all 20 steps at most 1.4e-3 (bound 1.4e-2).
    """
    config = tiny_run_config()
    one, two = read_train_state(runs["one"], config), read_train_state(runs["two"], config)
    assert int(one.step) == int(two.step) == 20
    losses = [np.asarray([line["loss"] for line in metric_lines(w) if "loss" in line])
              for w in (runs["one"], runs["two"])]
    assert len(losses[0]) == len(losses[1]) == 20
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-6)
    np.testing.assert_allclose(losses[1][1], losses[0][1], rtol=4e-5)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1.4e-2)
    early_one = read_train_state(runs["one_early"], config)
    early_two = read_train_state(runs["two_early"], config)
    assert int(early_one.step) == int(early_two.step) == EARLY_STEP
    assert_leaves_close(early_two.params, early_one.params, largest=0.15, median=3e-4)
    assert_leaves_close(early_two.batch_stats, early_one.batch_stats, largest=1e-3,
                        median=3e-4)
    for name in ("best_sum", "best_robust"):
        assert os.path.exists(os.path.join(runs["two"], name, checkpoint.MODEL_INFO_FILE))


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(runs):
    parts = str(runs["base"] / "parts")
    started = start(TINY + ["--workdir", parts], processes=2, devices=2)
    metrics = os.path.join(parts, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        assert all(p.poll() is None for p in started), finish(started)
        assert time.time() < deadline, "no training progress"
        time.sleep(0.05)
    started[1].send_signal(signal.SIGTERM)  # not the process that writes the logs
    results = finish(started)
    assert [code for code, _, _ in results] == [143, 143], [r[2][-2000:] for r in results]
    assert "Stopped at step" in results[0][1]
    saved = [int(name) for name in os.listdir(os.path.join(parts, "checkpoints"))
             if name.isdigit()]
    assert len(saved) == 1 and 2 <= saved[0] < 20, saved
    assert not os.path.exists(os.path.join(parts, "summary.json"))

    run(TINY + ["--workdir", parts], processes=2, devices=2)
    config = tiny_run_config()
    whole, resumed = read_train_state(runs["two"], config), read_train_state(parts, config)
    chex.assert_trees_all_close(resumed.params, whole.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(resumed.batch_stats, whole.batch_stats, rtol=1e-6, atol=1e-7)
    assert [line["step"] for line in metric_lines(parts) if "loss" in line] == list(range(1, 21))
    with open(os.path.join(parts, "summary.json")) as a, \
            open(os.path.join(runs["two"], "summary.json")) as b:
        assert json.load(a)["test_clean_acc"] == json.load(b)["test_clean_acc"]


def test_eval_over_two_processes_reports_what_one_process_does(runs):
    started, reports = [], {}
    for name, processes, devices in (("eval_one", 1, 4), ("eval_two", 2, 2)):  # together
        args = TINY + ["--workdir", str(runs["base"] / name), "--mode", "eval", "--checkpoint",
                       runs["one"], "--attack", "none,pgd3,apgd-ce", "--num_examples", "40",
                       "--batch_size", "8"]
        started += start(args, processes, devices)
    succeed(started)
    for name in ("eval_one", "eval_two"):
        workdir = str(runs["base"] / name)
        [path] = [f for f in os.listdir(workdir) if f.startswith("eval_")]
        with open(os.path.join(workdir, path)) as handle:
            reports[name] = json.load(handle)
    one, two = reports["eval_one"], reports["eval_two"]
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["examples"] == two["examples"] == 40
    for attack in ("none", "pgd3", "apgd-ce"):
        for figure in ("clean_acc", "robust_acc"):
            assert two["attacks"][attack][figure] == one["attacks"][attack][figure], attack
    assert one["attacks"]["apgd-ce"]["robust_acc"] < one["attacks"]["none"]["robust_acc"]


LOGITS_SCRIPT = """
import sys, numpy as np
from fpcm_jax import parallel
from fpcm_jax.data import datasets
from fpcm_jax.runs import checkpoint, loading
parallel.setup()
import jax
model, variables, info, path = loading.load_model(sys.argv[1])
_, _, test = datasets.load("digits", validation_size=100)
logits = model.apply(variables, datasets.to_float(test.images[:16]), train=False, progress=1.0)
np.save(sys.argv[2], np.asarray(logits))
print(jax.device_count(), path)
"""


@needs_four_devices
def test_checkpoint_saved_on_four_devices_loads_on_one_and_two(runs, tmp_path):
    saved_on_four = runs["one"]
    model, variables, _, path = loading.load_model(saved_on_four)
    assert path.endswith("best_robust")
    _, _, test = datasets.load("digits", validation_size=100)
    expected = np.asarray(model.apply(variables, datasets.to_float(test.images[:16]), train=False))
    for devices in (1, 2):
        out = str(tmp_path / f"logits_{devices}.npy")
        done = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, saved_on_four, out],
                              cwd=REPO, env=cpu_env(devices), capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[0] == str(devices)
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)
    eval_dir = str(tmp_path / "eval")
    run(["--config", "configs/tiny.py", "--workdir", eval_dir, "--mode", "eval",
         "--checkpoint", saved_on_four, "--attack", "none", "--batch_size", "99"], devices=1)
    [report] = [f for f in os.listdir(eval_dir) if f.startswith("eval_")]
    with open(os.path.join(eval_dir, report)) as handle:
        clean = json.load(handle)["attacks"]["none"]["clean_acc"]
    direct = np.mean(np.asarray(model.apply(variables, datasets.to_float(test.images),
                                            train=False)).argmax(1) == test.labels)
    assert clean == pytest.approx(direct, abs=1e-9)


def test_resume_on_two_devices_continues_a_four_device_run(runs, tmp_path):
    """The 4-device run of `runs` as if stopped after step 13 (its newer checkpoint removed),
    resumed on 2 devices. Its first step has the loss of step 14 of the uninterrupted run up to
    rounding (a state restored wrongly would not); after that the runs diverge as two device
    counts do. Per leaf max|resumed - whole| / max|whole| with the L-inf attack (config.seed
    0-2, another machine): parameters at most 0.0016, 0.00013, 0.00082, running statistics
    0.00026, 0.00001, 0.00017; with TINY's L2 attack (seed 0, AMD EPYC, 2026-12-03): 0.0024
    and 0.00041. The bounds are 8x and 25x the largest, and the state that was not resumed
    (step 13) is 0.58-0.67 and 0.78-0.85 away.
    """
    parts = str(tmp_path / "parts")
    shutil.copytree(runs["one"], parts)
    shutil.rmtree(os.path.join(parts, "checkpoints", "20"))
    os.remove(os.path.join(parts, "summary.json"))
    config = tiny_run_config()
    assert int(read_train_state(parts, config).step) == 13
    run(TINY + ["--workdir", parts], devices=2)
    whole, resumed = read_train_state(runs["one"], config), read_train_state(parts, config)
    assert int(resumed.step) == 20
    losses = {line["step"]: line["loss"] for line in metric_lines(parts) if "loss" in line}
    expected = {line["step"]: line["loss"] for line in metric_lines(runs["one"]) if "loss" in line}
    assert sorted(losses) == list(range(1, 21))
    np.testing.assert_allclose(losses[14], expected[14], rtol=1e-5)
    assert_leaves_close(resumed.params, whole.params, largest=0.02)
    assert_leaves_close(resumed.batch_stats, whole.batch_stats, largest=0.01)


def test_eval_with_a_contradicting_model_flag_names_the_field(runs):
    contradicting = subprocess.run(
        [sys.executable, "main.py", *TINY, "--workdir", str(runs["base"] / "contradict"),
         "--mode", "eval", "--checkpoint", runs["one"], "--attack", "none",
         "--config.model.cutoff_end=0.25"],
        cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert contradicting.returncode == 1
    assert "--config.model.cutoff_end=0.25 contradicts" in contradicting.stderr
    assert "cutoff_end=0.125" in contradicting.stderr and "Traceback" not in contradicting.stderr
    assert not os.path.exists(runs["base"] / "contradict")


IMPORT_SCRIPT = """
import importlib, pkgutil
import main, fpcm_jax
for module in pkgutil.walk_packages(fpcm_jax.__path__, "fpcm_jax."):
    importlib.import_module(module.name)  # every module of the library
from jax._src import xla_bridge
print(xla_bridge.backends_are_initialized())
"""


def test_importing_fpcm_jax_starts_no_backend():
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], cwd=REPO, env=cpu_env(1),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_distributed_settings_come_from_flags_then_environment(monkeypatch):
    from fpcm_jax import parallel

    for name in parallel.DISTRIBUTED_ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert parallel.distributed_settings() is None
    assert parallel.distributed_settings(num_processes=1) is None
    assert parallel.distributed_settings(auto_detect=True) == {}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.distributed_settings(process_id=2) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(parallel.SetupError, match="JAX_NUM_PROCESSES"):
        parallel.distributed_settings()


def test_setup_after_the_backend_started_is_a_clear_error():
    from fpcm_jax import parallel

    import jax

    jax.devices()  # this test process has started its backend
    with pytest.raises(parallel.SetupError, match="before any jax.devices"):
        parallel.setup(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)

