"""One training step, pure and jitted: the train state, the step with AWP and EMA, schedules.

One step (as the official train.py):
  gather the batch by index from the on-device uint8 dataset -> augment (pad-4 crop, flip)
  -> clean forward in train mode (updates BatchNorm statistics, gives the clean accuracy)
  -> PGD-10 attack (BatchNorm mode `train`: batch statistics, running statistics updated by
     every attack step as the official code; `batch_stats_frozen`: batch statistics, no update;
     `eval`: running statistics)
  -> loss (ce | trades | mart) on the adversarial batch -> SGD with momentum and weight decay
     (with AWP: at weights perturbed up the loss), then the EMA of the weights.
The learning-rate schedule and the FPCM cutoff follow the epoch (official) or the step, both
computed from the traced step counter, so nothing recompiles during training.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from fpcm_jax import models, parallel
from fpcm_jax.data import augmentation
from fpcm_jax.training import losses
from fpcm_jax.attacks.pgd import pgd_iterate, trades_l2_iterate, uniform_start

BN_MODES = ("train", "batch_stats_frozen", "eval")
TRADES_L2_ATTACKS = ("trades", "pgd")  # the TRADES code's L2 loop | normalised PGD steps
MART_ATTACK_STARTS = ("uniform", "normal")  # the FPCM code's PGD start | the MART code's
ATTACK_LOOPS = {"auto": None, "unrolled": True, "fori": False}  # None: pgd.default_unroll
SCHEDULES = ("multistep", "cosine")
DROPOUT_STREAM = 1 << 20  # folded into a step's key: its dropout keys, apart from the others


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
    variables = models.init_variables(model, key, image_size)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                      opt_state=tx.init(params), ema_params=copy(params) if ema else None,
                      ema_batch_stats=copy(stats) if ema else None)


def _forward(model: nn.Module) -> Callable:
    """forward(params, stats, x, progress, train, dropout_key) -> (logits, batch statistics
    after it). In train mode the model gets the `dropout` stream (a model without dropout
    ignores it); in eval mode none, as evaluation runs it."""

    def forward(params, stats, x, progress, train, dropout_key=None):
        variables = {"params": params, "batch_stats": stats}
        if not train:
            return model.apply(variables, x, train=False, progress=progress), stats
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        logits, updates = model.apply(variables, x, train=True, progress=progress,
                                      mutable=["batch_stats"], rngs=rngs)
        return logits, updates.get("batch_stats", stats)  # a model may have no BatchNorm

    return forward


def small_normal_start(key: jax.Array, x: jax.Array) -> jax.Array:
    """x + 0.001 N(0, 1) per pixel, not clipped: the start of the TRADES and MART codes."""
    return x + 0.001 * jax.random.normal(key, x.shape)


def _training_attack(forward: Callable, config: ml_collections.ConfigDict) -> Callable:
    """attack(params, stats, x, y, clean_logits, progress, key, dropout_key) -> (adversarial
    examples, the running statistics after the attack's forwards): PGD on the cross-entropy,
    or for TRADES with trades_attack='kl' on the KL divergence from the clean prediction (in L2
    with trades_l2_attack='trades', the TRADES code's own loop, `trades_l2_iterate`). Each
    train-mode forward of the attack draws its own dropout masks (the key, folded once per
    forward, travels with the running statistics through the loop)."""
    train_cfg, attack_cfg = config.train, config.attack
    mode = attack_cfg.bn_mode
    kl_attack = train_cfg.loss == "trades" and train_cfg.trades_attack == "kl"
    trades_l2 = (kl_attack and attack_cfg.norm == "l2" and
                 train_cfg.get("trades_l2_attack", "trades") == "trades")
    normal_start = train_cfg.loss == "mart" and train_cfg.get("mart_attack_start") == "normal"

    def attack(params, stats, x, y, clean_logits, progress, key, dropout_key):
        if attack_cfg.steps == 0:
            return x, stats

        def logits_and_stats(x_in, carry):
            stats_in, forward_key = carry
            logits, new_stats = forward(params, stats_in, x_in, progress, mode != "eval",
                                        forward_key)
            return logits, ((new_stats if mode == "train" else stats_in),
                            jax.random.fold_in(forward_key, 1))

        if kl_attack:
            target_logits = clean_logits if mode != "eval" else forward(
                params, stats, x, progress, False)[0]
            target = jax.nn.softmax(target_logits)
            start = small_normal_start(key, x)  # as the TRADES code

            def loss_fn(x_adv, stats_in):
                logits, new_stats = logits_and_stats(x_adv, stats_in)
                kl = losses.kl_per_example(target, jax.nn.log_softmax(logits)).sum()
                return kl, new_stats

            if trades_l2:
                x_adv, (stats, _) = trades_l2_iterate(
                    loss_fn, x, start, (stats, dropout_key), attack_cfg.eps, attack_cfg.steps,
                    jax.random.fold_in(key, 1), unroll=ATTACK_LOOPS[attack_cfg.loop])
                return x_adv, stats
        else:
            start = (small_normal_start(key, x) if normal_start  # as the MART code
                     else uniform_start(key, x, attack_cfg.eps, attack_cfg.norm))

            def loss_fn(x_adv, stats_in):
                logits, new_stats = logits_and_stats(x_adv, stats_in)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
                return ce, new_stats

        x_adv, (stats, _) = pgd_iterate(loss_fn, x, start, (stats, dropout_key), attack_cfg.eps,
                                        attack_cfg.step_size, attack_cfg.steps,
                                        unroll=ATTACK_LOOPS[attack_cfg.loop],
                                        norm=attack_cfg.norm)
        return x_adv, stats

    return attack


def _with_ema(state: TrainState, new_state: TrainState, train_cfg, warmup_updates: float
              ) -> TrainState:
    """new_state with its moving averages advanced by one update (train.ema_decay > 0)."""
    if train_cfg.ema_decay <= 0:
        return new_state
    decay = ema_decay_at(state.step + 1, train_cfg.ema_decay, warmup_updates)
    average_stats = train_cfg.ema_batch_stats == "average"
    return new_state.replace(
        ema_params=ema_update(state.ema_params, new_state.params, decay),
        ema_batch_stats=(ema_update(state.ema_batch_stats, new_state.batch_stats, decay)
                         if average_stats else new_state.batch_stats))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, learning_rate: Callable,
                    config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
    """train_step(state, batch, key) -> (state, metrics), pure; `key` is the run's base key."""
    train_cfg, data_cfg = config.train, config.data
    ema_warmup_updates = train_cfg.ema_warmup_fraction * steps_per_epoch * train_cfg.epochs
    forward = _forward(model)
    attack = _training_attack(forward, config)

    def train_step(state: TrainState, batch: Dict[str, jax.Array], key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        augment_key, attack_key = jax.random.split(step_key)
        # A model's dropout: a stream of its own per step (a resume draws the same masks),
        # one key per forward: 0 clean, 1 adversarial loss, 2 clean loss, 3 the attack's.
        dropout = lambda use: jax.random.fold_in(jax.random.fold_in(step_key, DROPOUT_STREAM),
                                                 use)
        x = augmentation.augment_for(batch["images"], augment_key, data_cfg)
        y = batch["labels"]
        progress = cutoff_progress(state.step, steps_per_epoch, train_cfg.epochs,
                                   train_cfg.schedule_per)
        # The official code runs the clean batch first, in train mode (its BN update counts).
        clean_logits, stats = forward(state.params, state.batch_stats, x, progress, True,
                                      dropout(0))
        clean_logits = jax.lax.stop_gradient(clean_logits)
        x_adv, stats = attack(state.params, stats, x, y, clean_logits, progress, attack_key,
                              dropout(3))

        def loss_fn(params):
            adv_logits, new_stats = forward(params, stats, x_adv, progress, True, dropout(1))
            clean_for_loss = clean_logits
            if train_cfg.loss != "ce":  # needs gradients through the clean branch too
                clean_for_loss = forward(params, state.batch_stats, x, progress, True,
                                         dropout(2))[0]
            loss = losses.adversarial_loss(train_cfg.loss, clean_for_loss, adv_logits, y,
                                           train_cfg.beta, train_cfg.label_smoothing)
            return loss, (adv_logits, new_stats)

        weights = _awp_weights(loss_fn, state, train_cfg, steps_per_epoch)
        (loss, (adv_logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            weights)
        # As the official AWP code: the optimizer steps from the perturbed weights (so weight
        # decay sees them), then the perturbation is removed: w + update.
        updates, opt_state = tx.update(grads, state.opt_state, weights)
        params = optax.apply_updates(state.params, updates)
        clean_correct = jnp.argmax(clean_logits, -1) == y
        metrics = {"loss": loss,
                   "clean_acc": jnp.mean(clean_correct),
                   # robust: correct clean and at the adversarial example (README's rule)
                   "adv_acc": jnp.mean(clean_correct & (jnp.argmax(adv_logits, -1) == y)),
                   "lr": learning_rate(state.step),
                   "cutoff_progress": jnp.asarray(progress, jnp.float32)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                                  opt_state=opt_state)
        return _with_ema(state, new_state, train_cfg, ema_warmup_updates), metrics

    return train_step


def _awp_weights(loss_fn: Callable, state: TrainState, train_cfg, steps_per_epoch: int) -> Any:
    """The weights the step's gradient is taken at: the parameters, perturbed by AWP when
    train.awp_gamma > 0 (gamma 0 during train.awp_warmup_epochs)."""
    if train_cfg.awp_gamma <= 0:
        return state.params
    # The proxy's forwards run in train mode; their BatchNorm updates are dropped, as the
    # official proxy's are (it is reloaded from the model every step).
    proxy_grads = jax.grad(lambda p: loss_fn(p)[0])(state.params)
    epoch = state.step // steps_per_epoch
    gamma = jnp.where(epoch >= train_cfg.awp_warmup_epochs, train_cfg.awp_gamma, 0.0)
    return jax.tree.map(jnp.add, state.params,
                        awp_perturbation(state.params, proxy_grads, gamma))


def jit_train_step(train_step: Callable, mesh) -> Callable:
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(train_step, in_shardings=(repl, sharded, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
