"""`main.py --mode eval`: a trained model under each attack, a table and a JSON report.

The model comes from its checkpoint (`loading.load_model`), the accuracy over the split from
`accuracy` (or AutoAttack's own per-point bookkeeping). Each report is named by its
settings, `eval_<split>_<attacks>_<norm>-eps<eps>[_step<step>]_n<count>[_seed<seed>].json`,
written whole, appended to the workdir's `evaluations.jsonl`, and while attacks run, what is
finished is in `<report>.partial.json`. Each attack's entry holds the largest perturbation (in
the threat model's norm) that it produced; an adversarial example outside the eps-ball or
[0, 1] stops the evaluation with an error (`accuracy.PerturbationError`; a NaN or infinite example or logit is an
`attacks.NonFiniteError`), as no figure from it could be
trusted.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from fpcm_jax import attacks, experiment, parallel, progress
from fpcm_jax.data import corruptions, datasets, sources
from fpcm_jax.evaluation import accuracy, autoattack_eval, corruption_eval
from fpcm_jax.reports import plots
from fpcm_jax.runs import loading
from fpcm_jax.files import append_json_line, write_json

AUTOATTACK_NAMES = ("autoattack",) + attacks.STANDARD  # run with AutoAttack's bookkeeping
CORRUPTIONS = "corruptions"  # common corruptions (CIFAR-10-C, CIFAR-100-C), not an attack
SPLITS = ("test", "validation", "train", "cifar10.1")


def run_evaluation(config, workdir: str, attack_names: List[str],
                   checkpoint_path: Optional[str] = None, num_examples: Optional[int] = None,
                   batch_size: Optional[int] = None, eps: Optional[float] = None,
                   seed: int = 0, split: str = "test",
                   autoattack_options: Optional[Dict[str, int]] = None,
                   step_size: Optional[float] = None,
                   model_overrides: Optional[Dict[str, Any]] = None,
                   allow_fallback: bool = False, norm: Optional[str] = None,
                   given: Optional[Tuple[Any, Dict[str, Any], Dict[str, Any]]] = None,
                   corruption_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Evaluate a checkpoint on a split under each attack; print a table, write a JSON report.

    The options are those `checks.check_evaluation` accepts. The model comes from the
    checkpoint (`loading.load_model`: its model.json), the data from config.data;
    `model_overrides` are model fields given on the command line, which must agree with the
    checkpoint; `allow_fallback` evaluates best_sum/ when best_robust/ is damaged. norm
    defaults to config.attack.norm; eps and step_size to config.attack's in that norm, else to
    the norm's usual ones (`attacks.DEFAULT_EPS`, `attacks.DEFAULT_STEP_SIZE`).
    autoattack_options (n_iter, n_queries, n_target_classes) depart from the published parameters: for quick checks only; the report
    records them. given: (model, variables, description) to evaluate instead of a checkpoint
    (the Python entry point `fpcm_jax.evaluate_model`). corruption_options: {'names',
    'severities'} of the `corruptions` evaluation (default: all).
    """
    settings = {**threat_model(config, norm, eps, step_size),
                "batch_size": batch_size or config.eval.batch_size,
                "autoattack": dict(autoattack_options or {}),
                "fitted_batches": config.eval.get("autoattack_fitted_batches", True),
                "corruptions": dict(corruption_options or {})}
    mesh = parallel.make_mesh()
    if given is not None:
        model, variables, info, path = _given_model(config, *given, mesh)
    else:
        model, variables, info, path = _load_for_dataset(config, checkpoint_path or workdir,
                                                         mesh, model_overrides, allow_fallback)
    subset = _subset(config, split, num_examples)
    report = _new_report(config, info, path, split, len(subset), settings, seed, attack_names)
    report_path = os.path.join(workdir, report_name(report, attack_names,
                                                    settings["step_size"]))
    main = parallel.is_main_process()
    key = jax.random.key(seed)
    for index, name in enumerate(attack_names):
        start = time.time()
        attack_key = jax.random.fold_in(key, index)
        if name in AUTOATTACK_NAMES:
            entry = autoattack_eval.run(name, model, variables, subset, attack_key, settings,
                                        mesh, _partial_writer(name, report, report_path))
            report["warnings"] += [f"{name}: {w}" for w in entry.pop("warnings")]
        elif name == CORRUPTIONS:
            entry = _run_corruptions(config, model, variables, subset, attack_key, settings,
                                     mesh, report, report_path)
        else:
            entry = _run_attack(name, model, variables, subset, attack_key, settings, mesh)
        entry["seconds"] = round(time.time() - start, 2)
        images = (len(subset) if name != CORRUPTIONS else entry["examples_per_cell"] *
                  (1 + sum(len(cells) for cells in entry["cells"].values())))
        entry["images_per_second"] = round(images / max(entry["seconds"], 1e-9), 2)
        report["attacks"][name] = entry
        if main and index + 1 < len(attack_names):
            _write_partial(report_path, report)
    if main:
        _print_table(report)
        if CORRUPTIONS in report["attacks"]:
            report["figures"] = plots.corruption_figures(
                {info.get("name", "model"): report["attacks"][CORRUPTIONS]},
                report_path[:-len(".json")] + ".png")
        report["report_path"] = _write_report(report_path, report)
    return report


