"""The one place that talks to orbax: model checkpoints and training-run directories.

A model checkpoint is a directory holding `variables/` (an orbax PyTree checkpoint of
{'params', 'batch_stats'}) and `model.json` (the model's description, `fpcm_jax.experiment`).
`model.json` is written last, so a directory without it is incomplete and is never loaded.
`load_model` is the one way to load a trained model: it builds the model from `model.json` and
restores the arrays for the devices present now, whatever devices or hosts saved them.

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
import orbax.checkpoint as ocp

from fpcm_jax import experiment, models, parallel

MODEL_INFO_FILE = "model.json"
VARIABLES_DIR = "variables"
BEST_CHECKPOINTS = ("best_robust", "best_sum")  # a run's best models, in the order eval tries


def save_variables(directory: str, variables: Dict[str, Any], model_info: Dict[str, Any],
                   replace: bool = False) -> None:
    """Write variables and their model description to a new directory (or replace one).

    Every process calls it (orbax writes each array once); process 0 alone prepares the
    staging folder and moves it into place, with barriers between the phases.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory) and not replace:
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another --out "
                              f"or delete it first.")
    staging, old = directory + ".partial", directory + ".old"
    main = jax.process_index() == 0
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    parallel.barrier(f"save_variables:staging:{directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    parallel.barrier(f"save_variables:written:{directory}")
    if main:
        _write_json(os.path.join(staging, MODEL_INFO_FILE), model_info)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)  # the previous checkpoint stays until the new one is in
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(f"save_variables:done:{directory}")


def _write_json(path: str, content: Dict[str, Any]) -> None:
    """Write a JSON file whole or not at all."""
    with open(path + ".partial", "w") as handle:
        json.dump(content, handle, indent=2)
    os.replace(path + ".partial", path)


def read_model_info(directory: str) -> Dict[str, Any]:
    info_path = os.path.join(os.path.abspath(directory), MODEL_INFO_FILE)
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"No complete checkpoint at {os.path.abspath(directory)} "
                                f"(no {MODEL_INFO_FILE}).")
    with open(info_path) as handle:
        return json.load(handle)


def load_variables(directory: str, template: Optional[Dict[str, Any]] = None,
                   mesh=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(variables, model_info) from a directory written by `save_variables`.

    The arrays are restored replicated over `mesh` (default: every device now present), so a
    checkpoint saved on any number of devices or hosts loads on any other. With a template
    (e.g. `models.variables_template(model)`), a checkpoint whose variables differ in
    structure or shape stops with an error that names the first difference.
    """
    directory = os.path.abspath(directory)
    model_info = read_model_info(directory)
    return _restore_variables(directory, model_info, template, mesh), model_info


def _restore_variables(directory: str, model_info: Dict[str, Any],
                       template: Optional[Dict[str, Any]], mesh) -> Dict[str, Any]:
    path = os.path.join(directory, VARIABLES_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata.tree
        if template is not None:
            check_matches(stored, template,
                          f"checkpoint {directory} ({model_info.get('name')})")
        sharding = parallel.replicated(mesh or parallel.make_mesh())
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding),
            stored, is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"))
        return checkpointer.restore(path, target)


def check_matches(variables: Dict[str, Any], template: Dict[str, Any], what: str) -> None:
    """Raise a clear error unless variables have the template's structure and shapes."""
    has_shape = lambda leaf: hasattr(leaf, "shape")  # arrays, and orbax's array metadata
    found = {jax.tree_util.keystr(path): tuple(leaf.shape)
             for path, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=has_shape)}
    wanted = {jax.tree_util.keystr(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(template)}
    for name in sorted(set(found) | set(wanted)):
        if found.get(name) != wanted.get(name):
            raise ValueError(f"{what} does not fit the model: {name} is "
                             f"{found.get(name, 'missing')} in the checkpoint, "
                             f"{wanted.get(name, 'absent')} in the model. Check --config.model.")


def find_model_checkpoint(path: str) -> str:
    """A model checkpoint directory: `path` itself, or a run directory's best model
    (best_robust/, else best_sum/)."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, MODEL_INFO_FILE)):
        return path
    for name in BEST_CHECKPOINTS:
        if os.path.exists(os.path.join(path, name, MODEL_INFO_FILE)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"No model checkpoint at {path}: neither its {MODEL_INFO_FILE} nor "
                            f"a best checkpoint (best_robust/ or best_sum/) of a training run. "
                            f"Train there first or pass --checkpoint PATH (a run directory, "
                            f"or a directory written by `python -m fpcm_jax.convert`).")


def load_model(path: str, mesh=None, overrides: Optional[Dict[str, Any]] = None,
               dtype: str = "float32", fpcm_lowpass: str = "auto"
               ) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    """(model, variables, model_info, checkpoint directory): the one way to load a trained model.

    The model is built from the checkpoint's own description (`model.json`), never from a
    config, so evaluation, analysis and export compute the function that was trained.
    `overrides` are model fields the user gave explicitly (e.g. on the command line): one that
    contradicts the description stops with an error naming the field; `dtype` and
    `fpcm_lowpass` only say how the model is computed and may differ from training.
    """
    directory = find_model_checkpoint(path)
    info = read_model_info(directory)
    description = experiment.complete(info)
    for field, value in sorted((overrides or {}).items()):
        if field in experiment.HOW_COMPUTED or field not in description:
            continue
        stored = description[field]
        if _normalized(value) != _normalized(stored):
            raise ValueError(f"--config.model.{field}={value!r} contradicts the checkpoint's "
                             f"{MODEL_INFO_FILE} ({field}={stored!r} in {directory}): the model "
                             f"is built from the checkpoint. Drop the flag, or choose another "
                             f"--checkpoint.")
    model = experiment.model_from_description(description, dtype, fpcm_lowpass)
    variables = _restore_variables(directory, info, models.variables_template(model), mesh)
    return model, variables, info, directory


def _normalized(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


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
            _write_json(path, description)
        parallel.barrier(f"run_directory:{self.workdir}")  # run.json exists for everyone

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
            _write_json(os.path.join(self.workdir, "summary.json"), summary)

    def listing(self) -> List[str]:
        names = ["checkpoints", *reversed(BEST_CHECKPOINTS)]
        return [os.path.join(self.workdir, n) for n in names
                if os.path.exists(os.path.join(self.workdir, n))]
