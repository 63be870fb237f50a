"""Robust evaluation: accuracy over a whole split, clean and under attacks (eval mode, final
cutoff), and the `main.py --mode eval` report.

The last batch is padded and masked, so every example counts exactly once. A point counts as
robust only if it is classified correctly both clean and under the attack (AutoAttack's
convention), so robust accuracy never exceeds clean accuracy.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fpcm_jax import attacks, checkpoint, data, experiment, parallel, progress


def make_eval_step(model: nn.Module, attack: Callable, mesh) -> Callable:
    """jitted (variables, images uint8, labels, mask, key) -> (clean correct, robust correct)."""

    def eval_step(variables, images, labels, mask, key):
        x = data.to_float(images)
        logits_fn = lambda inputs: model.apply(variables, inputs, train=False, progress=1.0)
        clean_correct = (jnp.argmax(logits_fn(x), -1) == labels) & mask
        x_adv = attack(logits_fn, x, labels, key)
        robust_correct = (jnp.argmax(logits_fn(x_adv), -1) == labels) & clean_correct
        return clean_correct.sum(), robust_correct.sum()

    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(repl, sharded, sharded, sharded, repl),
                   out_shardings=(repl, repl))


MAX_BATCHES_IN_FLIGHT = 8  # dispatched ahead of the results shown; bounds device memory


def evaluate_split(eval_step: Callable, variables: Any, split: data.Split, batch_size: int,
                   key: jax.Array, mesh, limit: Optional[int] = None,
                   progress: Optional[Callable[[int, int, int], None]] = None) -> Dict[str, float]:
    """Clean and robust accuracy over the first `limit` (default all) examples of a split.

    Batches are dispatched without waiting for their results; `progress(done, clean, robust)`
    sees those that are ready, so the host never stalls the device between batches.
    """
    parallel.check_batch_size(batch_size, "eval.batch_size")
    count = len(split) if limit is None else min(limit, len(split))
    sharded = parallel.batch_sharded(mesh)
    pending = collections.deque()  # (examples done, clean count, robust count) on device
    totals = {"clean": 0, "robust": 0}

    def collect(keep: int) -> None:
        """Add finished batches in order; wait only while more than `keep` are pending."""
        while pending and (len(pending) > keep or pending[0][1].is_ready()):
            stop, clean, robust = pending.popleft()
            totals["clean"] += int(clean)
            totals["robust"] += int(robust)
            if progress is not None:
                progress(stop, totals["clean"], totals["robust"])

    start_time = time.time()
    for batch_index, start in enumerate(range(0, count, batch_size)):
        stop = min(start + batch_size, count)
        pad = batch_size - (stop - start)
        images = np.pad(split.images[start:stop], ((0, pad), (0, 0), (0, 0), (0, 0)))
        labels = np.pad(split.labels[start:stop], (0, pad))
        mask = np.arange(batch_size) < stop - start
        batch = [parallel.global_array(a, sharded) for a in (images, labels, mask)]
        pending.append((stop, *eval_step(variables, *batch, jax.random.fold_in(key, batch_index))))
        collect(MAX_BATCHES_IN_FLIGHT)
    collect(0)
    seconds = time.time() - start_time
    return {"examples": count, "clean_acc": totals["clean"] / max(count, 1),
            "robust_acc": totals["robust"] / max(count, 1), "seconds": seconds}


def pgd_eval_step(model: nn.Module, mesh, steps: int, eps: float = 8 / 255,
                  step_size: float = 2 / 255) -> Callable:
    """The eval step for clean accuracy plus PGD-`steps` (clean only when steps == 0)."""
    attack = attacks.get(f"pgd{steps}" if steps else "none",
                         **({"eps": eps, "step_size": step_size} if steps else {}))
    return make_eval_step(model, attack, mesh)


AUTOATTACK_COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def parse_attack_names(text: str) -> List[str]:
    """'pgd20,autoattack' -> ['pgd20', 'autoattack']; an unknown name is a clear error."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in ("autoattack",) + AUTOATTACK_COMPONENTS:
            attacks.get(name)  # raises ValueError listing the valid names
    if not names:
        raise ValueError(f"--attack is empty; valid: {', '.join(attacks.ATTACK_NAMES)}.")
    return names


