"""The training loop: epochs, checkpoint cadence, the SIGTERM vote, validation and best models.

`train_and_evaluate(config, workdir)` trains (or resumes) a run: each step is
`train_step` (one jitted, data-parallel step), batches come from `datasets.Batches`, the run
directory is kept by `runs.run_dir` and the figures go through `runs.metrics`.
The output starts with the settings that define the run (its record, `fpcm_jax.runs.run_record`:
a resume that changes them is refused before anything is written). At each epoch end
(every `train.eval_every_epochs`) the model is validated (clean and PGD, eval mode, final
cutoff) and the best models are saved; at the end it is tested. The config is assumed checked
(`checks.check_training`, which main.py calls).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections

from fpcm_jax import experiment, layers, parallel, progress
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import accuracy
from fpcm_jax.reports import plots
from fpcm_jax.runs import run_dir, run_record
from fpcm_jax.training import train_step as step_lib
from fpcm_jax.runs.metrics import MetricsWriter


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says what to do."""


class _StopFlag:
    """Set by SIGTERM in this process. The loop acts on the processes' agreed vote (any of
    them signalled), so every process saves the same step and exits together."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Train (or resume) in `workdir`; returns the final summary, or where it stopped."""
    training = _Training(config, workdir)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    try:
        return training.run(stop)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        training.metrics.close()


