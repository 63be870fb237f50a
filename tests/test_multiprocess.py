"""Several processes and device counts, as users run them: real `main.py` processes.

Two processes on 127.0.0.1 (a local coordinator, 2 fake CPU devices each, gloo collectives)
train, stop on SIGTERM and evaluate like one process with 4 devices; a run saved on 4 devices
is evaluated on 1 and 2 and resumed on 2. Every subprocess is bounded by a timeout.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from conftest import assert_leaves_close, needs_four_devices, read_train_state, tiny_config
from fpcm_jax import checkpoint, data, loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds, per subprocess
# The tiny config, very small; the FFT filter rounds alike for any per-device batch (see
# test_train.test_four_device_step_matches_one_device).
TINY = ["--config", "configs/tiny.py", "--config.model.widths=(8,8,8,8)",
        "--config.attack.steps=2", "--config.train.epochs=2", "--config.eval.attack_steps=1",
        "--config.train.final_test_attack_steps=1", "--config.model.fpcm_lowpass=fft"]


def tiny_run_config(**changes):
    """The config that TINY gives on the command line."""
    return tiny_config(model__fpcm_lowpass="fft", **changes)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = [flag for flag in env.get("XLA_FLAGS", "").split() if "device_count" not in flag]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


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
    steps 13 and 20) and by two with 2 each, started together."""
    base = tmp_path_factory.mktemp("multiprocess")
    one, two = str(base / "one"), str(base / "two")
    succeed(start(TINY + ["--workdir", one, "--config.train.checkpoint_every_steps=13"],
                  processes=1, devices=4) +
            start(TINY + ["--workdir", two], processes=2, devices=2))
    return {"one": one, "two": two, "base": base}


def test_two_processes_train_like_one_process_with_four_devices(runs):
    """Same steps, losses and parameters as one process with 4 devices.

    The two runs differ only in the order in which the cross-process all-reduce adds the four
    devices' gradients and BatchNorm sums: 1e-7 relative at step 1, which PGD's sign() turns
    into diverging trajectories. Measured over config.seed 0-3 (this 2-core machine):
    relative loss difference at step 1 at most 8.8e-8, at step 2 at most 4.0e-6, over all 20
    steps at most 1.4e-3; the loss bounds are 10x those: a process reading other data, or a
    missing reduction, shows at step 1. Final state, per leaf max|two - one| / max|one|
    (`leaf_differences`), config.seed 0-2: parameters at most 0.20, 0.26, 0.28 (median over
    leaves 0.0051, 0.0043, 0.0084), running statistics at most 0.058, 0.064, 0.17 (median
    0.024, 0.021, 0.048). The same run's state at step 13 (training cut short) is 0.58-0.67
    (median 0.095-0.13) and 0.78-0.85 (median 0.36-0.42) away, a run whose second process
    fed the first one's shard (seed 0) 0.62 (median 0.050): the median bounds (3x the
    measured) refuse both, the per-leaf ones (2x) catch gross errors.
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
    assert_leaves_close(two.params, one.params, largest=0.6, median=0.03)
    assert_leaves_close(two.batch_stats, one.batch_stats, largest=0.6, median=0.15)
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
from fpcm_jax import checkpoint, data, loading, parallel
parallel.setup()
import jax
model, variables, info, path = loading.load_model(sys.argv[1])
_, _, test = data.load("digits", validation_size=100)
logits = model.apply(variables, data.to_float(test.images[:16]), train=False, progress=1.0)
np.save(sys.argv[2], np.asarray(logits))
print(jax.device_count(), path)
"""


@needs_four_devices
def test_checkpoint_saved_on_four_devices_loads_on_one_and_two(runs, tmp_path):
    saved_on_four = runs["one"]
    model, variables, _, path = loading.load_model(saved_on_four)
    assert path.endswith("best_robust")
    _, _, test = data.load("digits", validation_size=100)
    expected = np.asarray(model.apply(variables, data.to_float(test.images[:16]), train=False))
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
    direct = np.mean(np.asarray(model.apply(variables, data.to_float(test.images),
                                            train=False)).argmax(1) == test.labels)
    assert clean == pytest.approx(direct, abs=1e-9)


def test_resume_on_two_devices_continues_a_four_device_run(runs, tmp_path):
    """The 4-device run of `runs` as if stopped after step 13 (its newer checkpoint removed),
    resumed on 2 devices. Its first step has the loss of step 14 of the uninterrupted run up to
    rounding (a state restored wrongly would not); after that the runs diverge as two device
    counts do. Per leaf max|resumed - whole| / max|whole| (config.seed 0-2): parameters at
    most 0.0016, 0.00013, 0.00082, running statistics 0.00026, 0.00001, 0.00017; the bounds
    are 12x and 39x those, and the state that was not resumed (step 13) is 0.58-0.67 and
    0.78-0.85 away.
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

