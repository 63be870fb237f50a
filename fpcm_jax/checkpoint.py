"""The one place that talks to orbax: model checkpoints and training-run directories.

A model checkpoint is a directory holding `variables/` (an orbax PyTree checkpoint of
{'params', 'batch_stats'}), `checksums.json` and `model.json` (the model's description,
`fpcm_jax.experiment`). `model.json` is written last, so a directory without it is incomplete
and is never loaded. `load_model` is the one way to load a trained model: it builds the model
from `model.json` and restores the arrays for the devices present now, whatever devices or
hosts saved them.

Integrity: every saved tree records a CRC-32 of each array's bytes (with its dtype and shape)
and of its JSON companions; loading recomputes them, and any difference, unreadable file or
missing array is a `DamagedCheckpoint` error naming the checkpoint (never a silently different
model). Resuming training falls back to the newest intact checkpoint (two are kept) and moves
the damaged ones to `damaged/`; evaluation falls back from `best_robust/` to `best_sum/` only
when asked (`allow_fallback`). Checkpoints written before checksums existed load unverified,
with a warning.

A training run directory (`--workdir`) holds `run.json` (the model it trains), `checkpoints/`
(the latest two train states, for resuming), `best_sum/` and `best_robust/` (model checkpoints
selected on the validation split), `metrics.jsonl` and, at the end, `summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from fpcm_jax import experiment, models, parallel

MODEL_INFO_FILE = "model.json"
CHECKSUMS_FILE = "checksums.json"
VARIABLES_DIR = "variables"
BEST_CHECKPOINTS = ("best_robust", "best_sum")  # a run's best models, in the order eval tries
KEPT_TRAINING_CHECKPOINTS = 2  # the newest, and one to fall back to if it is damaged


class DamagedCheckpoint(ValueError):
    """A checkpoint cannot be read, or its contents differ from what was saved."""


def path_name(path: Tuple[Any, ...]) -> str:
    """'params/conv1/kernel': a tree path named alike for arrays, state dicts and orbax
    metadata (sequence indices and dict keys read the same)."""
    return "/".join(str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name",
                                                                             entry))))
                    for entry in path)


def _is_array_metadata(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _leaves_by_name(tree: Any) -> Dict[str, Any]:
    """{path name: leaf} of a tree of arrays or orbax array metadata; dataclasses such as a
    train state are read as their state dict (the layout orbax stores)."""
    tree = flax.serialization.to_state_dict(tree)
    return {path_name(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_array_metadata)}


def array_checksums(tree: Any) -> Dict[str, str]:
    """'dtype[shape]:crc32' of every array in a tree, keyed by its path name (global arrays
    are read whole, from any host)."""
    sums = {}
    for name, leaf in _leaves_by_name(tree).items():
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(parallel.fetch(leaf) if isinstance(leaf, jax.Array)
                                     else np.asarray(leaf))
        sums[name] = (f"{array.dtype}{list(array.shape)}:"
                                            f"{zlib.crc32(array.tobytes()):08x}")
    return sums


def json_checksum(content: Any) -> str:
    return f"{zlib.crc32(json.dumps(content, sort_keys=True).encode()):08x}"


def _first_line(error: BaseException) -> str:
    """The gist of a library's error: its first line, without TensorStore's spec dump."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    return f"{type(error).__name__}: {text[:160]}".rstrip(": ")


@contextlib.contextmanager
def _reading_quietly():
    """Report a damaged file once, in our own words: besides raising, orbax and TensorStore
    log it through absl and asyncio, and reads still in flight print tracebacks from other
    threads after the failure (onto an event loop already closed)."""
    _drop_stray_read_reports()  # before the read: stray reports can come before the raise
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    failed = False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        for logger, level in zip(loggers, levels):
            if not (failed and logger.name == "asyncio"):  # stragglers log after we return
                logger.setLevel(level)


_STRAY_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array")


def _drop_stray_read_reports() -> None:
    """Filter the late reports of a failed read out of the interpreter's exception hooks
    (everything else still reaches the previous hooks)."""
    if getattr(sys.excepthook, "_drops_stray_reads", False):
        return
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not any(text in str(value) for text in _STRAY_READ_ERRORS):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(report):
        if not any(text in str(report.exc_value) for text in _STRAY_READ_ERRORS):
            previous_unraisablehook(report)

    previous_threading_hook = threading.excepthook

    def threading_excepthook(arguments):
        if not any(text in str(arguments.exc_value) for text in _STRAY_READ_ERRORS):
            previous_threading_hook(arguments)

    excepthook._drops_stray_reads = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    threading.excepthook = threading_excepthook
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)


