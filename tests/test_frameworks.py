"""The paper's training frameworks: AWP, EMA, label smoothing, Nesterov momentum and extra data,
each checked against a direct computation of its definition."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_leaves_close, needs_four_devices, read_train_state, tiny_config
from fpcm_jax import experiment, parallel
from fpcm_jax.training import checks as training_checks
from fpcm_jax.data import datasets
from fpcm_jax.training import losses, train, train_step


def one_step_setup(config, ema=False):
    model, spec = experiment.build(config)
    tx, learning_rate = train_step.make_optimizer(config.train, 10)
    state = train_step.create_state(model, tx, jax.random.key(0), spec.image_size, ema=ema)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    step = jax.jit(train_step.make_train_step(model, tx, learning_rate, config, 10))
    return model, state, {"images": images, "labels": labels}, step


def plain_config(**changes):
    """No augmentation and no attack, so a step's input is the batch itself."""
    return tiny_config(data__crop_padding=0, data__flip=False, attack__steps=0,
                       train__warmup_epochs=0, **changes)


@pytest.mark.slow
def test_awp_step_is_the_official_procedure():
    """Proxy: one SGD step (lr 0.01) up the loss; each kernel moved by gamma * ||w|| along it;
    the gradient at the perturbed weights; SGD (momentum, weight decay) from the perturbed
    weights, then the perturbation removed."""
    gamma, config = 0.01, plain_config(train__awp_gamma=0.01, train__weight_decay=5e-4)
    model, state, batch, step = one_step_setup(config)
    x, y = batch["images"].astype(np.float32) / 255, batch["labels"]
    progress = train_step.cutoff_progress(0, 10, config.train.epochs, "epoch")

    def loss_at(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                train=True, progress=progress, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params = state.params
    grads = jax.grad(loss_at)(params)
    flat_w = {jax.tree_util.keystr(p): w for p, w in jax.tree_util.tree_leaves_with_path(params)}
    flat_g = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    perturbation = {}
    for name, weight in flat_w.items():
        if name.endswith("['kernel']"):
            diff = 0.01 * flat_g[name]
            perturbation[name] = gamma * jnp.linalg.norm(weight) / (jnp.linalg.norm(diff) + 1e-20) * diff
            np.testing.assert_allclose(jnp.linalg.norm(perturbation[name]),
                                       gamma * jnp.linalg.norm(weight), rtol=1e-5)
        else:
            perturbation[name] = jnp.zeros_like(weight)
    assert sum(name.endswith("['kernel']") for name in flat_w) >= 10  # convs, FPCM, linear
    perturbed = jax.tree_util.tree_map_with_path(
        lambda p, w: w + perturbation[jax.tree_util.keystr(p)], params)
    grads_there = jax.grad(loss_at)(perturbed)
    lr = config.train.lr  # epoch 0 without warm-up: the full rate
    expected = jax.tree.map(lambda w, wp, g: w - lr * (g + config.train.weight_decay * wp),
                            params, perturbed, grads_there)
    new_state, _ = step(state, batch, jax.random.key(1))
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    ours = train_step.awp_perturbation(params, grads, gamma)
    chex.assert_trees_all_close(ours, jax.tree_util.tree_map_with_path(
        lambda p, _: perturbation[jax.tree_util.keystr(p)], params), rtol=1e-6, atol=1e-9)


def test_awp_waits_for_its_warm_up_epochs():
    plain_model, plain_state, batch, plain_step = one_step_setup(plain_config())
    _, state, _, awp_step = one_step_setup(plain_config(train__awp_gamma=0.01,
                                                        train__awp_warmup_epochs=1))
    without, _ = plain_step(plain_state, batch, jax.random.key(1))
    warming, _ = awp_step(state, batch, jax.random.key(1))
    chex.assert_trees_all_equal(warming.params, without.params)  # epoch 0 < 1: no AWP
    later = state.replace(step=jnp.asarray(10, jnp.int32))  # epoch 1 (10 steps per epoch)
    with_awp, _ = awp_step(later, batch, jax.random.key(1))
    plain_later, _ = plain_step(plain_state.replace(step=jnp.asarray(10, jnp.int32)), batch,
                                jax.random.key(1))
    assert not np.allclose(with_awp.params["linear"]["kernel"],
                           plain_later.params["linear"]["kernel"])


@pytest.mark.parametrize("stats_mode", ["copy", "average"])
def test_ema_is_the_authors_recurrence(stats_mode):
    """decay_t = 0 for the first 2.5% of the updates (here: 2 of 80), then
    min(tau, (1 + d) / (10 + d)), d = t - 2 (DM-Improves-AT's ema_update); BatchNorm statistics
    copied from the model, or averaged with the same decay."""
    tau = 0.3
    config = plain_config(train__ema_decay=tau, train__ema_batch_stats=stats_mode,
                          train__epochs=8)  # 8 epochs x 10 steps: warm-up 0.025 x 80 = 2
    _, state, batch, step = one_step_setup(config, ema=True)
    expected_params, expected_stats = state.params, state.batch_stats
    for update in range(1, 6):
        state, _ = step(state, batch, jax.random.key(update))
        since = update - 2
        decay = 0.0 if since < 0 else min(tau, (1 + since) / (10 + since))
        average = lambda old, new: jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                                old, new)
        expected_params = average(expected_params, state.params)
        expected_stats = (average(expected_stats, state.batch_stats) if stats_mode == "average"
                          else state.batch_stats)
        chex.assert_trees_all_close(state.ema_params, expected_params, rtol=1e-6, atol=1e-8)
        chex.assert_trees_all_close(state.ema_batch_stats, expected_stats, rtol=1e-6,
                                    atol=1e-8)
    assert not np.allclose(state.ema_params["linear"]["kernel"], state.params["linear"]["kernel"])
    assert state.eval_variables(True)["params"] is state.ema_params
    assert state.eval_variables(False)["params"] is state.params


