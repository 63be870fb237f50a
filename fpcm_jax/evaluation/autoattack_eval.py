"""`--mode eval --attack autoattack` (or one of its components): AutoAttack over a split with
its per-point bookkeeping (`attacks.autoattack`), a progress bar per stage, and the report
entry: clean and robust accuracy, the accuracy after each component, what the final
consistency check verified and the parameters used."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict

import numpy as np

from fpcm_jax import attacks, parallel, progress
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import accuracy


def run(name: str, model, variables, subset: datasets.Split, key, settings, mesh,
        after_component: Callable[[str, float], None]) -> Dict[str, Any]:
    """AutoAttack (or one of its components) with its per-point bookkeeping, as a report
    entry (its 'warnings' for the report's list); after_component(component, robust accuracy
    so far) after each component (the caller writes its partial report)."""
    components = attacks.STANDARD if name == "autoattack" else (name,)
    main, start = parallel.is_main_process(), time.time()
    bars = StageBars(name, len(subset), main)
    sharded = parallel.batch_sharded(mesh)
    eps, norm, changed = settings["eps"], settings["norm"], settings["autoattack"]

    def component_done(part, robust_accuracy):
        bars.close()
        if main:
            progress.say(f"  {name}: after {part} robust accuracy {robust_accuracy:.4f} "
                         f"({time.time() - start:.0f} s)")
        after_component(part, robust_accuracy)

    logits_fn = lambda params, x: model.apply(params, x, train=False, progress=1.0)
    result = attacks.autoattack(logits_fn, datasets.to_float(subset.images), subset.labels,
                                key, eps, params=variables, attacks_to_run=components,
                                batch_size=settings["batch_size"],
                                put=lambda array: parallel.global_array(array, sharded),
                                fetch=parallel.fetch, progress=component_done,
                                on_batch=bars.update, norm=norm,
                                fitted_batches=settings["fitted_batches"], **changed)
    x_adv = result["x_adv"]
    outside = float(np.max(np.maximum(-x_adv, x_adv - 1.0))) if len(x_adv) else 0.0
    accuracy.check_perturbation(name, settings, result["max_perturbation"], max(outside, 0.0))
    return {"warnings": result["warnings"], "clean_acc": result["clean_accuracy"], "robust_acc": result["robust_accuracy"],
            "accuracy_after": result["accuracy_after"],
            "max_perturbation": result["max_perturbation"],
            "seconds_per_component": {k: round(v, 1) for k, v in result["seconds"].items()},
            "verified": {"robust": "correct clean and at the returned example (every x_adv "
                                   "classified again after each component and at the end)",
                         **result["consistency"]},
            "parameters": parameters(eps, norm, changed)}


class StageBars:
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


def parameters(eps: float, norm: str, changed: Dict[str, int]) -> Dict[str, Any]:
    """The parameters a report records: the published ones, or those changed for a quick
    check."""
    n_iter = changed.get("n_iter", 100)
    targets = changed.get("n_target_classes", 9)
    return {"version": "standard" if not changed else f"changed: {changed}", "eps": eps,
            "norm": norm,
            "apgd": {"n_iter": n_iter, "rho": 0.75, "momentum": 0.75, "initial_step": "2 eps",
                     "restarts": 1},
            "apgd-t": {"targets": targets, "n_iter": n_iter},
            "fab-t": {"targets": targets, "n_iter": n_iter, "alpha_max": 0.1, "eta": 1.05,
                      "beta": 0.9},
            "square": {"n_queries": changed.get("n_queries", 5000), "p_init": 0.8}}
