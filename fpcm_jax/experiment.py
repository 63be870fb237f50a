"""Models joined to datasets: the model a config or a checkpoint describes.

Models know nothing of datasets (input normalisation is a mean and std they are given); this
layer resolves them. A *model description* is the JSON that a run directory (`run.json`) and
every model checkpoint (`model.json`) hold: the config's model section without the fields that
only say how the model is computed (`HOW_COMPUTED`: the parameters are the same either way),
plus `num_classes` and `dataset`. Training, resume, evaluation, analysis and export all build
their model from a description, so they cannot disagree.

The threat model's checks live here too (`check_threat_model`, `check_radius_fits_norm`): both
training and evaluation check their radius and step with them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from flax import linen as nn

from fpcm_jax import attacks, models
from fpcm_jax.data import datasets, sources
from fpcm_jax.models import imported

HOW_COMPUTED = ("dtype", "fpcm_lowpass")
RESNET_ONLY = ("widths", "stage_sizes")
# The registry models' fields and their defaults (configs/default.py): a model given by import
# path takes its options from config.model.kwargs, so these must stay as they are.
REGISTRY_FIELDS = {"fpcm": True, "fpcm_variant": "tokens", "cutoff_start": 0.5,
                   "cutoff_end": 0.125, "fpcm_alpha": None, "activation": "relu",
                   "normalization": "none", "widths": None, "stage_sizes": None,
                   "stem": "cifar"}


def official_model_section(name: str) -> Dict[str, Any]:
    """The model fields an official checkpoint implies (as the authors' code builds it):
    ResNet-18 takes raw inputs and anneals the cutoff from P/2 to P/8; the WRN normalises with
    CIFAR-10 statistics and keeps P/8."""
    is_wrn = name.lower().startswith("wrn")
    return {"name": name, "fpcm": True, "fpcm_variant": "tokens",
            "cutoff_start": 0.125 if is_wrn else 0.5, "cutoff_end": 0.125,
            "normalization": "cifar10" if is_wrn else "none", "widths": None,
            "stage_sizes": None, "activation": "relu", "fpcm_alpha": None, "stem": "cifar"}


def official_description(name: str, num_classes: int, fpcm: bool = True,
                         source: str = "") -> Dict[str, Any]:
    """The description of an official PyTorch checkpoint of model `name` (a converted one's
    model.json, or what evaluating a .pt file directly assumes)."""
    return {**official_model_section(name), "fpcm": fpcm, "num_classes": num_classes,
            "dataset": None, "source": source}


def describe(config) -> Dict[str, Any]:
    """The description of the model that `config` trains (what `run.json` holds)."""
    description = json.loads(config.model.to_json())
    kwargs = description.pop("kwargs", None) or {}
    if imported.is_import_path(config.model.name):
        return describe_imported(description, kwargs, config.data)
    if kwargs:
        raise ValueError(f"--config.model.kwargs ({sorted(kwargs)}) applies to a model given "
                         f"by import path (package.module:Factory); {config.model.name} takes "
                         f"its options from config.model's own fields.")
    for how_computed in HOW_COMPUTED:
        description.pop(how_computed, None)
    for field in RESNET_ONLY:  # `--config.model.widths=()` unsets (a flag cannot give None)
        if not description.get(field):
            description[field] = None
    spec = datasets.spec_for(config.data)
    description["num_classes"] = spec.num_classes
    description["dataset"] = config.data.name
    description.update(own_data_record(config.data, spec))
    return description


def own_data_record(data_config, spec) -> Dict[str, Any]:
    """For your own data, what a model description records of it: the image size (building the
    model needs it) and where the data came from (`sources.Source.fingerprint`: source, splits,
    classes, file count and index digest), so a resume on other data is refused; {} for the
    registry's datasets."""
    if not sources.is_external(data_config.name):
        return {}
    return {"image_size": spec.image_size,
            "data": datasets.open_source(data_config).fingerprint}


def describe_imported(model_fields: Dict[str, Any], kwargs: Dict[str, Any],
                      data_config) -> Dict[str, Any]:
    """A model given by import path: the path, the keyword arguments its factory is called
    with, the dataset and where its code came from (`imported.code_fingerprint`)."""
    name = model_fields["name"]
    factory = imported.resolve(name)
    changed = [f"{field}={model_fields.get(field)!r}" for field, default in
               REGISTRY_FIELDS.items() if normalized_field(model_fields.get(field)) != default]
    if changed:
        raise ValueError(f"--config.model.{changed[0]} applies to the registry's models; "
                         f"{name} takes its options from config.model.kwargs (reset the "
                         f"field, e.g. in your config file).")
    spec = datasets.spec_for(data_config)
    kwargs = imported.plain_kwargs(kwargs, "config.model.kwargs")
    described = {"name": name, "kwargs": imported.call_kwargs(factory, kwargs, spec.num_classes),
                 "num_classes": spec.num_classes, "dataset": data_config.name,
                 "code": imported.code_fingerprint(name)}
    described.update(own_data_record(data_config, spec))
    return described


def give_way_to_import_path(config, given: Sequence[str]) -> Dict[str, Any]:
    """When config.model.name is an import path (your own model) named on the command line,
    the registry-model fields that the config file set (not in `given`, the model fields set on
    the command line) return to their defaults; returns those dropped with their values.
    Fields given on the command line stay, and `describe` refuses them."""
    if not imported.is_import_path(config.model.name) or "name" not in given:
        return {}
    dropped = {field: config.model[field] for field, default in REGISTRY_FIELDS.items()
               if field not in given and normalized_field(config.model[field]) != default}
    for field in dropped:
        config.model[field] = REGISTRY_FIELDS[field]
    return dropped


def normalized_field(value: Any) -> Any:
    """Sequences as tuples; an empty one is None (`--config.model.widths=()` unsets)."""
    return (tuple(value) or None) if isinstance(value, (list, tuple)) else value


def complete(description: Dict[str, Any]) -> Dict[str, Any]:
    """A description with every model field: those missing (checkpoints written by older
    versions of `fpcm_jax.runs.convert`) take the official model's values. A model given by import
    path is described whole already."""
    if imported.is_import_path(description["name"]):
        return dict(description)
    return {**official_model_section(description["name"]), **description}


def check_options(description: Dict[str, Any], dtype: str = "float32") -> None:
    """Clear errors for model options that the named model cannot take (for a model given by
    import path: its factory and call protocol, computing in `dtype`)."""
    if imported.is_import_path(description["name"]):
        _imported_model(description, dtype)
        return
    name = str(description["name"]).lower()
    if name not in models.RESNETS and not models.is_wide_resnet_name(name):
        raise ValueError(f"--config.model.name={description['name']!r} is not a model; valid "
                         f"names: {', '.join(models.MODEL_NAMES)}; a WideResNet's depth is "
                         f"6n+4.")
    if name not in models.RESNETS:
        given = [field for field in RESNET_ONLY if description.get(field)]
        if given:
            raise ValueError(f"--config.model.{given[0]} applies to the ResNets only; "
                             f"{description['name']} sets its widths by name (wrn-<depth>-"
                             f"<width>): unset it with --config.model.{given[0]}=().")
        if description.get("stem", "cifar") != "cifar":
            raise ValueError(f"--config.model.stem={description['stem']!r} applies to the "
                             f"ResNets only; {description['name']} has the CIFAR stem.")
    if description.get("stem", "cifar") not in models.STEMS:
        raise ValueError(f"--config.model.stem={description.get('stem')!r} is not valid; use "
                         f"one of {models.STEMS}.")
    for field in RESNET_ONLY:
        value = description.get(field)
        if value is not None and (len(value) != 4 or min(value) < 1):
            raise ValueError(f"--config.model.{field}={tuple(value)} must be four positive "
                             f"integers, one per stage.")
    alpha = description.get("fpcm_alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"--config.model.fpcm_alpha={alpha!r} must lie in [0, 1] (the weight "
                         f"of FPCM's low-pass part), or be unset for the learned alpha.")
    for field in ("cutoff_start", "cutoff_end"):
        value = description.get(field)
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"--config.model.{field}={value!r} must lie in (0, 1]: the cutoff "
                             f"D0 as a fraction of P (official: 0.5 to 0.125).")
    if description.get("activation") not in models.ACTIVATIONS:
        raise ValueError(f"--config.model.activation={description.get('activation')!r} is not "
                         f"valid; use one of {tuple(models.ACTIVATIONS)}.")
    if description.get("normalization") not in ("none", "cifar10", "dataset"):
        raise ValueError(f"--config.model.normalization={description.get('normalization')!r} "
                         f"is not valid; use one of ('none', 'cifar10', 'dataset').")


def model_from_description(description: Dict[str, Any], dtype: str = "float32",
                           fpcm_lowpass: str = "auto") -> nn.Module:
    """The Flax model a description names, computing in `dtype` with the given FPCM filter
    (registry models; one given by import path is built by its factory and its call protocol
    checked: `models.imported`)."""
    description = complete(description)
    if imported.is_import_path(description["name"]):
        return _imported_model(description, dtype)
    check_options(description)
    spec = spec_of(description)
    if description["normalization"] == "dataset" and spec is None:
        raise ValueError("The model normalises with its dataset's statistics, but its "
                         "description names no dataset.")
    mean, std = datasets.normalization(description["normalization"], spec)
    extra = {field: tuple(description[field]) for field in RESNET_ONLY if description[field]}
    if str(description["name"]).lower() in models.RESNETS:
        extra["stem"] = description.get("stem", "cifar")
    return models.create(description["name"], num_classes=description["num_classes"],
                         fpcm=description["fpcm"], fpcm_variant=description["fpcm_variant"],
                         cutoff_start=description["cutoff_start"],
                         cutoff_end=description["cutoff_end"], fpcm_lowpass=fpcm_lowpass,
                         fpcm_alpha=description["fpcm_alpha"],
                         activation=description["activation"],
                         dtype=models.compute_dtype(dtype), mean=mean, std=std, **extra)


def _imported_model(description: Dict[str, Any], dtype: str) -> nn.Module:
    name, recorded = description["name"], description.get("code") or {}
    try:
        model = imported.build(name, description.get("kwargs") or {},
                               models.compute_dtype(dtype))
    except imported.ModelProtocolError as error:
        where = (f" (the run recorded its code in {recorded.get('file')}, sha256 "
                 f"{str(recorded.get('sha256'))[:12]}...)" if recorded.get("file") else "")
        raise imported.ModelProtocolError(f"{error}{where}") from None
    spec = spec_of(description)
    imported.check_protocol(model, name, description["num_classes"],
                            spec.image_size if spec else 32)
    return model


def spec_of(description: Dict[str, Any]) -> Optional[datasets.DatasetSpec]:
    """The dataset spec a model description implies: the registry dataset's, or for your own
    data the recorded image size and classes (ImageNet statistics); None without a dataset."""
    dataset = description.get("dataset")
    if not dataset:
        return None
    if sources.is_external(dataset):
        return datasets.DatasetSpec(None, "", "", description["num_classes"],
                                    int(description.get("image_size") or 32),
                                    datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    return datasets.get_spec(dataset)


def code_warning(description: Dict[str, Any]) -> str:
    """'' or a sentence saying that an imported model's code changed since it was recorded."""
    if not imported.is_import_path(description.get("name", "")) or not description.get("code"):
        return ""
    return imported.code_changes(description["code"], description["name"]) or ""


def build(config) -> Tuple[nn.Module, datasets.DatasetSpec]:
    """(model, dataset spec) for an experiment config: its model on its dataset."""
    model = model_from_description(describe(config), config.model.dtype,
                                   config.model.fpcm_lowpass)
    return model, datasets.spec_for(config.data)


def largest_distance(norm: str, data_config) -> float:
    """The largest distance two images of config.data's dataset can have in `norm` (L-inf
    1; L2 sqrt(H W C)): a radius beyond it means nothing."""
    if norm == "linf":
        return 1.0
    size = datasets.spec_for(data_config).image_size
    return math.sqrt(size * size * 3)


EVAL_FLAGS = ("--norm", "--eps", "--step_size")
CONFIG_FLAGS = ("--config.attack.norm", "--config.attack.eps", "--config.attack.step_size")


def check_threat_model(norm: str, eps: Optional[float], step_size: Optional[float],
                       data_config, flags=EVAL_FLAGS) -> None:
    """norm one of attacks.NORMS, 0 < eps <= the largest distance of two images in that norm,
    0 <= step_size <= that distance (None: not given); `flags` name the three in errors."""
    if norm not in attacks.NORMS:
        raise ValueError(f"{flags[0]}={norm!r} is not a threat model; use one of "
                         f"{', '.join(attacks.NORMS)}.")
    bound = largest_distance(norm, data_config)
    dataset = data_config.name
    usual = "8/255 is 0.03137" if norm == "linf" else "0.5 is usual"
    for flag, value, interval in ((flags[1], eps, f"(0, {bound:.5g}]"),
                                  (flags[2], step_size, f"[0, {bound:.5g}]")):
        if value is None:
            continue
        low_ok = value > 0 if flag == flags[1] else value >= 0
        if not (low_ok and value <= bound and np.isfinite(value)):
            raise ValueError(f"{flag}={value} must lie in {interval} for the {norm} norm on "
                             f"{dataset} (the largest {norm} distance of two images is "
                             f"{bound:.5g}; {usual}).")


def check_radius_fits_norm(norm: str, eps: float, step_size: float,
                           flags=CONFIG_FLAGS) -> None:
    """Refuse an eps or step that is another norm's usual value, e.g. --config.attack.norm=l2
    left with L-inf's 8/255 (an L2 ball of radius 0.03 on 32x32x3 images is meaningless)."""
    for other in attacks.NORMS:
        if other == norm:
            continue
        for flag, value, usual in ((flags[1], eps, attacks.DEFAULT_EPS[other]),
                                   (flags[2], step_size, attacks.DEFAULT_STEP_SIZE[other])):
            if value is not None and math.isclose(value, usual, rel_tol=1e-9):
                raise ValueError(
                    f"{flags[0]}={norm} with {flag}={value:.6g}, the usual {other} value: "
                    f"give the {norm} radius and step too, e.g. {flags[1]}="
                    f"{attacks.DEFAULT_EPS[norm]:.6g} {flags[2]}="
                    f"{attacks.DEFAULT_STEP_SIZE[norm]:.6g} (as configs/cifar10_resnet18_l2.py"
                    f" does for l2).")
