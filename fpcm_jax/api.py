"""The Python entry points: train and evaluate without the command line, writing the same run
directories and reports as main.py.

    import fpcm_jax
    from configs import tiny
    summary = fpcm_jax.train_and_evaluate(tiny.get_config(), "runs/mine", model=MyNet(width=16))
    report = fpcm_jax.evaluate_model(tiny.get_config(), "runs/mine", ["pgd20", "autoattack"])
    report = fpcm_jax.evaluate_model(config, "runs/eval", ["pgd20"], model=net, variables=variables)

`model` is a Flax Linen module instance whose class can be imported (it is recorded as
`package.module:Class` with its fields, exactly as `--config.model.name` and
`config.model.kwargs` would give it, so a later `main.py --mode eval` or resume rebuilds it);
an NNX model is named by its class in `config.model.name`. The options are checked as
main.py checks them (`training.checks`, `evaluation.checks`), before any work. Several
processes: call `fpcm_jax.parallel.setup(...)` first, before anything touches JAX, as main.py
does.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import ml_collections

from fpcm_jax.training import checks as training_checks
from fpcm_jax.evaluation import checks as evaluation_checks
from fpcm_jax.evaluation import evaluate as evaluation
from fpcm_jax.training import train
from fpcm_jax.models import imported


def with_model(config: ml_collections.ConfigDict, model: Any = None
               ) -> ml_collections.ConfigDict:
    """A copy of config whose model.name and model.kwargs describe `model` (a Linen module
    instance); config itself when model is None."""
    if model is None:
        return config
    import_path, kwargs = imported.describe_module(model)
    changed = copy.deepcopy(config)  # keeps the typed FieldReferences the run record writes
    with changed.unlocked():
        changed.model.name = import_path
        changed.model.kwargs = ml_collections.ConfigDict(kwargs)
    return changed


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       model: Any = None) -> Dict[str, Any]:
    """Train (or resume) in `workdir` as `main.py --mode train` does; returns the summary."""
    config = with_model(config, model)
    training_checks.check_training(config)
    return train.train_and_evaluate(config, workdir)


# The options of evaluate_model that main.py's --mode eval checks too (its flags' names).
CHECKED_OPTIONS = ("num_examples", "batch_size", "eps", "step_size", "norm", "split")


def evaluate_model(config: ml_collections.ConfigDict, workdir: str,
                   attacks: Sequence[str] = ("pgd20",), checkpoint: Optional[str] = None,
                   model: Any = None, variables: Optional[Dict[str, Any]] = None,
                   corruptions: Optional[Sequence[str]] = None,
                   severities: Optional[Sequence[int]] = None, **options) -> Dict[str, Any]:
    """`main.py --mode eval`: the attacks on a checkpoint (default: the workdir's best model),
    or on `model` with its `variables` given here; writes the report into workdir and returns
    it. options: num_examples, batch_size, eps, step_size, norm, seed, split (as main.py's
    flags), autoattack_options; corruptions and severities choose what the `corruptions`
    evaluation covers. Every option is checked as main.py checks it (the same function)."""
    if (model is None) != (variables is None):
        raise ValueError("Give both model and variables (or neither, to load a checkpoint).")
    names = evaluation_checks.check_evaluation(
        config, ",".join(attacks), corruption_names=corruptions, severities=severities,
        **{name: options[name] for name in CHECKED_OPTIONS if name in options})
    given = None
    if model is not None:
        try:
            import_path, kwargs = imported.describe_module(model)
        except imported.ModelProtocolError:  # evaluating needs no rebuild: name it only
            import_path, kwargs = f"{type(model).__module__}:{type(model).__qualname__}", None
        given = (model, variables, {"name": import_path, "kwargs": kwargs, "given": "Python"})
    return evaluation.run_evaluation(config, workdir, names, checkpoint, given=given,
                                     corruption_options={"names": corruptions,
                                                         "severities": severities}, **options)