def _new_report(config, info: Dict[str, Any], path: str, split: str, examples: int,
                settings: Dict[str, Any], seed: int, attack_names: List[str]) -> Dict[str, Any]:
    """The report's fields before any attack has run."""
    report = {"model": {**experiment.complete(info), "dtype": config.model.dtype},
              "checkpoint": path, "checkpoint_info": info, "dataset": config.data.name,
              "split": split, "examples": examples, "norm": settings["norm"],
              "eps": settings["eps"], "seed": seed,
              "batch_size": settings["batch_size"], "devices": jax.device_count(),
              "processes": jax.process_count(), "attacks": {}, "warnings": []}
    if CORRUPTIONS in attack_names:
        names, severities = corruptions.check_request(
            config.data.name, settings["corruptions"].get("names"),
            settings["corruptions"].get("severities"))
        report["corruptions"] = {"names": list(names), "severities": list(severities)}
    return report


def _run_corruptions(config, model, variables, subset: datasets.Split, key, settings, mesh,
                     report: Dict[str, Any], report_path: str) -> Dict[str, Any]:
    """Accuracy under each corruption and severity (`corruption_eval`); after each corruption,
    what is done goes into the partial report."""
    names, severities = report["corruptions"]["names"], report["corruptions"]["severities"]

    def after_each(entry):
        if parallel.is_main_process():
            report["attacks"][CORRUPTIONS] = {**entry, "complete": False}
            _write_partial(report_path, report)

    return corruption_eval.evaluate(config, model, variables, subset, names, severities,
                                    settings["batch_size"], key, mesh, after_each)


def threat_model(config, norm: Optional[str], eps: Optional[float],
                 step_size: Optional[float]) -> Dict[str, Any]:
    """{norm, eps, step_size} of an evaluation: the given ones, else config.attack's when the
    norm is the config's, else the norm's usual radius and step."""
    norm = config.attack.norm if norm is None else norm
    same = norm == config.attack.norm
    if eps is None:
        eps = config.attack.eps if same else attacks.DEFAULT_EPS[norm]
    if step_size is None:
        step_size = config.attack.step_size if same else attacks.DEFAULT_STEP_SIZE[norm]
    return {"norm": norm, "eps": eps, "step_size": step_size}


def _load_for_dataset(config, path: str, mesh, model_overrides, allow_fallback: bool):
    """(model, variables, info, path) of the checkpoint, which must classify the config's
    dataset; an official PyTorch file is read as the config's model."""
    spec = datasets.spec_for(config.data)
    official = experiment.official_description(config.model.name, spec.num_classes,
                                               config.model.fpcm)
    model, variables, info, path = loading.load_model(
        path, mesh, model_overrides, config.model.dtype, config.model.fpcm_lowpass,
        allow_fallback, official=official)
    recorded = info.get("data") or {}
    if recorded and sources.is_external(config.data.name):
        classes = list(datasets.open_source(config.data).classes)
        if recorded.get("classes") != classes:
            raise ValueError(f"The checkpoint {path} was trained on {recorded.get('source')} "
                             f"with the classes {recorded.get('classes')}; "
                             f"{config.data.name} has {classes}: its labels mean other "
                             f"classes. Evaluate it on data with the same classes.")
    if info["num_classes"] != spec.num_classes:
        raise ValueError(f"The checkpoint {path} classifies {info['num_classes']} classes, "
                         f"{config.data.name} has {spec.num_classes}: evaluate it with the "
                         f"config of its dataset ({info.get('dataset') or 'see its model.json'}).")
    return model, variables, info, path


