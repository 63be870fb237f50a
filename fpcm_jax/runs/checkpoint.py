"""Orbax I/O with checksums: the one place that reads and writes checkpoints.

A model checkpoint is a directory holding `variables/` (an orbax PyTree checkpoint of
{'params', 'batch_stats'}), `checksums.json` and `model.json` (the model's description,
`fpcm_jax.experiment`). `model.json` is written last, so a directory without it is incomplete
and is never loaded. Arrays are restored replicated over the devices present now, whatever
devices or hosts saved them. (`fpcm_jax.runs.loading.load_model` builds the model too: the one way
to load a trained model.)

A training checkpoint (`TrainingCheckpoints`, in a run's `checkpoints/`) holds the whole train
state and the best validation scores so far; the newest two are kept.

Integrity: every saved tree records a CRC-32 of each array's bytes (with its dtype and shape)
and of its JSON companions; loading recomputes them, and any difference, unreadable file or
missing array is a `DamagedCheckpoint` error naming the checkpoint (never a silently different
model). Resuming falls back to the newest intact training checkpoint and moves the damaged ones
to `damaged/`. Checkpoints written before checksums existed load unverified, with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from fpcm_jax import parallel
from fpcm_jax.files import write_json
from fpcm_jax.quiet_reads import first_line, reading_quietly

MODEL_INFO_FILE = "model.json"
CHECKSUMS_FILE = "checksums.json"
VARIABLES_DIR = "variables"
KEPT_TRAINING_CHECKPOINTS = 2  # the newest, and one to fall back to if it is damaged
# The phases of `save_variables`, in order: each is announced to `save_phase_hook` once done.
SAVE_PHASES = ("staging_ready", "arrays_written", "checksums_written", "complete",
               "previous_set_aside", "in_place")
# Test seam: a function called with each phase's name as a save passes it (tests cut a save
# there by raising or exiting); None, the default, costs one comparison per phase.
save_phase_hook: Optional[Callable[[str], None]] = None


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


def _check_checksums(found: Dict[str, str], recorded: Dict[str, str], what: str) -> None:
    differing = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
    if differing:
        raise DamagedCheckpoint(
            f"{what} is damaged: {differing[0]} does not match the checksum recorded when it "
            f"was saved ({len(differing)} of {len(recorded)} entries differ).")


def _reached(phase: str) -> None:
    if save_phase_hook is not None:
        save_phase_hook(phase)


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
    _reached("staging_ready")
    checksums = {"arrays": array_checksums(variables), MODEL_INFO_FILE: json_checksum(model_info)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    parallel.barrier(f"save_variables:written:{directory}")
    _reached("arrays_written")
    if main:
        write_json(os.path.join(staging, CHECKSUMS_FILE), checksums)
        _reached("checksums_written")
        write_json(os.path.join(staging, MODEL_INFO_FILE), model_info)
        _reached("complete")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)  # the previous checkpoint stays until the new one is in
        _reached("previous_set_aside")
        os.replace(staging, directory)
        _reached("in_place")
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(f"save_variables:done:{directory}")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedCheckpoint(f"{what} is damaged: {path} is not valid JSON "
                                f"({first_line(error)}).") from None


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
    return restore_variables(directory, model_info, template, mesh), model_info


def restore_variables(directory: str, model_info: Dict[str, Any],
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
        with reading_quietly(), ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path).item_metadata.tree
    except Exception as error:  # orbax, TensorStore or JSON errors, whatever the damage
        raise DamagedCheckpoint(f"{what} is damaged: its metadata in {path} cannot be read "
                                f"({first_line(error)}).") from None
    if recorded is not None:
        if set(_leaves_by_name(stored)) != set(recorded):
            raise DamagedCheckpoint(f"{what} is damaged: the arrays listed in {path} are not "
                                    f"those recorded when it was saved.")
    if template is not None:
        check_matches(stored, template, fits)
    try:
        with reading_quietly(), ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, make_target(stored))
    except Exception as error:
        raise DamagedCheckpoint(f"{what} is damaged: {path} cannot be read "
                                f"({first_line(error)}).") from None


def check_matches(variables: Dict[str, Any], template: Dict[str, Any], what: str) -> None:
    """Raise a clear error unless variables have the template's structure and shapes."""
    found = {name: tuple(leaf.shape) for name, leaf in _leaves_by_name(variables).items()}
    wanted = {name: tuple(leaf.shape) for name, leaf in _leaves_by_name(template).items()}
    for name in sorted(set(found) | set(wanted)):
        if found.get(name) != wanted.get(name):
            raise ValueError(f"{what} does not fit the model: {name} is "
                             f"{found.get(name, 'missing')} in the checkpoint, "
                             f"{wanted.get(name, 'absent')} in the model. Check --config.model.")




class TrainingCheckpoints:
    """A run's resumable train states (`<workdir>/checkpoints/`), the newest two kept, each
    with the best validation scores so far; damaged ones are set aside in `<workdir>/damaged/`."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=KEPT_TRAINING_CHECKPOINTS, create=True))

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
            raise DamagedCheckpoint(f"No intact training checkpoint in {self.directory}: "
                                    f"{reasons} Move {self.directory} away to train from "
                                    f"the start (best_*/ are kept), or restore it from a copy.")
        return state, {}

    def _restore_step(self, step: int, state: Any) -> Tuple[Any, Dict[str, float]]:
        step_dir = os.path.join(self.directory, str(step))
        what = f"training checkpoint {step_dir}"
        checksums_dir = os.path.join(step_dir, "checksums")
        items = {"best": ocp.args.JsonRestore()}
        if os.path.isdir(checksums_dir):
            items["checksums"] = ocp.args.JsonRestore()
        try:
            with reading_quietly():
                stored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise DamagedCheckpoint(f"{what} is damaged: its JSON items cannot be read "
                                    f"({first_line(error)}).") from None
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
                                 f"{what} (of --workdir {os.path.dirname(self.directory)})",
                                 lambda _: jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        if recorded is not None:
            _check_checksums(array_checksums(restored), recorded["arrays"], what)
        return restored, dict(best or {})

    def _set_aside(self, damaged: List[Tuple[int, DamagedCheckpoint]]) -> None:
        """Move damaged checkpoints out of the manager's way (a step saved again later must
        not find its damaged namesake), keeping them for inspection."""
        if not damaged:
            return
        aside = os.path.join(os.path.dirname(self.directory), "damaged")
        if parallel.is_main_process():
            os.makedirs(aside, exist_ok=True)
            for step, error in damaged:
                target = os.path.join(aside, f"checkpoint_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(os.path.join(self.directory, str(step)), target)
                print(f"warning: skipped {error} Moved it to {target}; resuming from an older "
                      f"checkpoint.", file=sys.stderr)
        parallel.barrier(f"set_aside:{self.directory}")
        self.manager.reload()

    def save(self, state: Any, best: Dict[str, float]) -> None:
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        best = dict(best)
        checksums = {"arrays": array_checksums(state), "best": json_checksum(best)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best=ocp.args.JsonSave(best),
            checksums=ocp.args.JsonSave(checksums)))
        self.manager.wait_until_finished()  # the next step donates the buffers being saved
