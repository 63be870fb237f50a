"""Export a checkpoint and evaluation points for the reference PyTorch tools.

    .venv/bin/python benchmarks/reference/export_for_reference.py --config configs/tiny.py \
        --checkpoint runs/x/best_robust --split train --num-examples 500 --out export.npz

Writes the official-layout state_dict (`state/<name>`), the images x (NHWC in [0, 1]), the
labels y, and fpcm-jax's logits on them (to check that both frameworks see the same model).
The model comes from the checkpoint's model.json; the config gives the data. Config overrides
go after the flags as --config.x=y would in main.py: --override data.validation_size=100.
"""

import argparse
import ast
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from fpcm_jax import parallel  # noqa: E402
from fpcm_jax.data import datasets
from fpcm_jax.runs import convert, loading


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["test", "validation", "train"])
    parser.add_argument("--num-examples", type=int, default=500)
    parser.add_argument("--override", action="append", default=[], help="section.key=value")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("experiment_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in args.override:
        name, value = item.split("=", 1)
        section, key = name.split(".")
        config[section][key] = ast.literal_eval(value)
    parallel.setup()
    model, variables, info, _ = loading.load_model(args.checkpoint)  # its model.json
    splits = datasets.load_for(config)
    chosen = dict(zip(["train", "validation", "test"], splits))[args.split]
    x = datasets.to_float(chosen.images[:args.num_examples])
    logits = model.apply(variables, x, train=False, progress=1.0)
    write_export(args.out, variables, x, chosen.labels[:args.num_examples], info["num_classes"],
                 logits)


def write_export(path, variables, x, y, num_classes, logits):
    """The npz the reference scripts read: the weights in the official layout (`state/<name>`),
    the points x (NHWC in [0, 1]), labels y, and fpcm-jax's logits on them."""
    state = {f"state/{k}": v for k, v in convert.to_official(variables).items()}
    np.savez(path, x=np.asarray(x), y=np.asarray(y), num_classes=num_classes,
             jax_logits=np.asarray(logits), **state)
    print(f"Wrote {path}: {len(state)} tensors, {len(x)} points.", file=sys.stderr)


if __name__ == "__main__":
    main()