def _given_model(config, model, variables, description: Dict[str, Any], mesh):
    """(model, variables on the mesh, its description, '(given)') for a model given in Python;
    its logits must fit the config's dataset."""
    spec = datasets.spec_for(config.data)
    sharding = parallel.replicated(mesh)
    variables = jax.tree.map(lambda leaf: parallel.global_array(np.asarray(leaf), sharding),
                             dict(variables))
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, progress=1.0),
                            variables, jax.ShapeDtypeStruct((1, spec.image_size,
                                                             spec.image_size, 3), np.float32))
    if tuple(logits.shape) != (1, spec.num_classes):
        raise ValueError(f"The model given returns logits of shape {tuple(logits.shape)} for "
                         f"one image; {config.data.name} has {spec.num_classes} classes.")
    info = {**description, "num_classes": spec.num_classes, "dataset": config.data.name}
    return model, variables, info, "(given in Python)"


def _subset(config, split: str, num_examples: Optional[int]) -> datasets.Split:
    """The first `num_examples` (default all) of a split of the config's dataset (or
    CIFAR-10.1, a new test set of CIFAR-10)."""
    if split == "cifar10.1":
        settings = config.data
        chosen = datasets.Split(*corruptions.cifar10_1(settings.data_dir, settings.download,
                                                   settings.test_sets_url,
                                                   settings.source_sha256))
    else:
        train_split, val_split, test_split = datasets.load_for(
            config, validation=split != "test")  # the test split needs no validation split
        chosen = {"test": test_split, "validation": val_split, "train": train_split}[split]
    count = len(chosen) if num_examples is None else min(num_examples, len(chosen))
    return datasets.Split(chosen.images[:count], chosen.labels[:count])


def _run_attack(name: str, model, variables, subset: datasets.Split, key, settings, mesh
                ) -> Dict[str, Any]:
    """One attack of `attacks.get` over the subset, with a progress bar."""
    options = attacks.options_for(name, settings["eps"], settings["step_size"], settings["norm"])
    step = accuracy.make_eval_step(model, attacks.get(name, **options), mesh, settings["norm"])
    bar = progress.bar(len(subset), name, enabled=parallel.is_main_process())

    def show(done, clean, robust):
        bar.update(done - bar.n)
        bar.set_postfix(clean=f"{clean / done:.4f}", robust=f"{robust / done:.4f}")

    try:
        result = accuracy.evaluate_split(step, variables, subset, settings["batch_size"], key,
                                         mesh, progress=show, name=name)
    finally:
        bar.close()
    accuracy.check_perturbation(name, settings, result["max_perturbation"], result["max_outside_box"])
    return {"clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"],
            "max_perturbation": result["max_perturbation"],
            "verified": {"robust": "correct clean and at the returned example (classified "
                                   "again in the same step)", "inside_ball_and_box": True},
            "parameters": {**options, "random_start": attacks.takes_step_size(name)}}


def report_name(report: Dict[str, Any], attack_names: List[str], step_size: float) -> str:
    """eval_<split>_<attacks>_<norm>-eps<eps>[_step<step>]_n<count>[_seed<seed>].json: reports
    of other settings never share a name (eps and steps as k-255 when they are k/255)."""
    def number(value):
        scaled = value * 255
        return f"{round(scaled)}-255" if abs(scaled - round(scaled)) < 1e-6 else f"{value:.6g}"

    request = report.get("corruptions")
    if request:  # only what differs from all corruptions, all severities
        names = [CORRUPTIONS + ("-" + "+".join(request["names"])
                                if tuple(request["names"]) != corruptions.ALL else "") +
                 ("-s" + "".join(map(str, request["severities"]))
                  if tuple(request["severities"]) != corruptions.SEVERITIES else "")
                 if name == CORRUPTIONS else name for name in attack_names]
    else:
        names = attack_names
    parts = ["eval", report["split"], "_".join(names)]
    if set(attack_names) != {CORRUPTIONS}:  # a threat model applies
        parts.append(f"{report['norm']}-eps{number(report['eps'])}")
    if any(attacks.takes_step_size(name) for name in attack_names):
        parts.append(f"step{number(step_size)}")
    parts.append(f"n{report['examples']}")
    if report["seed"]:
        parts.append(f"seed{report['seed']}")
    return "_".join(parts) + ".json"


