"""Images/second of the real jitted training step (PGD-10 + CE loss) on random data.

    python benchmarks/train_step.py --model resnet18 --batch 128 [--no-fpcm] [--steps 5]
        [--dtype bfloat16] [--fpcm-lowpass fft|matmul|auto] [--loop unrolled|fori|auto]
        [--loss ce|trades|mart] [--awp 0.01] [--ema 0.995]

--awp GAMMA times the plain step and the AWP step in the same process and adds
`awp_relative_cost` (AWP step seconds / plain step seconds) and the AWP step's figures.

Prints one JSON line: images_per_second (median over the timed steps after one warm-up step),
compile_seconds, flops_per_step (convolutions and matrix products counted from the program,
benchmarks/flops.py: the same on every backend) and achieved_tflops, peak_rss_mb, and the
setup. Uses every local device (the batch is sharded over them).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fpcm_jax import parallel  # noqa: E402

parallel.set_default_xla_flags()  # as main.py does, before JAX starts its backends

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from flops import count_flops  # noqa: E402  (this folder is on sys.path)
from fpcm_jax import experiment, layers, models, parallel  # noqa: E402
from fpcm_jax.training import train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-fpcm", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--bn-mode", default="train", choices=train_step.BN_MODES)
    parser.add_argument("--dtype", default="float32", choices=tuple(models.DTYPES))
    parser.add_argument("--fpcm-lowpass", default="auto", choices=layers.LOWPASS_IMPLS)
    parser.add_argument("--loop", default="auto", choices=tuple(train_step.ATTACK_LOOPS))
    parser.add_argument("--loss", default="ce", choices=train_step.losses.LOSS_NAMES)
    parser.add_argument("--awp", type=float, default=0.0, help="AWP gamma: also time AWP")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: off)")
    args = parser.parse_args()

    config = default.get_config()
    config.model.name = args.model
    config.model.fpcm = not args.no_fpcm
    config.train.batch_size = args.batch
    config.train.loss = args.loss
    config.train.ema_decay = args.ema
    config.attack.steps = args.attack_steps
    config.attack.bn_mode = args.bn_mode
    config.attack.loop = args.loop
    config.model.dtype = args.dtype
    config.model.fpcm_lowpass = args.fpcm_lowpass
    result = time_step(config, args.batch, args.steps)
    report = {"benchmark": "train_step", "model": args.model, "fpcm": not args.no_fpcm,
              "batch": args.batch, "attack_steps": args.attack_steps, "bn_mode": args.bn_mode,
              "loss": args.loss, "ema": args.ema, "dtype": args.dtype,
              "fpcm_lowpass": args.fpcm_lowpass, "loop": args.loop, **result}
    if args.awp:
        config.train.awp_gamma = args.awp
        with_awp = time_step(config, args.batch, args.steps)
        report["awp"] = {"gamma": args.awp, **with_awp}
        report["awp_relative_cost"] = round(with_awp["step_seconds_median"]
                                            / result["step_seconds_median"], 3)
    report.update({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024),
                   "timed_steps": args.steps, "devices": jax.device_count(),
                   "platform": jax.devices()[0].platform, "jax": jax.__version__,
                   "xla_flags": os.environ.get("XLA_FLAGS", "")})
    print(json.dumps(report))


def time_step(config, batch_size: int, timed_steps: int) -> dict:
    """Compile seconds, median step seconds, images/second and FLOPs of the jitted step."""
    steps_per_epoch = 1000
    mesh = parallel.make_mesh()
    model, spec = experiment.build(config)
    tx, learning_rate = train_step.make_optimizer(config.train, steps_per_epoch)
    state = jax.device_put(train_step.create_state(model, tx, jax.random.key(0), spec.image_size,
                                                   ema=config.train.ema_decay > 0),
                           parallel.replicated(mesh))
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, learning_rate, config, steps_per_epoch), mesh)
    rng = np.random.default_rng(0)
    sharded = parallel.batch_sharded(mesh)
    batch = {"images": parallel.global_array(
                 rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8), sharded),
             "labels": parallel.global_array(
                 rng.integers(0, spec.num_classes, (batch_size,)).astype(np.int32), sharded)}
    key = jax.random.key(1)

    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = count_flops(step, state, batch, key)
    return {"images_per_second": round(batch_size / median, 2),
            "step_seconds_median": round(median, 4), "compile_seconds": round(compile_seconds, 2),
            "flops_per_step": flops["total"], "fft_flops_per_step": flops["fft"],
            "achieved_tflops": round(flops["total"] / median / 1e12, 3)}


if __name__ == "__main__":
    main()
