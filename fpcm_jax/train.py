"""Adversarial training: the train state, the jitted data-parallel step and the training loop.

One step (SPEC section 2, as the official train.py):
  gather the batch by index from the on-device uint8 dataset -> augment (pad-4 crop, flip)
  -> clean forward in train mode (updates BatchNorm statistics, gives the clean accuracy)
  -> PGD-10 attack (BatchNorm mode `train`: batch statistics, running statistics updated by
     every attack step as the official code; `batch_stats_frozen`: batch statistics, no update;
     `eval`: running statistics)
  -> loss (ce | trades | mart) on the adversarial batch -> SGD with momentum and weight decay.
The learning-rate schedule and the FPCM cutoff follow the epoch (official) or the step, both
computed from the traced step counter, so nothing recompiles during training.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from fpcm_jax import (analysis, checkpoint, data, evaluate, experiment, layers, losses, models,
                      parallel, plots, progress)
from fpcm_jax.board import Board
from fpcm_jax.attacks.pgd import pgd_iterate, uniform_start

BN_MODES = ("train", "batch_stats_frozen", "eval")
ATTACK_LOOPS = {"auto": None, "unrolled": True, "fori": False}  # None: pgd.default_unroll
SCHEDULES = ("multistep", "cosine")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says what to do."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any = None  # with train.ema_decay > 0: the weight average and the statistics
    ema_batch_stats: Any = None  # it is evaluated with (train.ema_batch_stats)

    def variables(self) -> Dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def eval_variables(self, use_ema: bool = True) -> Dict[str, Any]:
        """What validation, best-model selection and the final test evaluate: the EMA weights
        when there are any and `use_ema` (config.eval.use_ema), else the trained ones."""
        if use_ema and self.ema_params is not None:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return self.variables()


AWP_PROXY_LR = 0.01  # the official AWP code's proxy optimizer: SGD(lr=0.01), one step
AWP_EPS = 1e-20


def awp_perturbation(params: Any, proxy_grads: Any, gamma) -> Any:
    """The official AWP weight perturbation (csdongxian/AWP, `diff_in_weights`): one SGD step
    of a proxy copy of the weights up the training loss gives diff = proxy - w = 0.01 * grad;
    each weight tensor of rank >= 2 (a PyTorch `weight` of a conv, linear or FPCM projection:
    here every `kernel`) moves by gamma * ||w|| / (||diff|| + 1e-20) * diff, so its norm is
    gamma * ||w||; BatchNorm scales and biases are not perturbed."""
    def one(path, weight, grad):
        if getattr(path[-1], "key", None) != "kernel":
            return jnp.zeros_like(weight)
        diff = AWP_PROXY_LR * grad
        return gamma * jnp.linalg.norm(weight) / (jnp.linalg.norm(diff) + AWP_EPS) * diff

    return jax.tree_util.tree_map_with_path(one, params, proxy_grads)


def ema_update(average: Any, new: Any, decay) -> Any:
    """decay * average + (1 - decay) * new, leaf by leaf."""
    return jax.tree.map(lambda a, n: decay * a + (1.0 - decay) * n, average, new)


def ema_decay_at(update: jax.Array, tau: float, warmup_updates: float) -> jax.Array:
    """The authors' weight-averaging decay (DM-Improves-AT, `ema_update` with dynamic decay,
    after Gowal et al. 2020) for the `update`-th optimizer update (counted from 1): 0 (a copy
    of the weights) before `warmup_updates`, then min(tau, (1 + d) / (10 + d)), d the updates
    since."""
    since = update.astype(jnp.float32) - warmup_updates
    return jnp.where(since >= 0, jnp.minimum(tau, (1.0 + since) / (10.0 + since)), 0.0)


def lr_factor(epoch, total_epochs: int, warmup_epochs: int, kind: str):
    """The official LambdaLR factor: linear warm-up from 0.1, then multistep or cosine."""
    epoch = jnp.asarray(epoch, jnp.float32)
    warm = 0.1 + 0.9 * epoch / max(warmup_epochs, 1)
    if kind == "multistep":
        after = jnp.where(epoch < int(0.7 * total_epochs), 1.0,
                          jnp.where(epoch < int(0.9 * total_epochs), 0.1, 0.01))
    elif kind == "cosine":
        span = max(total_epochs - warmup_epochs, 1)
        cosine = 1.0 + jnp.cos((epoch - warmup_epochs) / span * math.pi)
        after = (0.0001 + 0.5 * (0.01 - 0.0001) * cosine) / 0.01
    else:
        raise ValueError(f"Unknown train.schedule {kind!r}; use one of {SCHEDULES}.")
    return jnp.where(epoch < warmup_epochs, warm, after)


def schedule_epoch(step, steps_per_epoch: int, per: str):
    """The (possibly fractional) epoch that the LR and the cutoff follow at a step."""
    if per == "epoch":
        return step // steps_per_epoch
    return step / steps_per_epoch


def cutoff_progress(step, steps_per_epoch: int, epochs: int, per: str):
    """Training progress for the FPCM cutoff: official epoch / total, epoch counted from 1."""
    if per == "epoch":
        return (step // steps_per_epoch + 1) / epochs
    return (step + 1) / (steps_per_epoch * epochs)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> Tuple[optax.GradientTransformation, Callable]:
    """PyTorch SGD: weight decay added to the gradient of every parameter, then momentum."""

    def learning_rate(step):
        epoch = schedule_epoch(step, steps_per_epoch, train_config.schedule_per)
        factor = lr_factor(epoch, train_config.epochs, train_config.warmup_epochs,
                           train_config.schedule)
        return train_config.lr * factor

    tx = optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                     optax.sgd(learning_rate, momentum=train_config.momentum,
                               nesterov=train_config.nesterov))
    return tx, learning_rate


def create_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                 image_size: int, ema: bool = False) -> TrainState:
    """The initial state; with `ema`, the moving averages start at the initial weights."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(key, dummy, train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                      opt_state=tx.init(params), ema_params=copy(params) if ema else None,
                      ema_batch_stats=copy(stats) if ema else None)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, learning_rate: Callable,
                    config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
    """train_step(state, batch, key) -> (state, metrics), pure; `key` is the run's base key."""
    train_cfg, attack_cfg, data_cfg = config.train, config.attack, config.data
    ema_warmup_updates = train_cfg.ema_warmup_fraction * steps_per_epoch * train_cfg.epochs

    def forward(params, stats, x, progress, train):
        variables = {"params": params, "batch_stats": stats}
        if not train:
            return model.apply(variables, x, train=False, progress=progress), stats
        logits, updates = model.apply(variables, x, train=True, progress=progress,
                                      mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def attack(params, stats, x, y, clean_logits, progress, key):
        """Adversarial examples and the running statistics after the attack's forwards."""
        if attack_cfg.steps == 0:
            return x, stats
        mode = attack_cfg.bn_mode

        def logits_and_stats(x_in, stats_in):
            logits, new_stats = forward(params, stats_in, x_in, progress, mode != "eval")
            return logits, (new_stats if mode == "train" else stats_in)

        if train_cfg.loss == "trades" and train_cfg.trades_attack == "kl":
            target_logits = clean_logits if mode != "eval" else forward(
                params, stats, x, progress, False)[0]
            target = jax.nn.softmax(target_logits)
            start = x + 0.001 * jax.random.normal(key, x.shape)  # as the TRADES code

            def loss_fn(x_adv, stats_in):
                logits, new_stats = logits_and_stats(x_adv, stats_in)
                kl = losses.kl_per_example(target, jax.nn.log_softmax(logits)).sum()
                return kl, new_stats
        else:
            start = uniform_start(key, x, attack_cfg.eps)

            def loss_fn(x_adv, stats_in):
                logits, new_stats = logits_and_stats(x_adv, stats_in)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
                return ce, new_stats

        return pgd_iterate(loss_fn, x, start, stats, attack_cfg.eps, attack_cfg.step_size,
                           attack_cfg.steps, unroll=ATTACK_LOOPS[attack_cfg.loop])

    def train_step(state: TrainState, batch: Dict[str, jax.Array], key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        augment_key, attack_key = jax.random.split(step_key)
        x = data.augment(batch["images"], augment_key, data_cfg.crop_padding, data_cfg.flip)
        y = batch["labels"]
        progress = cutoff_progress(state.step, steps_per_epoch, train_cfg.epochs,
                                   train_cfg.schedule_per)
        # The official code runs the clean batch first, in train mode (its BN update counts).
        clean_logits, stats = forward(state.params, state.batch_stats, x, progress, True)
        clean_logits = jax.lax.stop_gradient(clean_logits)
        x_adv, stats = attack(state.params, stats, x, y, clean_logits, progress, attack_key)

        def loss_fn(params):
            adv_logits, new_stats = forward(params, stats, x_adv, progress, True)
            clean_for_loss = clean_logits
            if train_cfg.loss != "ce":  # needs gradients through the clean branch too
                clean_for_loss = forward(params, state.batch_stats, x, progress, True)[0]
            loss = losses.adversarial_loss(train_cfg.loss, clean_for_loss, adv_logits, y,
                                           train_cfg.beta, train_cfg.label_smoothing)
            return loss, (adv_logits, new_stats)

        weights = state.params
        if train_cfg.awp_gamma > 0:
            # The proxy's forwards run in train mode; their BatchNorm updates are dropped, as
            # the official proxy's are (it is reloaded from the model every step).
            proxy_grads = jax.grad(lambda p: loss_fn(p)[0])(state.params)
            epoch = state.step // steps_per_epoch
            gamma = jnp.where(epoch >= train_cfg.awp_warmup_epochs, train_cfg.awp_gamma, 0.0)
            weights = jax.tree.map(jnp.add, state.params,
                                   awp_perturbation(state.params, proxy_grads, gamma))
        (loss, (adv_logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            weights)
        # As the official AWP code: the optimizer steps from the perturbed weights (so weight
        # decay sees them), then the perturbation is removed: w + update.
        updates, opt_state = tx.update(grads, state.opt_state, weights)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss,
                   "clean_acc": jnp.mean(jnp.argmax(clean_logits, -1) == y),
                   "adv_acc": jnp.mean(jnp.argmax(adv_logits, -1) == y),
                   "lr": learning_rate(state.step),
                   "cutoff_progress": jnp.asarray(progress, jnp.float32)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                                  opt_state=opt_state)
        if train_cfg.ema_decay > 0:
            decay = ema_decay_at(state.step + 1, train_cfg.ema_decay, ema_warmup_updates)
            new_state = new_state.replace(
                ema_params=ema_update(state.ema_params, params, decay),
                ema_batch_stats=(ema_update(state.ema_batch_stats, new_stats, decay)
                                 if train_cfg.ema_batch_stats == "average" else new_stats))
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh) -> Callable:
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(train_step, in_shardings=(repl, sharded, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for option values, before any work and before the workdir is touched
    (unknown keys are caught when the flags are parsed). Call after `parallel.setup`."""
    choices = [("train.loss", config.train.loss, losses.LOSS_NAMES),
               ("train.schedule", config.train.schedule, SCHEDULES),
               ("train.schedule_per", config.train.schedule_per, ("epoch", "step")),
               ("train.trades_attack", config.train.trades_attack, ("ce", "kl")),
               ("attack.bn_mode", config.attack.bn_mode, BN_MODES),
               ("train.ema_batch_stats", config.train.ema_batch_stats, ("copy", "average")),
               ("attack.loop", config.attack.loop, tuple(ATTACK_LOOPS)),
               ("model.dtype", config.model.dtype, tuple(models.DTYPES)),
               ("model.fpcm_lowpass", config.model.fpcm_lowpass, layers.LOWPASS_IMPLS),
               ("data.name", config.data.name, tuple(data.DATASETS))]
    for name, value, valid in choices:
        if value not in valid:
            raise ValueError(f"--config.{name}={value!r} is not valid; use one of {valid}.")
    at_least = [("train.epochs", config.train.epochs, 1),
                ("train.checkpoint_every_steps", config.train.checkpoint_every_steps, 0),
                ("train.stop_after_steps", config.train.stop_after_steps, 0),
                ("train.eval_every_epochs", config.train.eval_every_epochs, 0),
                ("train.final_test_attack_steps", config.train.final_test_attack_steps, 0),
                ("attack.steps", config.attack.steps, 0),
                ("eval.attack_steps", config.eval.attack_steps, 0),
                ("train.warmup_epochs", config.train.warmup_epochs, 0),
                ("train.awp_warmup_epochs", config.train.awp_warmup_epochs, 0),
                ("data.validation_size", config.data.validation_size, 0),
                ("data.crop_padding", config.data.crop_padding, 0)]
    for name, value, least in at_least:
        if not isinstance(value, int) or value < least:
            raise ValueError(f"--config.{name}={value!r} must be an integer >= {least}.")
    for name, value in [("attack.eps", config.attack.eps),
                        ("attack.step_size", config.attack.step_size)]:
        if not 0 <= value <= 1:
            raise ValueError(f"--config.{name}={value!r} must lie in [0, 1] (images are in "
                             f"[0, 1]; 8/255 is written 0.03137).")
    if not config.train.lr > 0:
        raise ValueError(f"--config.train.lr={config.train.lr!r} must be positive.")
    for name, value, low, high in [("train.momentum", config.train.momentum, 0, 1),
                                   ("train.weight_decay", config.train.weight_decay, 0, math.inf),
                                   ("train.beta", config.train.beta, 0, math.inf),
                                   ("train.awp_gamma", config.train.awp_gamma, 0, 1),
                                   ("train.ema_decay", config.train.ema_decay, 0, 1),
                                   ("train.ema_warmup_fraction", config.train.ema_warmup_fraction,
                                    0, 1),
                                   ("train.label_smoothing", config.train.label_smoothing, 0, 1),
                                   ("data.extra_fraction", config.data.extra_fraction, 0, 1)]:
        if not low <= value < high:
            raise ValueError(f"--config.{name}={value!r} must lie in [{low}, {high}).")
    if bool(config.data.extra_path) != (config.data.extra_fraction > 0):
        raise ValueError(f"--config.data.extra_fraction={config.data.extra_fraction} and "
                         f"--config.data.extra_path={config.data.extra_path!r} go together: give "
                         f"the extra data's .npz with a fraction > 0 (e.g. 0.7), or neither.")
    if config.data.extra_path and not os.path.exists(config.data.extra_path):
        raise ValueError(f"--config.data.extra_path={config.data.extra_path!r} does not exist.")
    experiment.check_options(experiment.describe(config))
    parallel.check_batch_size(config.train.batch_size)
    parallel.check_batch_size(config.eval.batch_size, "eval.batch_size")


class _StopFlag:
    """Set by SIGTERM in this process. The loop acts on the processes' agreed vote (any of
    them signalled), so every process saves the same step and exits together."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Train (or resume) in `workdir`; returns the final summary."""
    validate_config(config)
    main = parallel.is_main_process()
    model, spec = experiment.build(config)
    train_split, val_split, test_split = data.load_for(config)
    extra = (data.load_extra(config.data.extra_path, spec, config.data.name)
             if config.data.extra_path else None)
    batch_size = config.train.batch_size
    batches = Batches(train_split, extra, batch_size, config.data.extra_fraction, config.seed)
    steps_per_epoch = batches.steps_per_epoch
    run = checkpoint.RunDirectory(workdir, experiment.describe(config))
    total_steps = steps_per_epoch * config.train.epochs

    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    tx, learning_rate = make_optimizer(config.train, steps_per_epoch)
    root_key = jax.random.key(config.seed)
    init_key, train_key, eval_key = jax.random.split(root_key, 3)
    state = jax.device_put(create_state(model, tx, init_key, spec.image_size,
                                        ema=config.train.ema_decay > 0), repl)
    state, best = run.restore_latest(state)
    start_step = int(state.step)
    run.start_metrics(start_step)
    board = Board(run.workdir, config.logging.tensorboard, start_step)
    alpha_probe = _alpha_probe(model, val_split if len(val_split) else train_split,
                               config.logging.alpha_examples, repl)

    batches.place(mesh)
    train_step = jit_train_step(make_train_step(model, tx, learning_rate, config,
                                                steps_per_epoch), mesh)
    eval_step = evaluate.pgd_eval_step(model, mesh, config.eval.attack_steps,
                                       config.attack.eps, config.attack.step_size)

    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    stop_after = config.train.stop_after_steps
    pending = None  # metrics of the step before, fetched after the next one is dispatched

    def settle(pending):
        """Fetch the last step's metrics; stop on a non-finite loss before anything is saved."""
        if pending is None:
            return None
        step, metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            epoch = step // steps_per_epoch + 1
            raise TrainingError(
                f"Loss became {metrics['loss']} at step {step + 1} (epoch {epoch}); stopped "
                f"without saving. The last good checkpoint in {run.checkpoint_dir} is kept. "
                f"Lower --config.train.lr or check the data.")
        run.log_metrics({"step": step + 1, "epoch": (step + 1) / steps_per_epoch, **metrics})
        board.scalars("train", step + 1, metrics)
        return metrics

    try:
        step = start_step
        while step < total_steps:
            epoch = step // steps_per_epoch
            bar = progress.bar(steps_per_epoch, f"epoch {epoch + 1}/{config.train.epochs}",
                               enabled=main, initial=step % steps_per_epoch)
            epoch_start, epoch_images = time.time(), 0
            while step < total_steps and step // steps_per_epoch == epoch:
                batch, stop_vote = batches.gather(epoch, step % steps_per_epoch,
                                                  parallel.process_votes(stop.requested, mesh))
                state, metrics = train_step(state, batch, train_key)
                shown = settle(pending)
                stop_agreed = bool(stop_vote)  # ready: gather ran before this step
                pending = (step, metrics)
                step += 1
                epoch_images += batch_size
                if shown is not None:
                    rate = epoch_images / max(time.time() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{shown['loss']:.4f}", clean=f"{shown['clean_acc']:.3f}",
                                    adv=f"{shown['adv_acc']:.3f}", img_s=f"{rate:.1f}")
                    board.scalars("train", step, {"images_per_second": rate})
                bar.update(1)
                end_of_epoch = step % steps_per_epoch == 0
                every = config.train.checkpoint_every_steps  # 0: at epoch ends only
                due = (every and step % every == 0) or end_of_epoch
                interrupted = stop_agreed or (stop_after and step - start_step >= stop_after)
                if due or interrupted or step == total_steps:
                    shown = settle(pending) or shown
                    pending = None
                    if end_of_epoch and main and not progress.interactive():
                        rate = epoch_images / max(time.time() - epoch_start, 1e-9)
                        progress.say(f"epoch {epoch + 1}/{config.train.epochs}: loss "
                                     f"{shown['loss']:.4f}, clean {shown['clean_acc']:.3f}, adv "
                                     f"{shown['adv_acc']:.3f} (last batch), {rate:.1f} img/s")
                    if end_of_epoch:
                        best = _end_of_epoch(config, run, state, best, eval_step, val_split,
                                             eval_key, mesh, step // steps_per_epoch, main,
                                             board, alpha_probe)
                    run.save_latest(state, best)
                if interrupted:
                    bar.close()
                    reason = "SIGTERM" if stop_agreed else "train.stop_after_steps"
                    if main:
                        progress.say(f"Stopped at step {step} ({reason}); run the same command "
                                     f"to resume from {run.checkpoint_dir}.")
                    return {"stopped_at_step": step, "reason": reason}
            bar.close()
        settle(pending)
        return _final_summary(config, run, model, state, test_split, eval_key, mesh, main,
                              board)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        board.close()


class Batches:
    """The training batches, gathered by index inside a jitted function from the datasets held
    on the devices (uint8, replicated). Each epoch permutes the training split (seeded by
    (seed, epoch), so a resumed run sees the same batches); with extra data, a share
    `extra_fraction` of every batch comes from it (its own permutation per epoch, cycled when
    an epoch needs more), after the training images; an epoch then covers the training split
    once. The gather also returns whether any process has been told to stop: every process
    reads the same vote for the same step, without an extra collective or host sync."""

    def __init__(self, train_split: data.Split, extra: Optional[data.Split], batch_size: int,
                 extra_fraction: float, seed: int):
        self.split, self.extra, self.seed = train_split, extra, seed
        self.extra_count = round(batch_size * extra_fraction) if extra is not None else 0
        self.main_count = batch_size - self.extra_count
        if extra is not None and not 0 < self.extra_count < batch_size:
            raise ValueError(f"--config.data.extra_fraction={extra_fraction} leaves "
                             f"{self.extra_count} extra images in a batch of {batch_size}: "
                             f"choose a fraction that gives between 1 and {batch_size - 1}.")
        self.steps_per_epoch = len(train_split) // self.main_count  # the last partial dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"--config.train.batch_size={batch_size} exceeds the "
                             f"{len(train_split)} training images.")
        self._orders = {}

    def place(self, mesh) -> None:
        repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self._repl, self._sharded = repl, sharded
        self._arrays = [parallel.global_array(a, repl)
                        for a in (self.split.images, self.split.labels)]
        if self.extra is None:
            self._gather = jax.jit(lambda imgs, lbls, idx, votes: (
                {"images": imgs[idx], "labels": lbls[idx]}, jnp.any(votes)),
                out_shardings=(sharded, repl))
            return
        self._arrays += [parallel.global_array(a, repl)
                         for a in (self.extra.images, self.extra.labels)]
        self._gather = jax.jit(lambda imgs, lbls, extra_imgs, extra_lbls, idx, extra_idx, votes: (
            {"images": jnp.concatenate([imgs[idx], extra_imgs[extra_idx]]),
             "labels": jnp.concatenate([lbls[idx], extra_lbls[extra_idx]])}, jnp.any(votes)),
            out_shardings=(sharded, repl))

    def indices(self, epoch: int, position: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(training-split indices, extra-data indices or None) of a step's batch."""
        if epoch not in self._orders:
            self._orders = {epoch: (
                np.random.default_rng([self.seed, epoch]).permutation(len(self.split)),
                None if self.extra is None else
                np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.extra)))}
        order, extra_order = self._orders[epoch]
        main = order[position * self.main_count:(position + 1) * self.main_count]
        if extra_order is None:
            return main, None
        picks = (position * self.extra_count + np.arange(self.extra_count)) % len(extra_order)
        return main, extra_order[picks]

    def gather(self, epoch: int, position: int, votes: jax.Array):
        main, extra = self.indices(epoch, position)
        if extra is None:
            return self._gather(*self._arrays, parallel.global_array(main, self._sharded), votes)
        return self._gather(*self._arrays, parallel.global_array(main, self._repl),
                            parallel.global_array(extra, self._repl), votes)


