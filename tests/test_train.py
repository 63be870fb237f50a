"""Training: sharded vs single device, no retracing, resume, schedules, losses, errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import assert_leaves_close, needs_four_devices, read_train_state, tiny_config
from fpcm_jax import experiment, parallel
from fpcm_jax.training import checks as training_checks
from fpcm_jax.data import datasets
from fpcm_jax.training import losses, train, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, (size,)).astype(np.int32)}


def build_step(config, steps_per_epoch, mesh, trace_limit=None):
    model, spec = experiment.build(config)
    tx, learning_rate = train_step.make_optimizer(config.train, steps_per_epoch)
    step = train_step.make_train_step(model, tx, learning_rate, config, steps_per_epoch)
    if trace_limit:
        step = chex.assert_max_traces(step, n=trace_limit)
    state = train_step.create_state(model, tx, jax.random.key(0), spec.image_size,
                                    ema=config.train.ema_decay > 0)
    state = jax.device_put(state, parallel.replicated(mesh))
    return train_step.jit_train_step(step, mesh), state


def run_steps(config, mesh, num_steps, steps_per_epoch=2, trace_limit=None):
    step_fn, state = build_step(config, steps_per_epoch, mesh, trace_limit)
    sharded = parallel.batch_sharded(mesh)
    metrics = []
    for i in range(num_steps):
        batch = {k: parallel.global_array(v, sharded) for k, v in random_batch(seed=i).items()}
        state, m = step_fn(state, batch, jax.random.key(7))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.mark.slow
@needs_four_devices
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_four_device_step_matches_one_device(bn_mode):
    """Two PGD-AT steps on 4 devices equal them on 1 device.

    With BN mode "eval" the attack sees fixed statistics and the runs agree to rounding (largest
    relative leaf difference 1.3e-6 to 1.8e-6 over init keys 0-3). In mode "train" every attack
    step takes batch statistics, reduced in another order on 4 devices, and PGD's sign() turns
    some 1e-7 differences into flipped pixels: over init keys 0-7 the largest relative leaf
    difference (max|a-b| / max|b|) was 1.5e-6 to 0.19, the median over leaves up to 1.2e-4,
    running statistics up to 1.1e-3, the loss up to 1.3e-4 relative. Another attack key (what
    a wrong split of keys or batches across devices resembles) gives at least 1.39, 1.7e-3,
    6.6e-2 and 9.9e-4: the bounds below lie between the two.
    """
    # The FFT filter rounds the same whatever the per-device batch; the circulant matmul's
    # blocking does not.
    config = tiny_config(attack__bn_mode=bn_mode, model__fpcm_lowpass="fft")
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    state_4, metrics_4 = run_steps(config, parallel.make_mesh(), 2)
    state_1, metrics_1 = run_steps(config, one, 2)
    if bn_mode == "eval":
        chex.assert_trees_all_close(state_4.params, state_1.params, rtol=2e-4, atol=2e-5)
        chex.assert_trees_all_close(state_4.batch_stats, state_1.batch_stats, rtol=2e-4,
                                    atol=2e-5)
        np.testing.assert_allclose(metrics_4[-1]["loss"], metrics_1[-1]["loss"], rtol=1e-4)
        return
    assert_leaves_close(state_4.params, state_1.params, largest=0.6, median=5e-4)
    assert_leaves_close(state_4.batch_stats, state_1.batch_stats, largest=1e-2)
    np.testing.assert_allclose(metrics_4[-1]["loss"], metrics_1[-1]["loss"], rtol=4e-4)


def test_no_retrace_across_steps_epochs_and_cutoffs():
    config = tiny_config(train__epochs=3)
    _, metrics = run_steps(config, parallel.make_mesh(), 6, steps_per_epoch=2, trace_limit=1)
    progress = [m["cutoff_progress"] for m in metrics]
    np.testing.assert_allclose(progress, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0], rtol=1e-6)
    assert len({float(m["lr"]) for m in metrics}) == 3  # warm-up moves the LR every epoch


def official_lr_factor(epoch, total, kind, warmup=5):
    """SPEC section 2, written out directly."""
    if epoch < warmup:
        return 0.1 + 0.9 * epoch / warmup
    if kind == "multistep":
        return 1.0 if epoch < int(0.7 * total) else 0.1 if epoch < int(0.9 * total) else 0.01
    return (0.0001 + 0.5 * (0.01 - 0.0001) * (1 + math.cos((epoch - warmup) / (total - warmup)
                                                           * math.pi))) / 0.01


@pytest.mark.parametrize("kind", ["multistep", "cosine"])
@pytest.mark.parametrize("total", [120, 60, 7])
def test_lr_schedule_matches_official(kind, total):
    for epoch in range(total):
        np.testing.assert_allclose(train_step.lr_factor(epoch, total, 5, kind),
                                   official_lr_factor(epoch, total, kind), rtol=1e-5,
                                   err_msg=epoch)


def test_optimizer_is_pytorch_sgd_and_schedule_per_epoch():
    config = tiny_config(train__lr=0.1, train__weight_decay=0.01, train__warmup_epochs=2,
                         train__epochs=20)
    tx, learning_rate = train_step.make_optimizer(config.train, steps_per_epoch=3)
    assert [float(learning_rate(s)) for s in (0, 2, 3, 6)] == pytest.approx(
        [0.01, 0.01, 0.055, 0.1])
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    state = tx.init(params)
    buffer = np.zeros(2)
    p = np.array([1.0, -2.0])
    for step in range(3):  # PyTorch: g += wd*p; buf = 0.9 buf + g; p -= lr * buf
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, updates)
        buffer = 0.9 * buffer + (np.array([0.5, 0.25]) + 0.01 * p)
        p = p - float(learning_rate(step)) * buffer
        np.testing.assert_allclose(params["w"], p, rtol=1e-6)


def test_cutoff_progress_counts_official_epochs_from_one():
    assert float(train_step.cutoff_progress(0, 10, 120, "epoch")) == pytest.approx(1 / 120)
    assert float(train_step.cutoff_progress(1199, 10, 120, "epoch")) == pytest.approx(1.0)
    assert float(train_step.cutoff_progress(5, 10, 2, "step")) == pytest.approx(6 / 20)


def numpy_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_trades_and_mart_match_direct_formulas():
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    labels = np.array([0, 1, 2, 3, 4, 0])
    p, q = numpy_softmax(clean), numpy_softmax(adv)
    ce = lambda probs: -np.mean(np.log(probs[np.arange(6), labels]))
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=1)
    np.testing.assert_allclose(losses.trades(clean, adv, labels, 6.0), ce(p) + 6.0 * kl.mean(),
                               rtol=1e-5)
    order = np.argsort(q, axis=1)
    wrong = np.where(order[:, -1] == labels, order[:, -2], order[:, -1])
    margin = -np.log(1.0001 - q[np.arange(6), wrong] + 1e-12)
    kl_mart = np.sum(p * (np.log(p) - np.log(q + 1e-12)), axis=1)
    expected = ce(q) + margin.mean() + 6.0 * np.mean(kl_mart * (1.0000001 - p[np.arange(6), labels]))
    np.testing.assert_allclose(losses.mart(clean, adv, labels, 6.0), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.adversarial_loss("ce", clean, adv, labels, 6.0), ce(q),
                               rtol=1e-5)


def test_tfds_read_path_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=30):
        train_split, val_split, test_split = datasets.load("cifar100", str(tmp_path),
                                                       validation_size=6)
    assert train_split.images.shape == (24, 32, 32, 3) and train_split.images.dtype == np.uint8
    assert len(val_split) == 6 and len(test_split) == 30 and train_split.labels.max() < 100


def test_digits_are_real_small_data():
    train_split, val_split, test_split = datasets.load("digits", validation_size=100)
    assert (len(train_split), len(val_split), len(test_split)) == (1400, 100, 297)
    assert train_split.images.shape[1:] == (32, 32, 3) and set(train_split.labels) == set(range(10))


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    config = tiny_config()
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    stopped = train.train_and_evaluate(  # checkpoints only when it stops (0: at epoch ends)
        tiny_config(train__stop_after_steps=13, train__checkpoint_every_steps=0),
        str(tmp_path / "parts"))
    assert stopped == {"stopped_at_step": 13, "reason": "train.stop_after_steps"}
    resumed = train.train_and_evaluate(config, str(tmp_path / "parts"))
    assert resumed["final_step"] == whole["final_step"] == 20
    state_whole = read_train_state(str(tmp_path / "whole"), config)
    state_parts = read_train_state(str(tmp_path / "parts"), config)
    chex.assert_trees_all_close(state_whole.params, state_parts.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state_whole.batch_stats, state_parts.batch_stats, rtol=1e-6)
    assert resumed["test_clean_acc"] == whole["test_clean_acc"]
    lines = [json.loads(l) for l in open(tmp_path / "parts" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 21))
    for name in ("best_sum", "best_robust"):
        assert os.path.exists(tmp_path / "parts" / name / "model.json")


def test_workdir_of_another_model_is_refused(tmp_path):
    train.train_and_evaluate(tiny_config(train__stop_after_steps=1), str(tmp_path))
    with pytest.raises(ValueError, match="another model.*fpcm"):
        train.train_and_evaluate(tiny_config(model__fpcm=False), str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(train__lr=1e30, train__checkpoint_every_steps=1, train__warmup_epochs=0)
    with pytest.raises(train.TrainingError, match="Loss became .* at step"):
        train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert steps and steps[-1] >= 1
    state = read_train_state(str(tmp_path), config)
    assert int(state.step) == steps[-1]


def run_main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_cli_errors_are_one_line(tmp_path):
    unknown = run_main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
                       "--config.train.learning_rate=0.1")
    assert unknown.returncode == 2 and "unknown config key 'learning_rate'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = run_main("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert missing.returncode == 2 and "configs/nope.py" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_value = run_main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
                         "--config.train.loss=hinge")
    assert bad_value.returncode == 1 and "train.loss" in bad_value.stderr
    assert "Traceback" not in bad_value.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir",
               str(tmp_path), "--config.model.widths=(8,8,8,8)", "--config.attack.steps=2",
               "--config.train.epochs=50"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "Stopped at step" in stdout and "run the same command to resume" in stdout
    assert "\r" not in stdout  # not a terminal: no progress bar redraws in the log
    saved = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert 1 <= len(saved) <= 2 and 2 <= saved[-1] < 500  # the newest two are kept
    assert not (tmp_path / "summary.json").exists()


def test_default_xla_flags_respect_the_users_setting(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    parallel.set_default_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                               *parallel.DEFAULT_XLA_FLAGS]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    parallel.set_default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("FPCM_JAX_DEFAULT_XLA_FLAGS", "0")
    parallel.set_default_xla_flags()
    assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("section, name, value, message", [
    ("attack", "eps", -0.03, "attack.eps=-0.03 must lie in \\(0, 1\\] for the linf norm"),
    ("attack", "steps", -1, "attack.steps=-1 must be an integer >= 0"),
    ("train", "checkpoint_every_steps", -5, "checkpoint_every_steps=-5"),
    ("train", "batch_size", 0, "train.batch_size=0 must be positive"),
    ("train", "batch_size", 6, "multiple of the 4 devices"),
    ("model", "name", "wrn-16-2", "model.widths applies to the ResNets only"),
    ("model", "widths", (16, 32), "four positive integers"),
    ("model", "name", "vgg16", "is not a model; valid names"),
    ("model", "cutoff_end", 0.0, "cutoff_end=0.0 must lie in \\(0, 1\\]"),
    ("train", "momentum", 1.5, "train.momentum=1.5 must lie in"),
    ("train", "weight_decay", -1e-4, "weight_decay=-0.0001 must lie in"),
    ("train", "batch_size", 4096, "exceeds the 1400 training images"),
])
def test_invalid_options_stop_before_the_workdir_is_touched(tmp_path, section, name, value,
                                                            message):
    """As main.py runs it: the checks, then training (which checks what needs the data)."""
    config = tiny_config(**{f"{section}__{name}": value})
    with pytest.raises(ValueError, match=message):
        training_checks.check_training(config)
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def read_events(directory):
    """(scalars {tag: [(step, value)]}, histogram tags) from tensorboardX event files."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars, histograms = {}, set()
    for name in sorted(os.listdir(directory)):
        content = open(os.path.join(directory, name), "rb").read()
        offset = 0
        while offset < len(content):
            (length,) = struct.unpack("<Q", content[offset:offset + 8])
            event = event_pb2.Event.FromString(content[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms.add(value.tag)
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, histograms


def test_tensorboard_events_and_curves_hold_the_logged_values(trained_tiny_run):
    workdir, _ = trained_tiny_run
    scalars, histograms = read_events(workdir / "tensorboard")
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [line for line in lines if "loss" in line]
    for name in ("loss", "clean_acc", "adv_acc", "lr", "cutoff_progress"):
        logged = scalars[f"train/{name}"]
        assert [step for step, _ in logged] == [line["step"] for line in steps]
        np.testing.assert_allclose([value for _, value in logged],
                                   [line[name] for line in steps], rtol=1e-6)
    [validation] = [line for line in lines if "val_clean_acc" in line]
    assert scalars["validation/robust_acc"] == [(validation["step"],
                                                 pytest.approx(validation["val_robust_acc"]))]
    summary = json.load(open(workdir / "summary.json"))
    assert scalars["test/clean_acc"][0][1] == pytest.approx(summary["test_clean_acc"])
    assert "train/images_per_second" in scalars
    assert histograms == {f"alpha/attn{i}" for i in range(1, 5)}
    assert os.path.getsize(workdir / "curves.png") > 1000
