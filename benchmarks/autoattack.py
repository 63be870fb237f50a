"""Seconds per AutoAttack component, compilation apart, and points per second per stage.

    python benchmarks/autoattack.py --model wrn-16-2 --norm l2 --examples 32 --export ref.npz
    /tmp/torchenv/bin/python benchmarks/reference/official_autoattack.py --skip-pgd \
        --official-repo /path/to/official --model wrn-16-2 --export ref.npz --norm l2 \
        --eps 0.05 --batch 32

The model (registry name, FPCM unless --no-fpcm) has its initial weights (key 0); the points
are uniform random images labelled with the model's own predictions, so every point is
attacked. The default eps (L-inf 0.5/255, L2 0.05) is small enough that the points stay robust
through every stage: each stage then runs on all of them, which is what a robust model costs.
AutoAttack runs twice with the published parameters (APGD 100 iterations, 9 targets, FAB 100
iterations, Square 5,000 queries) and batch size --examples: the first run compiles, the second
reuses the compiled stages; per component, `seconds` is the second run's and `compile_seconds`
the difference. `point_stages` counts the points each stage attacked, summed over the stages,
and `point_stages_per_second` divides it by `seconds`. --export writes the weights in the
official layout and the points (`reference/export_for_reference.py`'s format) for the
reference package on the same machine. Prints one JSON line; peak_rss_mb is the process's.
"""

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fpcm_jax import parallel  # noqa: E402

parallel.set_default_xla_flags()  # as main.py does, before JAX starts its backends

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpcm_jax import attacks, models  # noqa: E402
from reference.export_for_reference import write_export  # noqa: E402  (this folder)

SMALL_EPS = {"linf": 0.5 / 255, "l2": 0.05}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn-16-2")
    parser.add_argument("--no-fpcm", action="store_true")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--eps", type=float, default=None, help="default: SMALL_EPS[norm]")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--components", default=",".join(attacks.STANDARD))
    parser.add_argument("--export", default=None, help="npz for the reference package")
    args = parser.parse_args()
    eps = SMALL_EPS[args.norm] if args.eps is None else args.eps
    model = models.create(args.model, fpcm=not args.no_fpcm)
    variables = models.init_variables(model, jax.random.key(0))
    logits_fn = lambda params, x: model.apply(params, x, train=False, progress=1.0)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (args.examples, 32, 32, 3)))
    logits = np.asarray(jax.jit(logits_fn)(variables, x))
    y = logits.argmax(1).astype(np.int32)
    if args.export:
        write_export(args.export, variables, x, y, 10, logits)
    components = args.components.split(",")
    runs = [_timed_run(logits_fn, variables, x, y, eps, args.norm, components) for _ in range(2)]
    (first, _), (second, point_stages) = runs
    per_component = {
        name: {"seconds": round(second["seconds"][name], 1),
               "compile_seconds": round(first["seconds"][name] - second["seconds"][name], 1),
               "point_stages": point_stages[name],
               "point_stages_per_second": round(point_stages[name] / second["seconds"][name], 3),
               "robust_accuracy_after": second["accuracy_after"][name]}
        for name in components}
    print(json.dumps({
        "benchmark": "autoattack", "model": args.model, "fpcm": not args.no_fpcm,
        "norm": args.norm, "eps": eps, "examples": args.examples,
        "clean_accuracy": second["clean_accuracy"], "components": per_component,
        "seconds": round(sum(second["seconds"].values()), 1),
        "seconds_with_compile": round(sum(first["seconds"].values()), 1),
        "platform": jax.devices()[0].platform, "devices": jax.device_count(),
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def _timed_run(logits_fn, variables, x, y, eps, norm, components):
    """One AutoAttack run: its result and the points attacked per component (summed over
    its stages, from the stage-start reports)."""
    point_stages = Counter()

    def on_batch(name, stage, stages, done, count, robust):
        if done == 0:
            point_stages[name] += count

    start = time.perf_counter()
    result = attacks.autoattack(logits_fn, x, y, jax.random.key(2), eps, params=variables,
                                attacks_to_run=components, batch_size=len(x), norm=norm,
                                on_batch=on_batch)
    result["wall_seconds"] = time.perf_counter() - start
    return result, dict(point_stages)


if __name__ == "__main__":
    main()
