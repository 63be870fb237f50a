"""Images/second of an attack on a model, on random images labelled with the model's own
predictions (so every point is attacked).

    python benchmarks/attacks.py --model resnet18 --attack pgd50 --batch 128 [--no-fpcm]
    python benchmarks/attacks.py --model resnet18 --attack autoattack --batch 128
    [--dtype bfloat16] [--fpcm-lowpass fft|matmul|auto] [--loop auto|unrolled|fori]

Prints one JSON line. Single attacks: images_per_second is the median over --repeats timed
batches after a warm-up (compile_seconds separately), flops_per_batch counted from the program
(benchmarks/flops.py). autoattack: one full run over --batch points with the published
parameters; its images_per_second includes compilation (compile-free figure from a second,
cached run as images_per_second_warm). peak_rss_mb: the process's peak resident memory (host
memory: on CPU it includes compilation; on GPU see the device's own figure).
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fpcm_jax import attacks, layers, models  # noqa: E402
from flops import count_flops  # noqa: E402  (this folder is on sys.path)

LOOPS = {"auto": None, "unrolled": True, "fori": False}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--attack", default="pgd50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-fpcm", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--dtype", default="float32", choices=tuple(models.DTYPES))
    parser.add_argument("--fpcm-lowpass", default="auto", choices=layers.LOWPASS_IMPLS)
    parser.add_argument("--loop", default="auto", choices=tuple(LOOPS),
                        help="attack loop form (auto: unrolled on CPU up to 20 steps)")
    args = parser.parse_args()

    model = models.create(args.model, fpcm=not args.no_fpcm, fpcm_lowpass=args.fpcm_lowpass,
                          dtype=models.compute_dtype(args.dtype))
    variables = models.init_variables(model, jax.random.key(0))
    logits_fn = lambda params, x: model.apply(params, x, train=False, progress=1.0)
    x = jax.random.uniform(jax.random.key(1), (args.batch, 32, 32, 3))
    y = jnp.argmax(jax.jit(logits_fn)(variables, x), axis=1)
    record = {"benchmark": "attack", "attack": args.attack, "model": args.model,
              "fpcm": not args.no_fpcm, "batch": args.batch, "dtype": args.dtype,
              "fpcm_lowpass": args.fpcm_lowpass, "loop": args.loop,
              "devices": jax.device_count(),
              "platform": jax.devices()[0].platform, "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.attack == "autoattack":
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            result = attacks.autoattack(logits_fn, np.asarray(x), np.asarray(y),
                                        jax.random.key(2), args.eps, params=variables,
                                        batch_size=args.batch)
            timings.append(time.perf_counter() - start)
        record.update(images_per_second=round(args.batch / timings[0], 3),
                      images_per_second_warm=round(args.batch / timings[1], 3),
                      seconds=round(timings[0], 1), seconds_warm=round(timings[1], 1),
                      robust_accuracy=result["robust_accuracy"],
                      seconds_per_component=result["seconds"])
    else:
        options = {} if args.attack == "square" else {"unroll": LOOPS[args.loop]}
        attack = attacks.get(args.attack, eps=args.eps, **options)
        run = jax.jit(lambda params, x, y, key: attack(lambda z: logits_fn(params, z), x, y, key))
        key = jax.random.key(3)
        start = time.perf_counter()
        lowered = run.lower(variables, x, y, key)
        compiled = lowered.compile()
        compile_seconds = time.perf_counter() - start
        jax.block_until_ready(compiled(variables, x, y, key))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(variables, x, y, key))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        flops = count_flops(run, variables, x, y, key)["total"]
        record.update(images_per_second=round(args.batch / median, 3),
                      compile_seconds=round(compile_seconds, 1), repeats=args.repeats,
                      flops_per_batch=flops, achieved_tflops=round(flops / median / 1e12, 3))
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
