"""fpcm-jax's AutoAttack on the points of an export, compared point by point with the official
package's flags (`official_autoattack.py --flags-out`).

    .venv/bin/python benchmarks/reference/compare_autoattack.py --checkpoint runs/x/best_robust \
        --export export.npz --norm l2 --eps 0.5 --official-flags official_flags.npz
    # or run once (--out jax_flags.npz) and compare later (--flags jax_flags.npz)

Prints one JSON line: per component, the robust accuracy of each and the indices of the points
whose robust flag after that component differs (fpcm-jax robust where the official is not, and
the reverse), the largest perturbation, and the time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpcm_jax import attacks, parallel  # noqa: E402
from fpcm_jax.runs import loading


def run_autoattack(args, summary):
    """fpcm-jax's AutoAttack on the export's points: {clean, component: robust flags}."""
    parallel.setup()
    model, variables, _, _ = loading.load_model(args.checkpoint)
    archive = np.load(args.export)
    logits_fn = lambda params, x: model.apply(params, x, train=False, progress=1.0)
    start = time.time()
    result = attacks.autoattack(logits_fn, archive["x"], archive["y"], jax.random.key(0),
                                args.eps, params=variables, batch_size=args.batch,
                                norm=args.norm)
    summary.update(examples=len(archive["y"]), seconds=round(time.time() - start, 1),
                   max_perturbation=result["max_perturbation"])
    return {"clean": result["clean_flags"], **result["flags_after"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--export", required=True, help="npz from export_for_reference.py")
    parser.add_argument("--norm", choices=attacks.NORMS, default="linf")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--official-flags", default=None)
    parser.add_argument("--out", default=None, help="npz of fpcm-jax's per-point flags")
    parser.add_argument("--flags", default=None,
                        help="compare fpcm-jax's flags saved by --out instead of running it")
    args = parser.parse_args()
    summary = {"norm": args.norm, "eps": args.eps}
    if args.flags:
        flags = dict(np.load(args.flags))
    else:
        flags = run_autoattack(args, summary)
    summary["accuracy"] = {name: float(value.mean()) for name, value in flags.items()}
    if args.out:
        np.savez(args.out, **flags)
    if args.official_flags:
        official = np.load(args.official_flags)
        summary["official_accuracy"] = {name: float(official[name].mean()) for name in flags}
        summary["only_fpcm_jax_robust"] = {
            name: np.flatnonzero(flags[name] & ~official[name]).tolist() for name in flags}
        summary["only_official_robust"] = {
            name: np.flatnonzero(~flags[name] & official[name]).tolist() for name in flags}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