def _alpha_probe(model, split: data.Split, count: int, sharding) -> Callable:
    """variables -> each FPCM module's alpha on the first `count` images of a split ({} for
    a model without FPCM), for TensorBoard's histograms."""
    images = parallel.global_array(split.images[:count], sharding)
    apply = jax.jit(lambda variables, batch: model.apply(
        variables, data.to_float(batch), train=False, progress=1.0,
        mutable=["intermediates"])[1])
    return lambda variables: analysis.alphas_in(
        jax.tree.map(parallel.fetch, apply(variables, images)))


def _end_of_epoch(config, run, state, best, eval_step, val_split, eval_key, mesh, epoch, main,
                  board, alpha_probe):
    """Validation accuracy (clean and PGD, eval mode, final cutoff) and best-model tracking."""
    every = config.train.eval_every_epochs
    last = epoch == config.train.epochs
    if len(val_split) == 0 or not every or (epoch % every and not last):
        return best
    variables = state.eval_variables(config.eval.use_ema)
    result = evaluate.evaluate_split(eval_step, variables, val_split,
                                     config.eval.batch_size, jax.random.fold_in(eval_key, epoch),
                                     mesh)
    record = {"step": int(state.step), "epoch": epoch, "val_clean_acc": result["clean_acc"],
              "val_robust_acc": result["robust_acc"]}
    run.log_metrics(record)
    board.scalars("validation", record["step"], {"clean_acc": result["clean_acc"],
                                                 "robust_acc": result["robust_acc"]})
    if config.logging.tensorboard:
        board.histograms("alpha", record["step"], alpha_probe(variables))
    if main:
        progress.say(f"epoch {epoch}: validation clean {result['clean_acc']:.4f}, "
                     f"PGD-{config.eval.attack_steps} {result['robust_acc']:.4f} "
                     f"({result['examples']} images)")
    best = dict(best)
    total = result["clean_acc"] + result["robust_acc"]
    if total > best.get("sum", -1.0):
        best["sum"] = total
        run.save_best("best_sum", variables, record)
    if result["robust_acc"] > best.get("robust", -1.0):
        best["robust"] = result["robust_acc"]
        run.save_best("best_robust", variables, record)
    return best


