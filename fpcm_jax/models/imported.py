"""Your own model, named by import path: `--config.model.name=package.module:Factory`.

The protocol, checked before any work (`check_protocol`):

    model = Factory(**config.model.kwargs)        # a flax.linen.Module, or a callable returning
                                                  # one, or a flax.nnx.Module class
    logits = model.apply(variables, x, train=False, progress=1.0)

- x: NHWC images with values in [0, 1] (normalise inside the model if you want to);
- train: bool, BatchNorm in training mode (batch statistics, the running ones updated in the
  `batch_stats` collection) or evaluation mode (the running ones);
- progress: training progress in [0, 1], traced (pass it to `FPCM(...)(x, progress)`; 1.0 in
  evaluation, the final cutoff);
- returns logits of shape (batch, num_classes);
- variables: `params` and, if the model has BatchNorm, `batch_stats`; nothing else (the
  training step would drop it). FPCM's alphas, sown into `intermediates`, are fine.

`num_classes` (the dataset's) and `dtype` (the compute dtype of `config.model.dtype`) are
passed to the factory when it takes them and `kwargs` does not give them. An NNX module class
is wrapped with `flax.nnx.bridge.ToLinen` (its `nnx.BatchStat`s are the `batch_stats`; it is
built with `rngs`), so it runs through the same pipeline; its `__call__` takes the same
(x, train, progress) and passes `use_running_average=not train` to its BatchNorms.

A run records the import path, the keyword arguments and where the code came from
(`code_fingerprint`: the module's file, the SHA-256 of every source file of its package and of
the package defining the model, the package's version), so evaluation
and resume rebuild the same function, and say so when the code changed or is gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

ALLOWED_COLLECTIONS = ("params", "batch_stats", "intermediates")
PLAIN_TYPES = (bool, int, float, str, type(None))


class ModelProtocolError(ValueError):
    """A model given by import path does not follow the protocol (the message says how)."""


def is_import_path(name: str) -> bool:
    """'package.module:Factory' (a model given by import path), not a registry name."""
    return ":" in str(name)


def resolve(import_path: str) -> Any:
    """The object `package.module:Attribute.Nested` names; a one-line error if it cannot be
    imported or is not there."""
    module_name, _, attribute = import_path.partition(":")
    if not module_name or not attribute:
        raise ModelProtocolError(f"--config.model.name={import_path!r} is not an import path: "
                                 f"give package.module:Factory.")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # any failure while importing the user's code
        raise ModelProtocolError(
            f"cannot import the model {import_path!r}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}; put its package on the "
            f"Python path (e.g. PYTHONPATH=.) or install it.") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelProtocolError(f"cannot import the model {import_path!r}: module "
                                     f"{module_name!r} has no {part!r}.")
        target = getattr(target, part)
    return target


def _takes(factory: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def is_nnx_class(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, nnx.Module)


def call_kwargs(factory: Any, kwargs: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """The keyword arguments the factory is called with: `kwargs`, plus num_classes when the
    factory takes it and kwargs does not give it."""
    kwargs = dict(kwargs)
    target = factory.__init__ if is_nnx_class(factory) else factory
    if "num_classes" not in kwargs and _takes(target, "num_classes"):
        kwargs["num_classes"] = num_classes
    return kwargs


def build(import_path: str, kwargs: Dict[str, Any], dtype: Any = jnp.float32) -> nn.Module:
    """The Linen module `Factory(**kwargs)` (an NNX class wrapped by `bridge.ToLinen`), with
    `dtype` when it is not float32 and the factory takes it."""
    factory = resolve(import_path)
    kwargs = dict(kwargs)
    target = factory.__init__ if is_nnx_class(factory) else factory
    if jnp.dtype(dtype) != jnp.float32 and "dtype" not in kwargs:
        if not _takes(target, "dtype"):
            raise ModelProtocolError(f"--config.model.dtype={jnp.dtype(dtype).name} needs a "
                                     f"model that takes `dtype`; {import_path} does not: "
                                     f"give it a dtype argument, or use float32.")
        kwargs["dtype"] = dtype
    if is_nnx_class(factory):
        return bridge.ToLinen(factory, kwargs=kwargs)
    if not callable(factory):
        raise ModelProtocolError(f"{import_path} is a {type(factory).__name__}, not a Flax "
                                 f"module class or a function returning a module.")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ModelProtocolError(f"{import_path}(**{kwargs}) failed: {error}; set "
                                 f"config.model.kwargs to its keyword arguments.") from None
    if not isinstance(model, nn.Module):
        raise ModelProtocolError(f"{import_path}(...) returned a {type(model).__name__}, not a "
                                 f"flax.linen.Module (NNX: name the nnx.Module class itself).")
    return model


def check_protocol(model: nn.Module, import_path: str, num_classes: int,
                   image_size: int) -> None:
    """Shapes only (`jax.eval_shape`, nothing computed): init, an eval-mode and a train-mode
    call on a batch of 2 images; a `ModelProtocolError` naming what is wrong."""
    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    if not (_takes(model.__call__, "train") and _takes(model.__call__, "progress")):
        raise ModelProtocolError(
            f"{import_path}: its __call__ must take (x, train, progress) as keywords; it takes "
            f"{_signature_text(model)}. See fpcm_jax/models/imported.py for the protocol.")
    init = _shapes(lambda: model.init({"params": jax.random.key(0),
                                       "dropout": jax.random.key(1)}, jnp.zeros(x.shape),
                                      train=False, progress=1.0), import_path, "init")
    extra = sorted(set(init) - set(ALLOWED_COLLECTIONS))
    if extra:
        raise ModelProtocolError(
            f"{import_path} has variable collection(s) {extra}, which the training step would "
            f"drop: only params and batch_stats are kept (intermediates are read by analysis).")
    variables = {k: v for k, v in init.items() if k in ("params", "batch_stats")}
    for train in (False, True):
        mutable = ["batch_stats"] if train else False
        rngs = {"dropout": jax.random.key(2)} if train else None  # as training passes it
        out = _shapes(lambda v, inputs: model.apply(v, inputs, train=train, progress=1.0,
                                                    mutable=mutable, rngs=rngs), import_path,
                      f"a call with train={train}", variables, x)
        logits = out[0] if train else out
        if not (hasattr(logits, "shape") and tuple(logits.shape) == (2, num_classes)):
            shape = getattr(logits, "shape", type(logits).__name__)
            raise ModelProtocolError(
                f"{import_path} returns {shape} for 2 images (train={train}); the protocol "
                f"wants logits of shape (batch, num_classes) = (2, {num_classes}).")


def _shapes(function: Callable, import_path: str, what: str, *args) -> Any:
    try:
        return jax.eval_shape(function, *args)
    except ModelProtocolError:
        raise
    except Exception as error:  # the user's code failed: report it in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelProtocolError(f"{import_path}: {what} failed ({type(error).__name__}: "
                                 f"{text[:200]}). See fpcm_jax/models/imported.py for the "
                                 f"protocol.") from None


def _signature_text(model: nn.Module) -> str:
    try:
        return str(inspect.signature(model.__call__))
    except (TypeError, ValueError):
        return "(unknown)"


def code_fingerprint(import_path: str) -> Dict[str, Any]:
    """Where the model's code came from: its module, file, the file's SHA-256, its top
    package's installed version (None where there is none), and `files`: the SHA-256 of every
    source file of the packages that hold the named module and the module defining the model
    (a re-exported class), so a change in a helper file of the same package is seen too."""
    module_name = import_path.partition(":")[0]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    path = getattr(module, "__file__", None)
    files: Dict[str, Optional[str]] = {}
    for name in _defining_modules(import_path, module_name):
        files.update({source: _file_sha256(source) for source in _package_files(name)})
    try:
        version = importlib.metadata.version(module_name.split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = None
    return {"module": module_name, "file": os.path.abspath(path) if path else None,
            "sha256": _file_sha256(path), "package_version": version, "files": files}


def _defining_modules(import_path: str, module_name: str) -> List[str]:
    """The named module and the one that defines what it names (they differ on a re-export)."""
    try:
        defined_in = getattr(resolve(import_path), "__module__", None)
    except ModelProtocolError:
        defined_in = None
    return [module_name] + ([defined_in] if defined_in and defined_in != module_name else [])


def _package_files(module_name: str) -> List[str]:
    """The .py files of module_name's top package (a module outside any package: its file)."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    top = sys.modules.get(module_name.split(".")[0])
    top_file = getattr(top, "__file__", None)
    if top_file and os.path.basename(top_file) == "__init__.py":
        root = os.path.dirname(os.path.abspath(top_file))
        return sorted(os.path.join(folder, name) for folder, subfolders, names in os.walk(root)
                      if "__pycache__" not in folder for name in names if name.endswith(".py"))
    path = getattr(module, "__file__", None)
    return [os.path.abspath(path)] if path else []