@pytest.mark.slow
def test_ema_survives_stop_and_resume_and_is_what_is_evaluated(tmp_path):
    options = dict(train__ema_decay=0.8, train__ema_warmup_fraction=0.2, train__epochs=1,
                   train__awp_gamma=0.01)
    config = tiny_config(**options)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    stopped = tiny_config(**options, train__stop_after_steps=4, train__checkpoint_every_steps=0)
    train.train_and_evaluate(stopped, str(tmp_path / "parts"))
    resumed = train.train_and_evaluate(config, str(tmp_path / "parts"))
    state_whole = read_train_state(str(tmp_path / "whole"), config)
    state_parts = read_train_state(str(tmp_path / "parts"), config)
    chex.assert_trees_all_equal(state_whole.ema_params, state_parts.ema_params)
    chex.assert_trees_all_equal(state_whole.ema_batch_stats, state_parts.ema_batch_stats)
    assert resumed["test_clean_acc"] == whole["test_clean_acc"]
    # The best model (one epoch: the final step) holds the EMA weights, not the trained ones.
    from fpcm_jax.runs import loading
    _, best, _, _ = loading.load_model(str(tmp_path / "whole"))
    chex.assert_trees_all_equal(jax.device_get(best["params"]), state_whole.ema_params)
    assert not np.array_equal(state_whole.ema_params["linear"]["kernel"],
                              state_whole.params["linear"]["kernel"])


def test_label_smoothing_is_pytorchs_formula():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
    labels = jnp.asarray([0, 3, 9, 2, 2, 7])
    eps = 0.1
    log_p = jax.nn.log_softmax(logits)
    # PyTorch: (1 - eps) * NLL + eps * mean over classes of -log p.
    expected = ((1 - eps) * -log_p[jnp.arange(6), labels] + eps * -log_p.mean(-1)).mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, eps), expected, rtol=1e-6)
    assert losses.adversarial_loss("ce", None, logits, labels, 6.0, eps) == pytest.approx(
        float(expected), rel=1e-6)


def test_nesterov_is_pytorchs_sgd():
    """PyTorch SGD(nesterov=True): g += wd * w; buf = m * buf + g; w -= lr * (g + m * buf)."""
    config = tiny_config(train__nesterov=True, train__warmup_epochs=0, train__weight_decay=1e-3)
    tx, learning_rate = train_step.make_optimizer(config.train, 10)
    w = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    state = tx.init(w)
    buf = np.zeros(3)
    expected = np.asarray(w["w"])
    momentum, lr, wd = config.train.momentum, config.train.lr, config.train.weight_decay
    for g in ([0.1, 0.2, -0.3], [0.05, -0.1, 0.2], [0.3, 0.0, 0.1]):
        grad = np.asarray(g) + wd * expected
        buf = momentum * buf + grad
        expected = expected - lr * (grad + momentum * buf)
        updates, state = tx.update({"w": jnp.asarray(g)}, state, w)
        w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(w["w"], expected, rtol=1e-5)


def test_extra_data_fills_its_share_of_every_batch_with_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    extra_images = np.full((50, 32, 32, 3), 255, np.uint8)  # marked: all white
    extra_labels = rng.integers(0, 10, 50).astype(np.int32)
    np.savez(tmp_path / "part1.npz", image=extra_images[:30], label=extra_labels[:30])
    np.savez(tmp_path / "part2.npz", image=extra_images[30:], label=extra_labels[30:])
    spec = datasets.get_spec("digits")
    extra = datasets.load_extra(str(tmp_path), spec, "digits")
    np.testing.assert_array_equal(extra.labels, extra_labels)
    train_split, _, _ = datasets.load("digits", validation_size=100)
    batches = datasets.Batches(train_split, extra, 32, 0.7, seed=0)
    assert (batches.main_count, batches.extra_count) == (10, 22)
    assert batches.steps_per_epoch == len(train_split) // 10
    batches.place(parallel.make_mesh())
    seen = set()
    for position in range(3):
        main, chosen = batches.indices(0, position)
        batch, _ = batches.gather(0, position, parallel.process_votes(False,
                                                                       parallel.make_mesh()))
        images, labels = np.asarray(batch["images"]), np.asarray(batch["labels"])
        assert images.shape == (32, 32, 32, 3)
        assert (images[10:] == 255).all() and not (images[:10] == 255).all()
        np.testing.assert_array_equal(labels[:10], train_split.labels[main])
        np.testing.assert_array_equal(labels[10:], extra_labels[chosen])
        seen.update(chosen.tolist())
    assert len(seen) == 50  # 66 picks cycle through the 50 extra images
    np.testing.assert_array_equal(batches.indices(1, 0)[0], epoch_order(train_split, 1)[:10])
    with pytest.raises(datasets.DatasetError, match="labels outside"):
        np.savez(tmp_path / "bad.npz", image=extra_images[:2], label=np.asarray([3, 10]))
        datasets.load_extra(str(tmp_path / "bad.npz"), spec, "digits")


