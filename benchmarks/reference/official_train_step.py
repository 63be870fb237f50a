"""Images/second of the official PyTorch training step, to compare with benchmarks/train_step.py.

One step as the official train.py runs it (model in train mode): clean forward, its PGD-10
(eps 8/255, step 2/255, random start, model in train mode), adversarial forward, cross-entropy,
backward, SGD with momentum and weight decay. Random uint8 images, batch 128. Runs in a torch
environment outside the project with a checkout of the official repository (read from there,
nothing copied here):

    /tmp/torchenv/bin/python benchmarks/reference/official_train_step.py \
        --official-repo /path/to/official [--no-fpcm] [--threads 2] [--steps 5] [--device cuda]

`--device cuda` runs it on the GPU as the official code does (its FPCM calls `.cuda()`);
`benchmarks/gpu_check.sh` calls it so when OFFICIAL_REPO is set.

Prints one JSON line like benchmarks/train_step.py.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


class NoFPCM(torch.nn.Module):
    """Stands in for an FPCM block: the official ResNet18_FNet without FPCM (the official
    plain `ResNet18()` does not run: its `ResNet` class is missing)."""

    def forward(self, x, epoch=None):
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", required=True)
    parser.add_argument("--no-fpcm", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # the official FPCM calls .cuda()
    sys.path.insert(0, args.official_repo)
    from PGD import PGD
    from resnets import ResNet18_FNet
    model = ResNet18_FNet(num_classes=10).to(args.device)
    if args.no_fpcm:
        for name in ("attn1", "attn2", "attn3", "attn4"):
            setattr(model, name, NoFPCM())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, 256, (args.batch, 3, 32, 32)).astype(np.float32) / 255)
    label = torch.from_numpy(rng.integers(0, 10, (args.batch,)))
    data, label = data.to(args.device), label.to(args.device)
    epoch = 1

    def step():
        model.train()
        optimizer.zero_grad()
        model(data, epoch)  # the official loop's clean forward (BN statistics, clean accuracy)
        adv_data = attack(data, label, epoch)
        loss = F.cross_entropy(model(adv_data, epoch), label)
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: time it to the end

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "benchmark": "official_train_step", "model": "resnet18", "fpcm": not args.no_fpcm,
        "batch": args.batch, "attack_steps": 10, "images_per_second": round(args.batch / median, 2),
        "step_seconds_median": round(median, 4), "timed_steps": args.steps,
        "threads": args.threads, "device": args.device, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