class _Training:
    """One run's pieces, built in order: data and run directory first (so a bad batch size
    stops before run.json is written), then the state restored from the latest checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.main = config, parallel.is_main_process()
        self.model, spec = experiment.build(config)
        train_split, self.val_split, self.test_split = datasets.load_for(config)
        extra = (datasets.load_extra(config.data.extra_path, spec, config.data.name)
                 if config.data.extra_path else None)
        self.batches = datasets.batches_for(train_split, extra, config.train.batch_size,
                                            config.data.extra_fraction, config.seed,
                                            config.data)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.run_dir = run_dir.RunDirectory(workdir, experiment.describe(config), config)
        self.mesh = parallel.make_mesh()
        repl = parallel.replicated(self.mesh)
        tx, learning_rate = step_lib.make_optimizer(config.train, self.steps_per_epoch)
        init_key, self.train_key, self.eval_key = jax.random.split(jax.random.key(config.seed), 3)
        state = step_lib.create_state(self.model, tx, init_key, spec.image_size,
                                      ema=config.train.ema_decay > 0)
        self.state, self.best = self.run_dir.checkpoints.restore_latest(
            jax.device_put(state, repl))
        self.start_step = int(self.state.step)
        self.metrics = MetricsWriter(self.run_dir.workdir, config.logging.tensorboard,
                                     self.start_step)
        self._announce()
        probe_split = self.val_split if len(self.val_split) else train_split
        self.alpha_probe = _alpha_probe(self.model, probe_split, config.logging.alpha_examples,
                                        repl)
        self.batches.place(self.mesh)
        self.train_step = step_lib.jit_train_step(step_lib.make_train_step(
            self.model, tx, learning_rate, config, self.steps_per_epoch), self.mesh)
        self.eval_step = accuracy.pgd_eval_step(self.model, self.mesh, config.eval.attack_steps,
                                                config.attack.eps, config.attack.step_size,
                                                config.attack.norm)
        self.pending = None  # (step, metrics) of the step before, fetched after the next

    def _announce(self) -> None:
        """The settings that define the run, at the start of the output and in TensorBoard."""
        resumed = (f" (resuming at step {self.start_step} of {self.total_steps})"
                   if self.start_step else "")
        self.metrics.say(f"Training in {self.run_dir.workdir}{resumed}; the record: "
                         f"{run_record.CONFIG_SOURCE_FILE}, {run_record.ENVIRONMENT_FILE}.")
        for line in (run_record.settings_lines(self.config) +
                     run_record.change_lines(self.run_dir.record_entry)):
            self.metrics.say(f"  {line}")
        steps = self.config.train.final_test_attack_steps
        self.metrics.hparams(run_record.hparams(self.config),
                             ["validation/clean_acc", "validation/robust_acc", "test/clean_acc",
                              f"test/pgd{steps}_acc"])

    def run(self, stop: _StopFlag) -> Dict[str, Any]:
        step = self.start_step
        while step < self.total_steps:
            step, stopped = self._epoch(step, stop)
            if stopped:
                return stopped
        self._settle()
        return self._final_summary()

    def _epoch(self, step: int, stop: _StopFlag):
        """Steps to the end of the epoch that `step` is in; (next step, the stop report if
        the run was interrupted, else None)."""
        config, per_epoch = self.config, self.steps_per_epoch
        epoch = step // per_epoch
        bar = progress.bar(per_epoch, f"epoch {epoch + 1}/{config.train.epochs}",
                           enabled=self.main, initial=step % per_epoch)
        epoch_start, epoch_images = time.time(), 0
        while step < self.total_steps and step // per_epoch == epoch:
            batch, stop_vote = self.batches.gather(epoch, step % per_epoch,
                                                   parallel.process_votes(stop.requested,
                                                                          self.mesh))
            self.state, metrics = self.train_step(self.state, batch, self.train_key)
            shown = self._settle()
            stop_agreed = bool(stop_vote)  # ready: gather ran before this step
            self.pending = (step, metrics)
            step += 1
            epoch_images += config.train.batch_size
            rate = epoch_images / max(time.time() - epoch_start, 1e-9)
            _show_on_bar(bar, shown, rate, self.metrics, step)
            end_of_epoch = step % per_epoch == 0
            every = config.train.checkpoint_every_steps  # 0: at epoch ends only
            due = (every and step % every == 0) or end_of_epoch
            stop_after = config.train.stop_after_steps
            interrupted = stop_agreed or (stop_after and step - self.start_step >= stop_after)
            if due or interrupted or step == self.total_steps:
                shown = self._settle() or shown
                if end_of_epoch:
                    self._end_of_epoch(step // per_epoch, shown, rate)
                self.run_dir.checkpoints.save(self.state, self.best)
            if interrupted:
                bar.close()
                return step, self._stopped(step, "SIGTERM" if stop_agreed
                                           else "train.stop_after_steps")
        bar.close()
        return step, None

    def _settle(self) -> Optional[Dict[str, float]]:
        """Fetch the last step's metrics and record them; stop on a non-finite loss before
        anything is saved."""
        if self.pending is None:
            return None
        (step, metrics), self.pending = self.pending, None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(
                f"Loss became {metrics['loss']} at step {step + 1} (epoch "
                f"{step // self.steps_per_epoch + 1}); stopped without saving. The last good "
                f"checkpoint in {self.run_dir.checkpoint_dir} is kept. Lower "
                f"--config.train.lr or check the data.")
        self.metrics.record({"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch,
                             **metrics})
        self.metrics.scalars("train", step + 1, metrics)
        return metrics

    def _stopped(self, step: int, reason: str) -> Dict[str, Any]:
        self.metrics.say(f"Stopped at step {step} ({reason}); run the same command to resume "
                         f"from {self.run_dir.checkpoint_dir}.")
        return {"stopped_at_step": step, "reason": reason}

    def _end_of_epoch(self, epoch: int, shown: Dict[str, float], rate: float) -> None:
        if not progress.interactive():
            self.metrics.say(f"epoch {epoch}/{self.config.train.epochs}: loss "
                             f"{shown['loss']:.4f}, clean {shown['clean_acc']:.3f}, adv "
                             f"{shown['adv_acc']:.3f} (last batch), {rate:.1f} img/s")
        every = self.config.train.eval_every_epochs
        last = epoch == self.config.train.epochs
        if len(self.val_split) and every and (epoch % every == 0 or last):
            self._validate(epoch)

    def _validate(self, epoch: int) -> None:
        """Validation accuracy (clean and PGD, eval mode, final cutoff); the best models."""
        config = self.config
        variables = self.state.eval_variables(config.eval.use_ema)
        result = accuracy.evaluate_split(self.eval_step, variables, self.val_split,
                                         config.eval.batch_size,
                                         jax.random.fold_in(self.eval_key, epoch), self.mesh,
                                         name=f"validation at epoch {epoch}")
        record = {"step": int(self.state.step), "epoch": epoch,
                  "val_clean_acc": result["clean_acc"], "val_robust_acc": result["robust_acc"]}
        self.metrics.record(record)
        self.metrics.scalars("validation", record["step"], {"clean_acc": result["clean_acc"],
                                                            "robust_acc": result["robust_acc"]})
        if config.logging.tensorboard:
            self.metrics.histograms("alpha", record["step"], self.alpha_probe(variables))
        self.metrics.say(f"epoch {epoch}: validation clean {result['clean_acc']:.4f}, "
                         f"PGD-{config.eval.attack_steps} {result['robust_acc']:.4f} "
                         f"({result['examples']} images)")
        self.best = dict(self.best)
        total = result["clean_acc"] + result["robust_acc"]
        if total > self.best.get("sum", -1.0):
            self.best["sum"] = total
            self.run_dir.save_best("best_sum", variables, record)
        if result["robust_acc"] > self.best.get("robust", -1.0):
            self.best["robust"] = result["robust_acc"]
            self.run_dir.save_best("best_robust", variables, record)

    def _final_summary(self) -> Dict[str, Any]:
        config, run = self.config, self.run_dir
        steps = config.train.final_test_attack_steps
        eval_step = accuracy.pgd_eval_step(self.model, self.mesh, steps, config.attack.eps,
                                           config.attack.step_size, config.attack.norm)
        result = accuracy.evaluate_split(eval_step, self.state.eval_variables(config.eval.use_ema),
                                         self.test_split, config.eval.batch_size,
                                         jax.random.fold_in(self.eval_key, 2**31 - 1), self.mesh,
                                         name="the final test")
        summary = {"final_step": int(self.state.step), "test_examples": result["examples"],
                   "test_clean_acc": result["clean_acc"],
                   f"test_pgd{steps}_acc": result["robust_acc"], "norm": config.attack.norm,
                   "eps": config.attack.eps, "checkpoints": run.listing()}
        run.write_summary(summary)
        self.metrics.scalars("test", summary["final_step"],
                             {"clean_acc": result["clean_acc"],
                              f"pgd{steps}_acc": result["robust_acc"]})
        if config.logging.curves and self.main:
            summary["curves"] = plots.training_curves(self.metrics.path,
                                                      os.path.join(run.workdir, "curves.png"))
        self.metrics.session_ended()
        self.metrics.say(f"Final model ({run_record.weights_tested(config)} weights) on the test "
                         f"split ({result['examples']} images): clean "
                         f"{result['clean_acc']:.4f}, PGD-{steps} ({config.attack.norm}) "
                         f"{result['robust_acc']:.4f}. "
                         f"Checkpoints: {', '.join(summary['checkpoints'])}.")
        return summary


def _show_on_bar(bar, shown: Optional[Dict[str, float]], rate: float, metrics: MetricsWriter,
                 step: int) -> None:
    if shown is not None:
        bar.set_postfix(loss=f"{shown['loss']:.4f}", clean=f"{shown['clean_acc']:.3f}",
                        adv=f"{shown['adv_acc']:.3f}", img_s=f"{rate:.1f}")
        metrics.scalars("train", step, {"images_per_second": rate})
    bar.update(1)


def _alpha_probe(model, split: datasets.Split, count: int, sharding) -> Callable:
    """variables -> each FPCM module's alpha on the first `count` images of a split ({} for
    a model without FPCM), for TensorBoard's histograms."""
    images = parallel.global_array(split.images[:count], sharding)
    apply = jax.jit(lambda variables, batch: model.apply(
        variables, datasets.to_float(batch), train=False, progress=1.0,
        mutable=["intermediates"])[1])
    return lambda variables: layers.alphas_in(
        jax.tree.map(parallel.fetch, apply(variables, images)))