def epoch_order(split, epoch, seed=0):
    return np.random.default_rng([seed, epoch]).permutation(len(split))


def test_a_run_with_extra_data_trains(tmp_path):
    np.savez(tmp_path / "extra.npz",
             image=np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             label=np.arange(64) % 10)
    config = tiny_config(data__extra_path=str(tmp_path / "extra.npz"), data__extra_fraction=0.5,
                         train__stop_after_steps=2)
    assert train.train_and_evaluate(config, str(tmp_path / "run"))["stopped_at_step"] == 2


@pytest.mark.parametrize("changes, message", [
    ({"data__extra_fraction": 0.5}, "go together"),
    ({"data__extra_path": "nowhere.npz", "data__extra_fraction": 0.5}, "does not exist"),
    ({"train__ema_decay": 1.0}, "ema_decay=1.0 must lie in"),
    ({"train__awp_gamma": -0.01}, "awp_gamma=-0.01 must lie in"),
    ({"model__activation": "gelu"}, "activation='gelu' is not valid"),
])
def test_framework_options_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        training_checks.check_training(tiny_config(**changes))


def test_no_retrace_with_awp_and_ema_across_the_warm_up():
    config = plain_config(train__awp_gamma=0.01, train__awp_warmup_epochs=1,
                          train__ema_decay=0.9)
    model, spec = experiment.build(config)
    tx, learning_rate = train_step.make_optimizer(config.train, 2)
    state = train_step.create_state(model, tx, jax.random.key(0), spec.image_size, ema=True)
    batch = one_step_setup(config)[2]
    step_fn = chex.assert_max_traces(
        train_step.make_train_step(model, tx, learning_rate, config, 2), n=1)
    step = jax.jit(step_fn)
    for _ in range(5):  # epochs 0 (no AWP), 1 and 2 (AWP)
        state, _ = step(state, batch, jax.random.key(0))


@pytest.mark.slow
@needs_four_devices
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_four_devices_equal_one_with_awp_ema_and_smoothing(norm):
    """Two steps on 4 devices and on 1 agree, in both threat models.

    L2: its steps are continuous in the gradient, so the runs agree to float rounding.
    Measured (AMD EPYC, 2026-12-03): parameters and their average within 6e-8, BatchNorm
    statistics within 1.2e-7 (absolute); the bounds are 2e-6 + 2e-5 relative.

    L-inf: sign() can turn the devices' different summation order into flipped pixels (on the
    AMD machine bn1/bias then differed by 4e-5 of 5e-4, 2026-12-03), so the leaves are
    compared as test_train's PGD-AT step is, per leaf max|a - b| / max|b|. Measured here
    (2-core CPU, 2026-12-07, step keys 7, 17, 27, 37): parameters and their average at most
    4e-6 (median 0), statistics 1e-7, losses 9.1e-8 relative (no pixel flipped); a run with
    another attack key (a wrong split of keys or batches resembles it): parameters 1.26-2.87
    (median 0.0024-0.0039), statistics 0.060-0.15 (median 0.016-0.024), loss 1.0e-3 to
    2.8e-2. The bounds are test_train's (parameters 0.6, median 5e-4; statistics 1e-2; loss
    4e-4), set from its flips over 8 keys (up to 0.19, 1.2e-4, 1.1e-3, 1.3e-4)."""
    from test_train import run_steps

    threat = ({"attack__norm": "l2", "attack__eps": 0.5, "attack__step_size": 0.1}
              if norm == "l2" else {})
    config = tiny_config(train__awp_gamma=0.01, train__ema_decay=0.9, train__label_smoothing=0.1,
                         train__nesterov=True, model__fpcm_lowpass="fft", **threat)
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
    state_4, metrics_4 = run_steps(config, parallel.make_mesh(), 2)
    state_1, metrics_1 = run_steps(config, one, 2)
    if norm == "l2":
        for field in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
            chex.assert_trees_all_close(getattr(state_4, field), getattr(state_1, field),
                                        rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(metrics_4[-1]["loss"], metrics_1[-1]["loss"], rtol=1e-4)
        return
    for field in ("params", "ema_params"):
        assert_leaves_close(getattr(state_4, field), getattr(state_1, field), largest=0.6,
                            median=5e-4)
    for field in ("batch_stats", "ema_batch_stats"):
        assert_leaves_close(getattr(state_4, field), getattr(state_1, field), largest=1e-2)
    np.testing.assert_allclose(metrics_4[-1]["loss"], metrics_1[-1]["loss"], rtol=4e-4)
