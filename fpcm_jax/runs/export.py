"""`main.py --mode export`: a trained model as the official PyTorch class's state_dict.

    python main.py --config configs/cifar10_resnet18.py --mode export \
        --checkpoint runs/r18 --out r18.pt

`out` ending in .npz holds numpy arrays named as the state_dict; .pt/.pth is the file torch.save
writes for that state_dict (written by `torch_zip`, no PyTorch needed), which
`torch.load(out, weights_only=True)` reads. `<out>.json` beside it describes the model (its
`model.json`).
"""

from __future__ import annotations

import os
from typing import Any, Dict

import jax
import numpy as np

from fpcm_jax import models, parallel
from fpcm_jax.runs import checkpoint, convert, loading, torch_zip
from fpcm_jax.models import imported
from fpcm_jax.files import write_json, written_whole


def export(checkpoint_path: str, out: str) -> Dict[str, Any]:
    """Write a checkpoint's model to `out` and `<out>.json`; returns the model description."""
    if not out.endswith(convert.OFFICIAL_FILE_SUFFIXES):
        raise ValueError(f"--out {out!r} must end in .pt, .pth or .npz.")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose another --out or delete it first.")
    first = loading.model_checkpoints(checkpoint_path)[0]
    _check_exportable(checkpoint.read_model_info(first), first)  # before loading anything
    model, variables, info, directory = loading.load_model(checkpoint_path)
    _check_exportable(info, directory)
    state = convert.to_official(jax.device_get(variables))
    if parallel.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        write_json(out + ".json", {**info, "exported_from": directory})
        with written_whole(out, "wb") as handle:
            if out.endswith(".npz"):
                np.savez(handle, **state)
            else:
                torch_zip.save(handle, state)
    return info


def _check_exportable(info: Dict[str, Any], directory: str) -> None:
    """Only the registry's models with a learned alpha have an official PyTorch class."""
    if imported.is_import_path(info["name"]):
        raise ValueError(f"{directory} holds {info['name']}, your own model: --mode export "
                         f"writes the official PyTorch classes' state_dict, which exists for "
                         f"the registry's models only ({', '.join(models.MODEL_NAMES)}).")
    if info.get("fpcm_alpha") is not None:
        raise ValueError(f"{directory} holds a model with FPCM's alpha fixed at "
                         f"{info['fpcm_alpha']}: the official PyTorch classes always learn "
                         f"alpha, so it has no official state_dict to export.")
