"""Loading a trained model: the one way, for evaluation, analysis and export.

`load_model` takes a model checkpoint, a run directory (its best_robust/, else best_sum/) or an
official PyTorch file, builds the model from the checkpoint's own description (`model.json`,
never from a config, so what is evaluated is the function that was trained) and restores its
variables for the devices present now.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from fpcm_jax import experiment, models, parallel
from fpcm_jax.runs import checkpoint, convert, run_dir
from fpcm_jax.models import imported
from fpcm_jax.quiet_reads import first_line

INFO = checkpoint.MODEL_INFO_FILE


def model_checkpoints(path: str, flag: str = "--checkpoint") -> List[str]:
    """The model checkpoints `path` names, in the order to try: `path` itself, or a run
    directory's best models (best_robust/, then best_sum/). A best model whose replacement
    was interrupted between its two renames is found under its `.old` name."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, INFO)):
        return [path]
    found = []
    for name in run_dir.BEST_CHECKPOINTS:
        for candidate in (os.path.join(path, name), os.path.join(path, name + ".old")):
            if os.path.exists(os.path.join(candidate, INFO)):
                found.append(candidate)
                break
    if not found:
        raise FileNotFoundError(
            f"No model checkpoint at {path}: neither its {INFO} nor a best "
            f"checkpoint (best_robust/ or best_sum/) of a training run. Train there first or "
            f"pass {flag} PATH (a run directory, or a directory written by "
            f"`python -m fpcm_jax.runs.convert`).")
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
    description of its model (`experiment.official_description`) unless the file has the
    `<file>.json` that --mode export writes beside it; it is converted on the fly.
    """
    if os.path.isfile(path) and official is not None:
        return _load_official_file(path, mesh, official, dtype, fpcm_lowpass)
    candidates = model_checkpoints(path, flag)
    for index, directory in enumerate(candidates):
        try:
            return _load_model_from(directory, mesh, overrides, dtype, fpcm_lowpass)
        except checkpoint.DamagedCheckpoint as error:
            if index + 1 == len(candidates):
                raise
            if not allow_fallback:
                raise checkpoint.DamagedCheckpoint(
                    f"{error} Pass --allow_fallback to load {candidates[index + 1]} "
                    f"instead.") from None
            if parallel.is_main_process():
                print(f"warning: {error} Loading {candidates[index + 1]} instead "
                      f"(--allow_fallback).", file=sys.stderr)
    raise AssertionError("unreachable")


def _load_official_file(path: str, mesh, description: Dict[str, Any], dtype: str,
                        fpcm_lowpass: str) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    path = os.path.abspath(path)
    if imported.is_import_path(description["name"]):
        raise ValueError(f"{path} is an official PyTorch checkpoint, which holds one of the "
                         f"official models ({', '.join(models.MODEL_NAMES)}), not "
                         f"{description['name']}: evaluate it with a registry model name.")
    if not path.endswith(convert.OFFICIAL_FILE_SUFFIXES):
        raise ValueError(f"{path} is a file but not an official checkpoint (.pt, .pth, .npz); "
                         f"pass a checkpoint directory or a run directory.")
    description = {**_companion_description(path, description), "source": path}
    model = experiment.model_from_description(description, dtype, fpcm_lowpass)
    variables = convert.from_official(path, model)
    sharding = parallel.replicated(mesh or parallel.make_mesh())
    variables = jax.tree.map(lambda leaf: parallel.global_array(np.asarray(leaf), sharding),
                             variables)
    return model, variables, description, path


def _companion_description(path: str, assumed: Dict[str, Any]) -> Dict[str, Any]:
    """The model an official-format file holds: its `<file>.json` (written by --mode export)
    when there is one, else `assumed` (the official model the config names)."""
    companion = path + ".json"
    if not os.path.exists(companion):
        return assumed
    try:
        with open(companion) as handle:
            return experiment.complete(json.load(handle))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{companion} does not describe a model ({first_line(error)}); "
                         f"move it away to read {path} as the config's model.") from None


def _load_model_from(directory: str, mesh, overrides: Optional[Dict[str, Any]], dtype: str,
                     fpcm_lowpass: str) -> Tuple[Any, Dict[str, Any], Dict[str, Any], str]:
    info = checkpoint.read_model_info(directory)
    try:
        description = experiment.complete(info)
    except (KeyError, TypeError, ValueError) as error:
        raise checkpoint.DamagedCheckpoint(f"checkpoint {directory} is damaged: its {INFO} "
                                f"does not describe a model ({first_line(error)}).") from None
    for field, value in sorted((overrides or {}).items()):
        if field in experiment.HOW_COMPUTED or field not in description:
            continue
        stored = description[field]
        if experiment.normalized_field(value) != experiment.normalized_field(stored):
            raise ValueError(f"--config.model.{field}={value!r} contradicts the checkpoint's "
                             f"{INFO} ({field}={stored!r} in {directory}): the model "
                             f"is built from the checkpoint. Drop the flag, or choose another "
                             f"--checkpoint.")
    model = experiment.model_from_description(description, dtype, fpcm_lowpass)
    warning = experiment.code_warning(description)
    if warning and parallel.is_main_process():
        print(f"warning: {warning}", file=sys.stderr)
    variables = checkpoint.restore_variables(directory, info, models.variables_template(model),
                                             mesh)
    return model, variables, info, directory



