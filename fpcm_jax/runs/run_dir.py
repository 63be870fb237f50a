"""A training run's directory (`--workdir`): what it holds and the bookkeeping around it.

    run.json          the model the run trains (a model description, `fpcm_jax.experiment`);
                      a run resumed with another model is refused
    config.py, config.json, environment.json, record_history.jsonl
                      the run's record (`fpcm_jax.runs.run_record`): a resume that changes the
                      experiment is refused before anything is written
    checkpoints/      the newest two train states, for resuming (`checkpoint.TrainingCheckpoints`)
    best_sum/         model checkpoints selected on the validation split: the best clean +
    best_robust/      robust accuracy, the best robust accuracy
    metrics.jsonl     training and validation figures (`fpcm_jax.runs.metrics`), tensorboard/
    summary.json      the final test figures, written at the end
    evaluations.jsonl every `--mode eval` report (`fpcm_jax.evaluation.evaluate`)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

import jax
import ml_collections

from fpcm_jax import experiment, parallel
from fpcm_jax.runs import checkpoint, run_record
from fpcm_jax.files import write_json

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINTS = ("best_robust", "best_sum")  # a run's best models, in the order eval tries


class RunDirectory:
    """A training run's directory: resumable states, best models and summary."""

    def __init__(self, workdir: str, model_description: Dict[str, Any],
                 config: Optional[ml_collections.ConfigDict] = None):
        """With `config` (training): check the run's record against it and write it."""
        self.workdir = os.path.abspath(workdir)
        self.model_description = model_description
        self.record_entry = self._check_and_record(model_description, config)
        self.checkpoints = checkpoint.TrainingCheckpoints(
            os.path.join(self.workdir, CHECKPOINTS_DIR))

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoints.directory

    def _check_and_record(self, description: Dict[str, Any],
                          config: Optional[ml_collections.ConfigDict]) -> Optional[Dict]:
        """Refuse a workdir of another model or experiment (before anything is written), then
        write run.json and the record; the record's history entry for this start."""
        self._check_model(description)
        entry = run_record.check_resume(self.workdir, config) if config is not None else None
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            path = os.path.join(self.workdir, RUN_FILE)
            if not os.path.exists(path):
                write_json(path, description)
            if entry is not None:
                run_record.write(self.workdir, config, entry)
        parallel.barrier(f"run_directory:{self.workdir}")  # run.json exists for everyone
        return entry

    def _check_model(self, description: Dict[str, Any]) -> None:
        """Refuse a workdir whose run.json describes another model."""
        path = os.path.join(self.workdir, RUN_FILE)
        if os.path.exists(path):
            with open(path) as handle:
                previous = experiment.complete(json.load(handle))  # fields added since: defaults
            warning = experiment.code_warning(previous)
            if warning and jax.process_index() == 0:
                print(f"warning: resuming, but {warning}", file=sys.stderr)
            # An imported model's code fingerprint is compared above, not refused: an edit
            # that keeps the function (a comment) must not make a run impossible to resume.
            changed = sorted(k for k in set(previous) | set(description)
                             if k != "code" and previous.get(k) != description.get(k))
            if changed:
                detail = "; ".join(f"{k}: {previous.get(k)!r} there, {description.get(k)!r} now"
                                   for k in changed)
                raise ValueError(f"--workdir {self.workdir} holds a run of another model "
                                 f"({detail}). Use a new --workdir, or the same model config.")

    def save_best(self, name: str, variables: Dict[str, Any], record: Dict[str, Any]) -> None:
        info = dict(self.model_description, selected_by=name, **record)
        checkpoint.save_variables(os.path.join(self.workdir, name), variables, info,
                                  replace=True)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if jax.process_index() == 0:
            write_json(os.path.join(self.workdir, SUMMARY_FILE), summary)

    def listing(self) -> List[str]:
        names = [CHECKPOINTS_DIR, *reversed(BEST_CHECKPOINTS)]
        return [os.path.join(self.workdir, n) for n in names
                if os.path.exists(os.path.join(self.workdir, n))]
