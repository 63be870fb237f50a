"""Robust accuracy of one model by the reference PyTorch tools, to compare with fpcm-jax.

Runs Croce and Hein's AutoAttack (pip package `pyautoattack`, standard version) and
torchattacks' PGD on the same weights and points that `main.py --mode eval` used. Needs an
environment outside the project with torch, pyautoattack, torchattacks, and a checkout of the
official FPCM repository (for its model classes; nothing of it is copied here):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 pyautoattack torchattacks einops matplotlib
    # weights and points, exported by fpcm-jax (see export_for_reference.py):
    .venv/bin/python benchmarks/reference/export_for_reference.py ...
    /tmp/torchenv/bin/python benchmarks/reference/official_autoattack.py \
        --official-repo /path/to/official --model wrn-10-1 --export export.npz

    # L2 (eps 0.5; torchattacks' PGDL2 with step 0.1):
    /tmp/torchenv/bin/python benchmarks/reference/official_autoattack.py --norm l2 --eps 0.5 \
        --official-repo /path/to/official --model wrn-10-1 --export export.npz \
        --flags-out official_flags.npz

Prints one JSON line: clean accuracy, PGD-20/50 (torchattacks) and AutoAttack per component
(robust accuracy and seconds, from the package's log) with its largest perturbation; --flags-out writes each point's robust flag after each AutoAttack
component (for `compare_autoattack.py`, which runs fpcm-jax's AutoAttack on the same points).
"""

import argparse
import contextlib
import io
import json
import logging
import re
import sys
import time

import numpy as np
import torch


def build_model(official_repo, name, num_classes):
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code calls .cuda()
    sys.path.insert(0, official_repo)
    if name.startswith("wrn-"):
        from wideresnet import WideResNet
        depth, width = (int(v) for v in name.split("-")[1:])
        return WideResNet(depth=depth, num_classes=num_classes, widen_factor=width)
    from resnets import ResNet18_FNet
    return ResNet18_FNet(num_classes=num_classes)


def record_fooled(adversary, model, x):
    """{component: flags of the points one of its perturb() calls fooled}: wraps the
    package's attack objects; points are found by their exact pixels."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(x)}
    fooled = {name: np.zeros(len(x), bool) for name in ("apgd-ce", "apgd-t", "fab-t", "square")}

    def wrap(attack, name):
        perturb = attack.perturb

        def recorded(x_batch, y_batch, *args, **kwargs):
            adv = perturb(x_batch, y_batch, *args, **kwargs)
            with torch.no_grad():
                wrong = (model(adv).argmax(1) != y_batch).numpy()
            for row, is_wrong in zip(x_batch, wrong):
                fooled[name][index[row.numpy().tobytes()]] |= bool(is_wrong)
            return adv

        attack.perturb = recorded

    for attribute, name in (("apgd", "apgd-ce"), ("apgd_targeted", "apgd-t"), ("fab", "fab-t"),
                            ("square", "square")):
        wrap(getattr(adversary, attribute), name)
    return fooled


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--official-repo", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--export", required=True, help="npz from export_for_reference.py")
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step", type=float, default=None,
                        help="PGD step (default: linf 2/255, l2 0.1)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--flags-out", default=None, help="npz of per-point robust flags")
    parser.add_argument("--skip-pgd", action="store_true", help="AutoAttack only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    archive = np.load(args.export)
    state = {k[len("state/"):]: torch.from_numpy(archive[k]) for k in archive.files
             if k.startswith("state/")}
    x = torch.from_numpy(archive["x"].transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    y = torch.from_numpy(archive["y"].astype(np.int64))
    model = build_model(args.official_repo, args.model, int(archive["num_classes"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (
        missing, unexpected)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    result = {"examples": len(y), "max_logit_diff_vs_jax":
              float(np.abs(logits.numpy() - archive["jax_logits"]).max()),
              "clean_acc": float((logits.argmax(1) == y).float().mean())}

    for steps in () if args.skip_pgd else (20, 50):
        import torchattacks  # only for PGD: AutoAttack alone needs no torchattacks
        step = args.step or (2 / 255 if args.norm == "linf" else 0.1)
        pgd_class = torchattacks.PGD if args.norm == "linf" else torchattacks.PGDL2
        torch.manual_seed(0)
        attack = pgd_class(model, eps=args.eps, alpha=step, steps=steps, random_start=True)
        start = time.time()
        x_adv = torch.cat([attack(x[i:i + args.batch], y[i:i + args.batch])
                           for i in range(0, len(y), args.batch)])
        with torch.no_grad():
            robust = (model(x_adv).argmax(1) == y) & (logits.argmax(1) == y)
        result[f"torchattacks_pgd{steps}_acc"] = float(robust.float().mean())
        result[f"torchattacks_pgd{steps}_seconds"] = round(time.time() - start, 1)
        print(json.dumps(result), file=sys.stderr, flush=True)  # partial results, as they come

    from pyautoattack import AutoAttack
    adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=args.eps,
                           version="standard", device="cpu", seed=0)
    fooled = record_fooled(adversary, model, x)
    start = time.time()
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)  # the package logs its progress at DEBUG level
    logging.getLogger().setLevel(logging.DEBUG)
    with contextlib.redirect_stdout(log):
        x_adv = adversary.run_standard_evaluation(x, y, batch_size=args.batch)
    if isinstance(x_adv, tuple):  # pyautoattack 0.2 returns (x_adv, ...)
        x_adv = x_adv[0]
    print(log.getvalue(), file=sys.stderr, flush=True)
    previous_total = 0.0
    for line in log.getvalue().splitlines():
        # "robust accuracy after APGD-CE: 50.00% (total time 12.3 s)"
        match = re.search(r"robust accuracy after ([A-Z-]+): ([0-9.]+)% \(total time ([0-9.]+)",
                          line)
        if match:
            name, total = match.group(1).lower(), float(match.group(3))
            result[f"autoattack_after_{name}"] = float(match.group(2)) / 100
            result[f"autoattack_seconds_{name}"] = round(total - previous_total, 1)
            previous_total = total
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y)
    result["autoattack_acc"] = float(robust.float().mean())
    delta = (x_adv - x).reshape(len(y), -1)
    result["autoattack_max_perturbation"] = float(
        delta.abs().max() if args.norm == "linf" else delta.norm(dim=1).max())
    if args.flags_out:
        clean = (logits.argmax(1) == y).numpy()
        flags, still = {}, clean.copy()
        for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
            still = still & ~fooled[name]
            flags[name] = still.copy()
        np.savez(args.flags_out, clean=clean, **flags)
    result["autoattack_log"] = [line for line in log.getvalue().splitlines()
                                if "accuracy" in line]
    result["autoattack_seconds"] = round(time.time() - start, 1)
    result["autoattack_images_per_second"] = round(len(y) / (time.time() - start), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
