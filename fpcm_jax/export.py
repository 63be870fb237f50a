"""`main.py --mode export`: a trained model as the official PyTorch class's state_dict.

    python main.py --config configs/cifar10_resnet18.py --mode export \
        --checkpoint runs/r18 --out r18.pt

`out` ending in .npz holds numpy arrays named as the state_dict; .pt/.pth holds torch tensors
(needs torch). `<out>.json` beside it describes the model (its `model.json`).
"""

from __future__ import annotations

import os
from typing import Any, Dict

import jax
import numpy as np

from fpcm_jax import convert, loading, parallel
from fpcm_jax.files import write_json, written_whole


def _torch_for(out: str):
    """torch when `out` asks for a .pt/.pth file (None for .npz), or a clear error."""
    if out.endswith(".npz"):
        return None
    try:
        import torch
    except ImportError:
        raise ImportError(f"Writing {out} needs PyTorch (`pip install torch`); or write "
                          f"--out model.npz, which torch reads as shown in the README.") from None
    return torch


def export(checkpoint_path: str, out: str) -> Dict[str, Any]:
    """Write a checkpoint's model to `out` and `<out>.json`; returns the model description."""
    if not out.endswith(convert.OFFICIAL_FILE_SUFFIXES):
        raise ValueError(f"--out {out!r} must end in .pt, .pth or .npz.")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose another --out or delete it first.")
    torch = _torch_for(out)
    model, variables, info, directory = loading.load_model(checkpoint_path)
    state = convert.to_official(jax.device_get(variables))
    if parallel.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        write_json(out + ".json", {**info, "exported_from": directory})
        with written_whole(out, "wb") as handle:
            if torch is None:
                np.savez(handle, **state)
            else:
                torch.save({name: torch.from_numpy(value) for name, value in state.items()},
                           handle)
    return info