def _print_table(report: Dict[str, Any]) -> None:
    fpcm = report["model"].get("fpcm")
    print(f"\n{report['model']['name']}{'' if fpcm is None else f' (FPCM {fpcm})'} on "
          f"{report['dataset']} {report['split']}, {report['examples']} images, "
          f"{report['norm']} eps {report['eps']:.5f}")
    print(f"{'attack':<12} {'clean':>8} {'robust':>8} {'max pert.':>10} {'seconds':>9} "
          f"{'img/s':>8}")
    for name, entry in report["attacks"].items():
        print(f"{name:<12} {100 * entry['clean_acc']:>7.2f}% {100 * entry['robust_acc']:>7.2f}% "
              f"{entry.get('max_perturbation', 0.0):>10.5f} {entry['seconds']:>9.1f} "
              f"{entry['images_per_second']:>8.2f}")
    if CORRUPTIONS in report["attacks"]:
        _print_corruptions(report["attacks"][CORRUPTIONS])
    for warning in report["warnings"]:
        print(f"warning: {warning}")


def _print_corruptions(entry: Dict[str, Any]) -> None:
    """One row per corruption (accuracy per severity, the perturbation's mean radius), then
    the means; `robust` above is the standard corruptions' mean."""
    severities = [str(s) for s in entry["severities"]]
    print(f"\n{'corruption':<18} " + " ".join(f"{'s' + s:>7}" for s in severities) +
          f" {'mean':>7} {'radius':>7}")
    for name, cells in entry["cells"].items():
        values = [cells[s]["accuracy"] for s in severities]
        radius = np.mean([cells[s]["mean_radius"] for s in severities])
        print(f"{name:<18} " + " ".join(f"{100 * v:>6.2f}%" for v in values) +
              f" {100 * np.mean(values):>6.2f}% {radius:>7.3f}")
    for key, group in (("mean_standard", corruptions.STANDARD), ("mean_extra", corruptions.EXTRA)):
        if entry.get(key) is not None:
            print(f"{corruption_mean_label(list(entry['cells']), group)}: "
                  f"{100 * entry[key]:.2f}%")
    for group, values in entry["frequency_groups"].items():
        print(f"{group}-frequency half ({', '.join(values['corruptions'])}): "
              f"{100 * values['accuracy']:.2f}%")


def corruption_mean_label(evaluated: List[str], group: Tuple[str, ...]) -> str:
    """'mean over the 15 standard corruptions' when all were evaluated, else 'mean over N of
    the 15 standard corruptions (names)' (the 4 extra ones likewise): a subset's mean is not
    the benchmark's."""
    kind = "standard" if group == corruptions.STANDARD else "extra"
    chosen = [name for name in evaluated if name in group]
    if len(chosen) == len(group):
        return f"mean over the {len(group)} {kind} corruptions"
    return (f"mean over {len(chosen)} of the {len(group)} {kind} corruptions "
            f"({', '.join(chosen)})")


HISTORY_FILE = "evaluations.jsonl"


def _partial_writer(name: str, report: Dict[str, Any], report_path: str):
    """after_component(component, robust accuracy so far) of an AutoAttack run: what is done
    goes into the partial report (process 0)."""
    def after_component(part: str, robust_accuracy: float) -> None:
        if parallel.is_main_process():
            report["attacks"][name] = {"robust_acc_so_far": robust_accuracy,
                                       "components_done": part, "complete": False}
            _write_partial(report_path, report)
    return after_component


def _write_partial(path: str, report: Dict[str, Any]) -> None:
    """What is finished so far, as <report>.partial.json (replaced by the report when done)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path[:-len(".json")] + ".partial.json", {**report, "complete": False})


def _write_report(path: str, report: Dict[str, Any]) -> str:
    """The report, written whole or not at all, and appended to the workdir's history of
    evaluations (so a rerun with the same settings replaces the file, never the record)."""
    replaced = os.path.exists(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {**report, "complete": True})
    append_json_line(os.path.join(os.path.dirname(path), HISTORY_FILE),
                     {**report, "complete": True, "report_path": path,
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    partial = path[:-len(".json")] + ".partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    note = (f" (replacing an earlier report of the same settings; every evaluation stays in "
            f"{HISTORY_FILE})" if replaced else "")
    print(f"Report: {path}{note}")
    return path
