"""The one place that talks to orbax: saving and restoring model variables.

A model checkpoint is a directory holding `variables/` (an orbax PyTree checkpoint of
{'params', 'batch_stats'}) and `model.json` (which model it belongs to). `model.json` is
written last, so a directory without it is incomplete and is never loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_INFO_FILE = "model.json"
VARIABLES_DIR = "variables"


def save_variables(directory: str, variables: Dict[str, Any], model_info: Dict[str, Any]) -> None:
    """Write variables and their model description to a new directory."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another --out "
                              f"or delete it first.")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_DIR), dict(variables))
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, MODEL_INFO_FILE), "w") as handle:
        json.dump(model_info, handle, indent=2)


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