def _check_checksums(found: Dict[str, str], recorded: Dict[str, str], what: str) -> None:
    differing = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
    if differing:
        raise DamagedCheckpoint(
            f"{what} is damaged: {differing[0]} does not match the checksum recorded when it "
            f"was saved ({len(differing)} of {len(recorded)} entries differ).")


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
        if os.path.exists(old) and not os.path.exists(directory):
            os.replace(old, directory)  # a replacement was interrupted between its two renames
    parallel.barrier(f"save_variables:staging:{directory}")
    checksums = {"arrays": array_checksums(variables), MODEL_INFO_FILE: json_checksum(model_info)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    parallel.barrier(f"save_variables:written:{directory}")
    if main:
        write_json(os.path.join(staging, CHECKSUMS_FILE), checksums)
        write_json(os.path.join(staging, MODEL_INFO_FILE), model_info)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)  # the previous checkpoint stays until the new one is in
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(f"save_variables:done:{directory}")


def write_json(path: str, content: Dict[str, Any]) -> None:
    """Write a JSON file whole or not at all (flushed to disk before it takes the name)."""
    with open(path + ".partial", "w") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".partial", path)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{what} is damaged: {path} is not valid JSON "
                                f"({_first_line(error)}).") from None


def read_model_info(directory: str) -> Dict[str, Any]:
    directory = os.path.abspath(directory)
    info_path = os.path.join(directory, MODEL_INFO_FILE)
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"No complete checkpoint at {directory} "
                                f"(no {MODEL_INFO_FILE}).")
    info = _read_json(info_path, f"checkpoint {directory}")
    if not isinstance(info, dict):
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {info_path} does not hold "
                                f"a model description.")
    return info


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
    """The arrays, verified against checksums.json (when the checkpoint has one)."""
    what = f"checkpoint {directory}"
    checksums_path = os.path.join(directory, CHECKSUMS_FILE)
    recorded = None
    if os.path.exists(checksums_path):
        recorded = _read_json(checksums_path, what)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("arrays"), dict):
            raise DamagedCheckpoint(f"{what} is damaged: {checksums_path} lacks the checksums.")
        _check_checksums({MODEL_INFO_FILE: json_checksum(model_info)},
                         {MODEL_INFO_FILE: recorded.get(MODEL_INFO_FILE)}, what)
    elif parallel.is_main_process():
        print(f"warning: {what} has no {CHECKSUMS_FILE} (written before fpcm-jax recorded "
              f"checksums); its arrays are loaded unverified.", file=sys.stderr)
    sharding = parallel.replicated(mesh or parallel.make_mesh())
    replicated_like = lambda stored: jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding),
        stored, is_leaf=_is_array_metadata)
    restored = _restore_tree(os.path.join(directory, VARIABLES_DIR), what,
                             recorded and recorded["arrays"], template,
                             f"{what} ({model_info.get('name')})", replicated_like)
    if recorded is not None:
        _check_checksums(array_checksums(restored), recorded["arrays"], what)
    return restored


def _restore_tree(path: str, what: str, recorded: Optional[Dict[str, str]],
                  template: Optional[Any], fits: str, make_target: Callable[[Any], Any]) -> Any:
    """An orbax PyTree restored into `make_target(its metadata)`. Unreadable files, or arrays
    other than the recorded ones, are a DamagedCheckpoint; a tree of another structure than
    the template (an intact checkpoint of another model) is a ValueError."""
    try:
        with _reading_quietly(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path).item_metadata.tree
    except Exception as error:  # orbax, TensorStore or JSON errors, whatever the damage
        raise DamagedCheckpoint(f"{what} is damaged: its metadata in {path} cannot be read "
                                f"({_first_line(error)}).") from None
    if recorded is not None:
        if set(_leaves_by_name(stored)) != set(recorded):
            raise DamagedCheckpoint(f"{what} is damaged: the arrays listed in {path} are not "
                                    f"those recorded when it was saved.")
    if template is not None:
        check_matches(stored, template, fits)
    try:
        with _reading_quietly(), ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, make_target(stored))
    except Exception as error:
        raise DamagedCheckpoint(f"{what} is damaged: {path} cannot be read "
                                f"({_first_line(error)}).") from None


def check_matches(variables: Dict[str, Any], template: Dict[str, Any], what: str) -> None:
    """Raise a clear error unless variables have the template's structure and shapes."""
    found = {name: tuple(leaf.shape) for name, leaf in _leaves_by_name(variables).items()}
    wanted = {name: tuple(leaf.shape) for name, leaf in _leaves_by_name(template).items()}
    for name in sorted(set(found) | set(wanted)):
        if found.get(name) != wanted.get(name):
            raise ValueError(f"{what} does not fit the model: {name} is "
                             f"{found.get(name, 'missing')} in the checkpoint, "
                             f"{wanted.get(name, 'absent')} in the model. Check --config.model.")


