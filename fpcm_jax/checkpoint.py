"""The one place that talks to orbax: model checkpoints and training-run directories.

A model checkpoint is a directory holding `variables/` (an orbax PyTree checkpoint of
{'params', 'batch_stats'}) and `model.json` (which model it belongs to). `model.json` is
written last, so a directory without it is incomplete and is never loaded.

A training run directory (`--workdir`) holds `run.json` (the model it trains), `checkpoints/`
(the latest train state, for resuming), `best_sum/` and `best_robust/` (model checkpoints
selected on the validation split), `metrics.jsonl` and, at the end, `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_INFO_FILE = "model.json"
VARIABLES_DIR = "variables"


def save_variables(directory: str, variables: Dict[str, Any], model_info: Dict[str, Any],
                   replace: bool = False) -> None:
    """Write variables and their model description to a new directory (or replace one)."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory) and not replace:
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another --out "
                              f"or delete it first.")
    staging = directory + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(staging, MODEL_INFO_FILE), "w") as handle:
            json.dump(model_info, handle, indent=2)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)


def load_variables(directory: str,
                   template: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(variables, model_info) from a directory written by `save_variables`.

    With a template (e.g. `convert.variables_template(model)`), a checkpoint whose variables
    differ in structure or shape stops with an error that names the first difference.
    """
    directory = os.path.abspath(directory)
    info_path = os.path.join(directory, MODEL_INFO_FILE)
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"No complete checkpoint at {directory} (no {MODEL_INFO_FILE}).")
    with open(info_path) as handle:
        model_info = json.load(handle)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
    if template is not None:
        check_matches(variables, template, f"checkpoint {directory} ({model_info.get('name')})")
    return variables, model_info


def check_matches(variables: Dict[str, Any], template: Dict[str, Any], what: str) -> None:
    """Raise a clear error unless variables have the template's structure and shapes."""
    found = {jax.tree_util.keystr(path): np.shape(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    wanted = {jax.tree_util.keystr(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(template)}
    for name in sorted(set(found) | set(wanted)):
        if found.get(name) != wanted.get(name):
            raise ValueError(f"{what} does not fit the model: {name} is "
                             f"{found.get(name, 'missing')} in the checkpoint, "
                             f"{wanted.get(name, 'absent')} in the model. Check --config.model.")


class RunDirectory:
    """A training run's directory: resumable state, best models, metrics and summary."""

    def __init__(self, workdir: str, model_description: Dict[str, Any]):
        self.workdir = os.path.abspath(workdir)
        self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        self.model_description = model_description
        self._check_model(model_description)
        self.manager = ocp.CheckpointManager(
            self.checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def _check_model(self, description: Dict[str, Any]) -> None:
        path = os.path.join(self.workdir, "run.json")
        if os.path.exists(path):
            with open(path) as handle:
                previous = json.load(handle)
            changed = sorted(k for k in set(previous) | set(description)
                             if previous.get(k) != description.get(k))
            if changed:
                detail = "; ".join(f"{k}: {previous.get(k)!r} there, {description.get(k)!r} now"
                                   for k in changed)
                raise ValueError(f"--workdir {self.workdir} holds a run of another model "
                                 f"({detail}). Use a new --workdir, or the same model config.")
        elif jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(path, "w") as handle:
                json.dump(description, handle, indent=2)

    def restore_latest(self, state: Any) -> Tuple[Any, Dict[str, float]]:
        """(state, best scores) from the latest checkpoint, or the given state and {}."""
        step = self.manager.latest_step()
        if step is None:
            return state, {}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), best=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["best"] or {})

    def save_latest(self, state: Any, best: Dict[str, float]) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best=ocp.args.JsonSave(dict(best))))
        self.manager.wait_until_finished()  # the next step donates the buffers being saved

    def save_best(self, name: str, variables: Dict[str, Any], record: Dict[str, Any]) -> None:
        info = dict(self.model_description, selected_by=name, **record)
        save_variables(os.path.join(self.workdir, name), variables, info, replace=True)

    def start_metrics(self, start_step: int) -> None:
        """Drop metric lines past the step we resume from (they will be written again)."""
        if jax.process_index() or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as handle:
            kept = [line for line in handle if json.loads(line).get("step", 0) <= start_step]
        with open(self.metrics_path, "w") as handle:
            handle.writelines(kept)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        if jax.process_index() == 0:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=2)

    def listing(self) -> List[str]:
        names = ["checkpoints", "best_sum", "best_robust"]
        return [os.path.join(self.workdir, n) for n in names
                if os.path.exists(os.path.join(self.workdir, n))]
