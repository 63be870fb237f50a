"""Official PyTorch FPCM checkpoints (state_dict) -> Flax variables, and a CLI to save them.

    variables = convert.from_official("ResNet18-CIFAR10-PGD.pt", models.create("resnet18"))
    python -m fpcm_jax.runs.convert official.pt --model resnet18 --out DIR [--num-classes 10]

Accepts a dict of arrays, an .npz whose keys are the state_dict names, or a .pt/.pth file as
torch.save writes it, read without PyTorch by `torch_zip` (tensors and dicts only; no pickled
code is run). Our module names mirror the official ones with '.' written '_'
('layer1.0.shortcut.0' is 'layer1_0/shortcut_0'), so each Flax leaf names its PyTorch key.
A `module.` prefix (DataParallel) is removed; `learnable_freq_control` (unused by the official
model) and `num_batches_tracked` are skipped; anything missing, left over or of the wrong
shape stops with an error naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Mapping, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from fpcm_jax import experiment, models, parallel
from fpcm_jax.runs import checkpoint, torch_zip

OFFICIAL_FILE_SUFFIXES = (".pt", ".pth", ".npz")
IGNORED_SUFFIXES = ("learnable_freq_control", "num_batches_tracked")
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


class ConversionError(ValueError):
    """The checkpoint does not fit the model (a key missing, unexpected or mis-shaped)."""


def torch_key(collection: str, path: Tuple[str, ...]) -> str:
    """The official state_dict key of one Flax leaf, e.g. ('layer1_0', 'conv1', 'kernel')."""
    modules = [name.replace("_", ".") for name in path[:-1]]
    return ".".join(modules + [_LEAF_NAMES[(collection, path[-1])]])


def to_flax_layout(value: np.ndarray, target_shape: Tuple[int, ...], key: str) -> np.ndarray:
    """PyTorch layout -> Flax: OIHW -> HWIO, (out, in[, 1]) -> (in, out), (C, 1, 1) -> (C,)."""
    original = np.asarray(value, dtype=np.float32)
    value, rank = original, len(target_shape)
    if value.ndim > rank and all(size == 1 for size in value.shape[rank:]):
        value = value.reshape(value.shape[:rank])  # Conv1d kernels of size 1
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
        value = value.T
    if tuple(value.shape) != tuple(target_shape):
        raise ConversionError(f"Checkpoint entry {key!r} has shape {original.shape}, which does "
                              f"not fit the model's {tuple(target_shape)} (Flax layout): is this "
                              f"checkpoint from another model or number of classes?")
    return value


def load_state_dict(source: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
    """A state_dict as {name: numpy array} from a dict, an .npz or a torch .pt/.pth file."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No checkpoint file at {path!r}.")
        if path.endswith(".npz"):
            with np.load(path) as archive:
                state = {name: archive[name] for name in archive.files}
        else:
            state = torch_zip.load(path)
            if not isinstance(state, Mapping):
                raise ConversionError(f"{path} holds a {type(state).__name__}, not a state_dict "
                                      f"(a dict of tensors).")
    for wrapper in ("state_dict", "model", "net"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    return {_strip_prefix(name): _to_numpy(value) for name, value in state.items()}


def _strip_prefix(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_official(source: Union[str, os.PathLike, Mapping[str, Any]], model: nn.Module,
                  image_size: int = 32) -> Dict[str, Any]:
    """Official PyTorch state_dict -> {'params': ..., 'batch_stats': ...} for `model`."""
    state = load_state_dict(source)
    template = models.variables_template(model, image_size)
    used = set()
    variables: Dict[str, Any] = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(template.get(collection, {}))
        converted = {}
        for path, leaf in flat.items():
            key = torch_key(collection, path)
            if key not in state:
                raise ConversionError(f"Checkpoint has no entry {key!r}, which the model needs "
                                      f"for {collection}/{'/'.join(path)}: is it from another "
                                      f"model (resnet18 vs wrn, with vs without FPCM)?")
            converted[path] = jnp.asarray(to_flax_layout(state[key], leaf.shape, key))
            used.add(key)
        variables[collection] = traverse_util.unflatten_dict(converted)
    unexpected = sorted(name for name in state
                        if name not in used and not name.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(repr(name) for name in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ConversionError(f"Checkpoint entries the model does not have: {shown}{more}. Is it "
                              f"from another model (resnet18 vs wrn, with vs without FPCM)?")
    return variables


def to_official(variables: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Flax variables -> the official PyTorch state_dict as numpy arrays (the inverse of
    `from_official`), e.g. to run PyTorch tools such as the official AutoAttack on our models.

    Depthwise FPCM projections become (C, 1, 1), dense ones (C, C, 1), as the official Conv1d.
    The entries we do not keep are filled as the official model holds them, so that PyTorch
    loads the result with strict=True: each BatchNorm's `num_batches_tracked` as 0 (unused with
    momentum 0.1) and, beside a depthwise projection, the unused `learnable_freq_control` as
    its initial ones.
    """
    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(variables.get(collection, {})).items():
            key = torch_key(collection, path)
            state[key] = _to_torch_layout(np.asarray(value, np.float32), path)
            module = key.rsplit(".", 1)[0]
            if path[-1] == "mean":
                state[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
            if path[-2:] == ("projection", "kernel") and np.ndim(value) == 1:  # depthwise
                fpcm = module.rsplit(".", 1)[0]
                state[f"{fpcm}.learnable_freq_control"] = np.ones(np.shape(value), np.float32)
    return state


def _to_torch_layout(value: np.ndarray, path: Tuple[str, ...]) -> np.ndarray:
    """Flax -> PyTorch layout: HWIO -> OIHW, (in, out) -> (out, in), FPCM kernels as Conv1d."""
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
        value = value.T
    if path[-2:] == ("projection", "kernel"):
        value = value.reshape(value.shape + (1,) * (3 - value.ndim))
    return np.ascontiguousarray(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fpcm_jax.runs.convert",
        description="Convert an official PyTorch FPCM checkpoint to an fpcm-jax orbax checkpoint.")
    parser.add_argument("checkpoint", help="official .pt/.pth file (torch.save) or .npz")
    parser.add_argument("--model", required=True, help="resnet18, wrn-34-10, ...")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--no-fpcm", action="store_true", help="a baseline without FPCM")
    parser.add_argument("--out", required=True, help="directory for the orbax checkpoint")
    args = parser.parse_args(argv)

    parallel.setup()
    try:
        model_info = experiment.official_description(args.model, args.num_classes,
                                                     not args.no_fpcm,
                                                     os.path.abspath(args.checkpoint))
        model = experiment.model_from_description(model_info)
        variables = from_official(args.checkpoint, model)
        checkpoint.save_variables(args.out, variables, model_info)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    print(f"Wrote {args.out} ({args.model}, {count:,} parameters).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