def _file_sha256(path: Optional[str]) -> Optional[str]:
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def code_changes(recorded: Dict[str, Any], import_path: str) -> Optional[str]:
    """A sentence naming each file of the model's code that differs from the recorded
    fingerprint (None when none does). Records from before `files` compare the module's
    file only."""
    now = code_fingerprint(import_path)
    if recorded.get("files") is not None:
        before, after = recorded["files"], now["files"]
        changed = [f"{path}: SHA-256 {before.get(path)} then, {after.get(path)} now"
                   for path in sorted(set(before) | set(after))
                   if before.get(path) != after.get(path)]
    else:
        changed = ([f"{now.get('file')}: SHA-256 {recorded.get('sha256')} then, "
                    f"{now.get('sha256')} now"] if recorded.get("sha256") != now["sha256"] else [])
    if recorded.get("package_version") != now["package_version"]:
        changed.append(f"package version {recorded.get('package_version')} then, "
                       f"{now['package_version']} now")
    if not changed:
        return None
    more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
    return (f"the code of the model {import_path} changed since it was recorded ("
            f"{'; '.join(changed[:3])}{more}): the function may differ from the one trained.")


def plain_kwargs(kwargs: Dict[str, Any], where: str) -> Dict[str, Any]:
    """kwargs if every value is a plain value a run can record (numbers, strings, booleans,
    None, and lists, tuples and dicts of them), else a one-line error naming the field."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return all(plain(item) for item in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return isinstance(value, PLAIN_TYPES)

    for name, value in kwargs.items():
        if not plain(value):
            raise ModelProtocolError(
                f"{where}.{name} holds a {type(value).__name__}, which a run cannot record; "
                f"give the model plain values (numbers, strings, booleans, None, tuples, "
                f"lists, dicts).")
    return dict(kwargs)


def describe_module(model: Any) -> Tuple[str, Dict[str, Any]]:
    """(import path, keyword arguments) that rebuild a Linen module instance: its class and
    its dataclass fields that differ from their defaults (and num_classes always, so that no
    dataset's number is put in its place); a one-line error if that does not rebuild it."""
    if not isinstance(model, nn.Module):
        raise ModelProtocolError(
            f"model={type(model).__name__}: pass a flax.linen.Module instance, e.g. "
            f"MyNet(width=16) (an NNX model: name its class in config.model.name).")
    cls = type(model)
    kwargs = {}
    for name, field in getattr(cls, "__dataclass_fields__", {}).items():
        if name in ("parent", "name") or not field.init:
            continue
        value = getattr(model, name)
        at_default = field.default is not dataclasses.MISSING and _same(value, field.default)
        if name == "num_classes" or not at_default:
            kwargs[name] = value
    import_path = f"{cls.__module__}:{cls.__qualname__}"
    kwargs = plain_kwargs(kwargs, "the model's field")
    if not _same(resolve(import_path)(**kwargs), model):
        raise ModelProtocolError(f"{import_path}(**{kwargs}) does not rebuild the model given; "
                                 f"name it in config.model.name and config.model.kwargs.")
    return import_path, kwargs


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:  # e.g. arrays: treat as differing
        return False
