"""The input pipeline alone: images/second delivered to the training step (a placed global
batch, fetched back so the time includes the transfer) from a JPEG folder, held in memory or
streamed with Grain, and the process's peak memory. One JSON line per setting.

    python benchmarks/input_pipeline.py --size 64 --images 2000 --batch 128 --workers 2
    python benchmarks/input_pipeline.py --size 224 --images 1000 --batch 64 --workers 2
    python benchmarks/input_pipeline.py --size 224 --images 3000 --only streaming \
        --max-in-memory-gb 0.1      # a folder larger than the limit: peak memory stays bounded
    python benchmarks/input_pipeline.py --size 224 --images 3000 --only memory  # to compare

The folder is written once under --folder (JPEG, quality 90, 10 classes); `decoded_gb` is the
training split's size decoded, `load_seconds` the time to open the splits (in memory: to
decode them all), `first_batch_seconds` the first batch (streamed: the workers' start),
`peak_rss_mb` the process's peak resident memory (ru_maxrss; the worker processes apart).
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from fpcm_jax import parallel  # noqa: E402
from fpcm_jax.data import datasets  # noqa: E402


def write_folder(root: str, size: int, count: int) -> None:
    from PIL import Image

    if os.path.isdir(os.path.join(root, "train")):
        return
    rng = np.random.default_rng(0)
    for split, number in (("train", count), ("test", max(count // 10, 10))):
        for index in range(number):
            folder = os.path.join(root, split, f"class{index % 10}")
            os.makedirs(folder, exist_ok=True)
            base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
            image.save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)


def measure(config, steps: int) -> dict:
    start = time.time()
    train, _, _ = datasets.load_for(config)
    load = time.time() - start
    batches = datasets.batches_for(train, None, config.train.batch_size, 0.0, config.seed,
                                   config.data)
    mesh = parallel.make_mesh()
    batches.place(mesh)
    votes = parallel.process_votes(False, mesh)
    steps = min(steps, batches.steps_per_epoch)
    start = time.time()
    batch, _ = batches.gather(0, 0, votes)
    np.asarray(batch["images"])
    first = time.time() - start
    start = time.time()
    for position in range(1, steps):
        batch, _ = batches.gather(0, position, votes)
        np.asarray(batch["images"])
    seconds = time.time() - start
    images = (steps - 1) * config.train.batch_size
    return {"streamed": config.data.streaming or not isinstance(train.images, np.ndarray),
            "images_per_second": round(images / max(seconds, 1e-9), 1),
            "first_batch_seconds": round(first, 2), "load_seconds": round(load, 2),
            "decoded_gb": round(len(train) * config.data.image_size ** 2 * 3 / 2 ** 30, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--max-in-memory-gb", type=float, default=4.0)
    parser.add_argument("--only", choices=("memory", "streaming"), default=None,
                        help="one path only, e.g. to compare peak memory in separate runs")
    args = parser.parse_args()
    folder = args.folder or f"/tmp/fpcm_jax_pipeline_{args.size}px_{args.images}"
    write_folder(folder, args.size, args.images)
    modes = {"memory": [False], "streaming": [True], None: [False, True]}[args.only]
    for streaming in modes:
        config = default.get_config()
        config.data.name = f"folder:{folder}"
        config.data.image_size = args.size
        config.data.validation_size = 0
        config.data.streaming = streaming
        config.data.workers = args.workers
        config.data.max_in_memory_gb = args.max_in_memory_gb
        config.train.batch_size = args.batch
        result = measure(config, args.steps)
        print(json.dumps({"size": args.size, "images": args.images, "batch": args.batch,
                          "workers": args.workers if result["streamed"] else 0, **result}),
              flush=True)


if __name__ == "__main__":
    main()