def check_options(num_examples: Optional[int], batch_size: Optional[int],
                  eps: Optional[float], step_size: Optional[float]) -> None:
    """Clear errors for evaluation options, before anything is loaded or written."""
    for name, value in (("--num_examples", num_examples), ("--batch_size", batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be positive (leave it out for "
                             f"{'all examples' if name == '--num_examples' else 'the default'}).")
    for name, value in (("--eps", eps), ("--step_size", step_size)):
        if value is not None and not (0 <= value <= 1 and np.isfinite(value)):
            raise ValueError(f"{name}={value} must lie in [0, 1] (images are in [0, 1]; "
                             f"8/255 is 0.03137).")


def run_evaluation(config, workdir: str, attack_names: List[str],
                   checkpoint_path: Optional[str] = None, num_examples: Optional[int] = None,
                   batch_size: Optional[int] = None, eps: Optional[float] = None,
                   seed: int = 0, split: str = "test",
                   autoattack_options: Optional[Dict[str, int]] = None,
                   step_size: Optional[float] = None,
                   model_overrides: Optional[Dict[str, Any]] = None,
                   allow_fallback: bool = False) -> Dict[str, Any]:
    """Evaluate a checkpoint on a split under each attack; print a table, write a JSON report.

    The model comes from the checkpoint (`checkpoint.load_model`: its model.json), the data
    from config.data; `model_overrides` are model fields given on the command line, which must
    agree with the checkpoint; `allow_fallback` evaluates best_sum/ when best_robust/ is
    damaged. eps and step_size default to config.attack's.
    autoattack_options (n_iter, n_queries, n_target_classes) depart from the published
    parameters: for quick checks only; the report records them.
    """
    check_options(num_examples, batch_size, eps, step_size)
    autoattack_options = dict(autoattack_options or {})
    eps = config.attack.eps if eps is None else eps
    step_size = config.attack.step_size if step_size is None else step_size
    batch_size = batch_size or config.eval.batch_size
    parallel.check_batch_size(batch_size, "--batch_size")
    mesh = parallel.make_mesh()
    spec = data.get_spec(config.data.name)
    official = experiment.official_description(config.model.name, spec.num_classes,
                                               config.model.fpcm)
    model, variables, info, path = checkpoint.load_model(
        checkpoint_path or workdir, mesh, model_overrides, config.model.dtype,
        config.model.fpcm_lowpass, allow_fallback, official=official)
    if info["num_classes"] != spec.num_classes:
        raise ValueError(f"The checkpoint {path} classifies {info['num_classes']} classes, "
                         f"{config.data.name} has {spec.num_classes}: evaluate it with the "
                         f"config of its dataset ({info.get('dataset') or 'see its model.json'}).")
    train_split, val_split, test_split = data.load_for(config)
    chosen = {"test": test_split, "validation": val_split, "train": train_split}[split]
    count = len(chosen) if num_examples is None else min(num_examples, len(chosen))
    subset = data.Split(chosen.images[:count], chosen.labels[:count])
    key = jax.random.key(seed)
    logits_fn = lambda params, x: model.apply(params, x, train=False, progress=1.0)
    report = {"model": {**experiment.complete(info), "dtype": config.model.dtype},
              "checkpoint": path, "checkpoint_info": info, "dataset": config.data.name,
              "split": split, "examples": count, "eps": eps, "seed": seed,
              "batch_size": batch_size, "devices": jax.device_count(),
              "processes": jax.process_count(), "attacks": {}, "warnings": []}
    main = parallel.is_main_process()
    sharded = parallel.batch_sharded(mesh)
    path = os.path.join(workdir, report_name(report, attack_names, step_size))
    for index, name in enumerate(attack_names):
        attack_key = jax.random.fold_in(key, index)
        start = time.time()
        if name == "autoattack" or name in AUTOATTACK_COMPONENTS:
            components = AUTOATTACK_COMPONENTS if name == "autoattack" else (name,)
            bars = _StageBars(name, count, main)

            def component_done(part, accuracy, name=name, bars=bars, start=start):
                bars.close()
                if main:
                    progress.say(f"  {name}: after {part} robust accuracy {accuracy:.4f} "
                                 f"({time.time() - start:.0f} s)")
                    report["attacks"][name] = {"robust_acc_so_far": accuracy,
                                               "components_done": part, "complete": False}
                    _write_partial(path, report)

            result = attacks.autoattack(logits_fn, data.to_float(subset.images), subset.labels,
                                        attack_key, eps, params=variables,
                                        attacks_to_run=components, batch_size=batch_size,
                                        put=lambda array: parallel.global_array(array, sharded),
                                        fetch=parallel.fetch, progress=component_done,
                                        on_batch=bars.update, **autoattack_options)
            entry = {"clean_acc": result["clean_accuracy"], "robust_acc": result["robust_accuracy"],
                     "accuracy_after": result["accuracy_after"],
                     "seconds_per_component": {k: round(v, 1)
                                               for k, v in result["seconds"].items()},
                     "parameters": _autoattack_parameters(eps, autoattack_options)}
            report["warnings"] += [f"{name}: {w}" for w in result["warnings"]]
        else:
            options = {} if name == "none" else {"eps": eps}
            if name.startswith(("pgd", "cw")):
                options["step_size"] = step_size
            step = make_eval_step(model, attacks.get(name, **options), mesh)
            bar = progress.bar(count, name, enabled=main)

            def show(done, clean, robust, bar=bar):
                bar.update(done - bar.n)
                bar.set_postfix(clean=f"{clean / done:.4f}", robust=f"{robust / done:.4f}")

            result = evaluate_split(step, variables, subset, batch_size, attack_key, mesh,
                                    progress=show)
            bar.close()
            entry = {"clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"],
                     "parameters": {**options, "random_start": name.startswith(("pgd", "cw"))}}
        entry["seconds"] = round(time.time() - start, 2)
        entry["images_per_second"] = round(count / max(entry["seconds"], 1e-9), 2)
        report["attacks"][name] = entry
        if main and index + 1 < len(attack_names):
            _write_partial(path, report)
    if main:
        _print_table(report)
        report["report_path"] = _write_report(path, report)
    return report


class _StageBars:
    """AutoAttack's progress: a bar per stage (points attacked of those left, robust accuracy
    so far, time), shown on a terminal."""

    def __init__(self, name: str, count: int, enabled: bool):
        self.name, self.count, self.enabled = name, count, enabled
        self.bar, self.stage = None, None

    def update(self, component, stage, stages, done, total, robust):
        if (component, stage) != self.stage:
            self.close()
            label = component if stages == 1 else f"{component} {stage + 1}/{stages}"
            self.bar = progress.bar(total, f"{self.name}: {label}", enabled=self.enabled)
            self.stage = (component, stage)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(robust=f"{robust / max(self.count, 1):.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def report_name(report: Dict[str, Any], attack_names: List[str], step_size: float) -> str:
    """eval_<split>_<attacks>_eps<eps>[_step<step>]_n<count>[_seed<seed>].json: reports of
    other settings never share a name (eps and steps as k-255 when they are k/255)."""
    def number(value):
        scaled = value * 255
        return f"{round(scaled)}-255" if abs(scaled - round(scaled)) < 1e-6 else f"{value:.6g}"

    parts = ["eval", report["split"], "_".join(attack_names), f"eps{number(report['eps'])}"]
    if any(name.startswith(("pgd", "cw")) for name in attack_names):
        parts.append(f"step{number(step_size)}")
    parts.append(f"n{report['examples']}")
    if report["seed"]:
        parts.append(f"seed{report['seed']}")
    return "_".join(parts) + ".json"


def _autoattack_parameters(eps: float, changed: Dict[str, int]) -> Dict[str, Any]:
    n_iter = changed.get("n_iter", 100)
    targets = changed.get("n_target_classes", 9)
    return {"version": "standard" if not changed else f"changed: {changed}", "eps": eps,
            "apgd": {"n_iter": n_iter, "rho": 0.75, "momentum": 0.75, "initial_step": "2 eps",
                     "restarts": 1},
            "apgd-t": {"targets": targets, "n_iter": n_iter},
            "fab-t": {"targets": targets, "n_iter": n_iter, "alpha_max": 0.1, "eta": 1.05,
                      "beta": 0.9},
            "square": {"n_queries": changed.get("n_queries", 5000), "p_init": 0.8}}


def _print_table(report: Dict[str, Any]) -> None:
    print(f"\n{report['model']['name']} (FPCM {report['model']['fpcm']}) on "
          f"{report['dataset']} {report['split']}, {report['examples']} images, "
          f"eps {report['eps']:.5f}")
    print(f"{'attack':<12} {'clean':>8} {'robust':>8} {'seconds':>9} {'img/s':>8}")
    for name, entry in report["attacks"].items():
        print(f"{name:<12} {100 * entry['clean_acc']:>7.2f}% {100 * entry['robust_acc']:>7.2f}% "
              f"{entry['seconds']:>9.1f} {entry['images_per_second']:>8.2f}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")


HISTORY_FILE = "evaluations.jsonl"


def _write_partial(path: str, report: Dict[str, Any]) -> None:
    """What is finished so far, as <report>.partial.json (replaced by the report when done)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.write_json(path[:-len(".json")] + ".partial.json", {**report, "complete": False})


def _write_report(path: str, report: Dict[str, Any]) -> str:
    """The report, written whole or not at all, and appended to the workdir's history of
    evaluations (so a rerun with the same settings replaces the file, never the record)."""
    replaced = os.path.exists(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.write_json(path, {**report, "complete": True})
    with open(os.path.join(os.path.dirname(path), HISTORY_FILE), "a") as handle:
        handle.write(json.dumps({**report, "complete": True, "report_path": path,
                                 "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    partial = path[:-len(".json")] + ".partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    note = (f" (replacing an earlier report of the same settings; every evaluation stays in "
            f"{HISTORY_FILE})" if replaced else "")
    print(f"Report: {path}{note}")
    return path