def _final_summary(config, run, model, state, test_split, eval_key, mesh, main, board):
    steps = config.train.final_test_attack_steps
    eval_step = evaluate.pgd_eval_step(model, mesh, steps, config.attack.eps,
                                       config.attack.step_size)
    result = evaluate.evaluate_split(eval_step, state.eval_variables(config.eval.use_ema),
                                     test_split,
                                     config.eval.batch_size, jax.random.fold_in(eval_key, 2**31 - 1),
                                     mesh)
    summary = {"final_step": int(state.step), "test_examples": result["examples"],
               "test_clean_acc": result["clean_acc"],
               f"test_pgd{steps}_acc": result["robust_acc"], "checkpoints": run.listing()}
    run.write_summary(summary)
    board.scalars("test", summary["final_step"], {"clean_acc": result["clean_acc"],
                                                  f"pgd{steps}_acc": result["robust_acc"]})
    if config.logging.curves and main:
        summary["curves"] = plots.training_curves(run.metrics_path,
                                                  os.path.join(run.workdir, "curves.png"))
    if main:
        progress.say(f"Final model on the test split ({result['examples']} images): clean "
                     f"{result['clean_acc']:.4f}, PGD-{steps} {result['robust_acc']:.4f}. "
                     f"Checkpoints: {', '.join(summary['checkpoints'])}.")
    return summary