def model_checkpoints(path: str, flag: str = "--checkpoint") -> List[str]:
    """The model checkpoints `path` names, in the order to try: `path` itself, or a run
    directory's best models (best_robust/, then best_sum/). A best model whose replacement
    was interrupted between its two renames is found under its `.old` name."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, MODEL_INFO_FILE)):
        return [path]
    found = []
    for name in BEST_CHECKPOINTS:
        for candidate in (os.path.join(path, name), os.path.join(path, name + ".old")):
            if os.path.exists(os.path.join(candidate, MODEL_INFO_FILE)):
                found.append(candidate)
                break
    if not found:
        raise FileNotFoundError(
            f"No model checkpoint at {path}: neither its {MODEL_INFO_FILE} nor a best "
            f"checkpoint (best_robust/ or best_sum/) of a training run. Train there first or "
            f"pass {flag} PATH (a run directory, or a directory written by "
            f"`python -m fpcm_jax.convert`).")
    return found


def load_model(path: str, mesh=None, overrides: Optional[Dict[str, Any]] = None,
               dtype: str = "float32", fpcm_lowpass: str = "auto", allow_fallback: bool = False,
               flag: str = "--checkpoint", official: Optional[Dict[str, Any]] = None
               ) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    """(model, variables, model_info, checkpoint directory): the one way to load a trained model.

    The model is built from the checkpoint's own description (`model.json`), never from a
    config, so evaluation, analysis and export compute the function that was trained.
    `overrides` are model fields the user gave explicitly (e.g. on the command line): one that
    contradicts the description stops with an error naming the field; `dtype` and
    `fpcm_lowpass` only say how the model is computed and may differ from training.
    A damaged best_robust/ of a run directory is an error, or with `allow_fallback` a warning
    and best_sum/ is loaded instead. `flag` is the option that named `path`, for messages.
    `official`: when `path` is an official PyTorch checkpoint file (.pt, .pth, .npz), the
    description of its model (`experiment.official_description`); it is converted on the fly.
    """
    if os.path.isfile(path) and official is not None:
        return _load_official_file(path, mesh, official, dtype, fpcm_lowpass)
    candidates = model_checkpoints(path, flag)
    for index, directory in enumerate(candidates):
        try:
            return _load_model_from(directory, mesh, overrides, dtype, fpcm_lowpass)
        except DamagedCheckpoint as error:
            if index + 1 == len(candidates):
                raise
            if not allow_fallback:
                raise DamagedCheckpoint(f"{error} Pass --allow_fallback to load "
                                        f"{candidates[index + 1]} instead.") from None
            if parallel.is_main_process():
                print(f"warning: {error} Loading {candidates[index + 1]} instead "
                      f"(--allow_fallback).", file=sys.stderr)
    raise AssertionError("unreachable")


def _load_official_file(path: str, mesh, description: Dict[str, Any], dtype: str,
                        fpcm_lowpass: str) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    from fpcm_jax import convert

    path = os.path.abspath(path)
    if not path.endswith(convert.OFFICIAL_FILE_SUFFIXES):
        raise ValueError(f"{path} is a file but not an official checkpoint (.pt, .pth, .npz); "
                         f"pass a checkpoint directory or a run directory.")
    description = {**description, "source": path}
    model = experiment.model_from_description(description, dtype, fpcm_lowpass)
    variables = convert.from_official(path, model)
    sharding = parallel.replicated(mesh or parallel.make_mesh())
    variables = jax.tree.map(lambda leaf: parallel.global_array(np.asarray(leaf), sharding),
                             variables)
    return model, variables, description, path


def _load_model_from(directory: str, mesh, overrides: Optional[Dict[str, Any]], dtype: str,
                     fpcm_lowpass: str) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    info = read_model_info(directory)
    try:
        description = experiment.complete(info)
    except (KeyError, TypeError, ValueError) as error:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MODEL_INFO_FILE} "
                                f"does not describe a model ({_first_line(error)}).") from None
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
    """Sequences as tuples; an empty one is None (`--config.model.widths=()` unsets)."""
    return (tuple(value) or None) if isinstance(value, (list, tuple)) else value


class RunDirectory:
    """A training run's directory: resumable state, best models, metrics and summary."""

    def __init__(self, workdir: str, model_description: Dict[str, Any]):
        self.workdir = os.path.abspath(workdir)
        self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        self.model_description = model_description
        self._check_model(model_description)
        self.manager = ocp.CheckpointManager(
            self.checkpoint_dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=KEPT_TRAINING_CHECKPOINTS, create=True))

    def _check_model(self, description: Dict[str, Any]) -> None:
        path = os.path.join(self.workdir, "run.json")
        if os.path.exists(path):
            with open(path) as handle:
                previous = experiment.complete(json.load(handle))  # fields added since: defaults
            changed = sorted(k for k in set(previous) | set(description)
                             if previous.get(k) != description.get(k))
            if changed:
                detail = "; ".join(f"{k}: {previous.get(k)!r} there, {description.get(k)!r} now"
                                   for k in changed)
                raise ValueError(f"--workdir {self.workdir} holds a run of another model "
                                 f"({detail}). Use a new --workdir, or the same model config.")
        elif jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            write_json(path, description)
        parallel.barrier(f"run_directory:{self.workdir}")  # run.json exists for everyone

    def restore_latest(self, state: Any) -> Tuple[Any, Dict[str, float]]:
        """(state, best scores) from the newest intact checkpoint, or the given state and {}.

        Damaged checkpoints newer than the one restored are moved to `damaged/` (with a
        warning naming each and why), so training goes on from the intact one. When none is
        intact, nothing is moved and the error says what to do.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                state, best = self._restore_step(step, state)
            except DamagedCheckpoint as error:
                damaged.append((step, error))
                continue
            self._set_aside(damaged)
            return state, best
        if damaged:
            reasons = " ".join(str(error) for _, error in damaged)
            raise DamagedCheckpoint(f"No intact training checkpoint in {self.checkpoint_dir}: "
                                    f"{reasons} Move {self.checkpoint_dir} away to train from "
                                    f"the start (best_*/ are kept), or restore it from a copy.")
        return state, {}

    def _restore_step(self, step: int, state: Any) -> Tuple[Any, Dict[str, float]]:
        step_dir = os.path.join(self.checkpoint_dir, str(step))
        what = f"training checkpoint {step_dir}"
        checksums_dir = os.path.join(step_dir, "checksums")
        items = {"best": ocp.args.JsonRestore()}
        if os.path.isdir(checksums_dir):
            items["checksums"] = ocp.args.JsonRestore()
        try:
            with _reading_quietly():
                stored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise DamagedCheckpoint(f"{what} is damaged: its JSON items cannot be read "
                                    f"({_first_line(error)}).") from None
        recorded = stored.get("checksums") if "checksums" in items else None
        best = stored["best"]
        if recorded is None:
            if parallel.is_main_process():
                print(f"warning: {what} has no checksums (written before fpcm-jax recorded "
                      f"them); it is loaded unverified.", file=sys.stderr)
        elif not isinstance(recorded, dict) or not isinstance(recorded.get("arrays"), dict):
            raise DamagedCheckpoint(f"{what} is damaged: its checksums cannot be read.")
        else:
            _check_checksums({"best": json_checksum(best)}, {"best": recorded.get("best")}, what)
        restored = _restore_tree(os.path.join(step_dir, "state"), what,
                                 recorded and recorded["arrays"], state,
                                 f"{what} (of --workdir {self.workdir})",
                                 lambda _: jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        if recorded is not None:
            _check_checksums(array_checksums(restored), recorded["arrays"], what)
        return restored, dict(best or {})

    def _set_aside(self, damaged: List[Tuple[int, DamagedCheckpoint]]) -> None:
        """Move damaged checkpoints out of the manager's way (a step saved again later must
        not find its damaged namesake), keeping them for inspection."""
        if not damaged:
            return
        aside = os.path.join(self.workdir, "damaged")
        if parallel.is_main_process():
            os.makedirs(aside, exist_ok=True)
            for step, error in damaged:
                target = os.path.join(aside, f"checkpoint_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(os.path.join(self.checkpoint_dir, str(step)), target)
                print(f"warning: skipped {error} Moved it to {target}; resuming from an older "
                      f"checkpoint.", file=sys.stderr)
        parallel.barrier(f"set_aside:{self.workdir}")
        self.manager.reload()

    def save_latest(self, state: Any, best: Dict[str, float]) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        best = dict(best)
        checksums = {"arrays": array_checksums(state), "best": json_checksum(best)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best=ocp.args.JsonSave(best),
            checksums=ocp.args.JsonSave(checksums)))
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
            write_json(os.path.join(self.workdir, "summary.json"), summary)

    def listing(self) -> List[str]:
        names = ["checkpoints", *reversed(BEST_CHECKPOINTS)]
        return [os.path.join(self.workdir, n) for n in names
                if os.path.exists(os.path.join(self.workdir, n))]
