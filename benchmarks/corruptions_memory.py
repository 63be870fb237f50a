"""Peak memory and time of `--mode eval --attack corruptions` on a full-size archive.

    python benchmarks/corruptions_memory.py [--workdir /tmp/corruptions_bench] [--names fog,snow]

Writes, in the workdir, a synthetic CIFAR-10 archive (10,000 random test images, the official
binary layout) and a synthetic CIFAR-10-C.tar of the official size and layout (19 corruptions
of 50,000 x 32 x 32 x 3 uint8 and labels.npy: 2.9 GB), then runs main.py on them under
`/usr/bin/time -v` with a tiny model of its own (tests/own_models.py:ReadsMarker, so that the
model costs nothing next to the data) and prints one JSON line: seconds, peak resident memory,
the archive's size. The archive is read one corruption at a time, each mapped from the tar:
the peak should stay far below the archive's size.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from fpcm_jax.data import corruptions  # noqa: E402

TEST_COUNT, PER_CORRUPTION = 10_000, 50_000


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_cifar10(path, rng):
    """cifar-10-binary.tar.gz's layout: 5 tiny training batches, a 10,000-image test batch."""
    labels = rng.integers(0, 10, TEST_COUNT).astype(np.uint8)
    with tarfile.open(path, "w:gz") as archive:
        for name, count in [(f"data_batch_{i}.bin", 20) for i in range(1, 6)] + [
                ("test_batch.bin", TEST_COUNT)]:
            chosen = labels if count == TEST_COUNT else labels[:count]
            images = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            content = np.concatenate([chosen[:, None], images], axis=1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return labels


def write_corruptions(path, labels, rng):
    """CIFAR-10-C.tar's layout and size, streamed to disk one member at a time."""
    block = rng.integers(0, 256, (TEST_COUNT, 32, 32, 3), dtype=np.uint8)
    with tarfile.open(path, "w") as tar:
        members = [(name, None) for name in corruptions.ALL] + [(corruptions.LABELS, None)]
        for name, _ in members:
            if name == corruptions.LABELS:
                array = np.tile(labels.astype(np.int64), 5)
            else:
                array = np.concatenate([np.roll(block, s, axis=0) for s in range(5)])
            add_npy(tar, f"CIFAR-10-C/{name}.npy", array)


def add_npy(tar, path, array):
    """`array` as a .npy member `path` of an open tar (the layout of CIFAR-10-C.tar)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    info = tarfile.TarInfo(path)
    info.size = buffer.tell()
    buffer.seek(0)
    tar.addfile(info, buffer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/corruptions_bench")
    parser.add_argument("--names", default="", help="corruptions to evaluate (default all)")
    args = parser.parse_args()
    downloads = os.path.join(args.workdir, "data", "downloads")
    os.makedirs(downloads, exist_ok=True)
    rng = np.random.default_rng(0)
    cifar, tar = (os.path.join(downloads, n) for n in ("cifar-10-binary.tar.gz",
                                                       "CIFAR-10-C.tar"))
    if not os.path.exists(tar):
        labels = write_cifar10(cifar, rng)
        write_corruptions(tar, labels, rng)
    checksums = f"cifar-10-binary.tar.gz:{sha256(cifar)},CIFAR-10-C.tar:{sha256(tar)}"
    config = os.path.join(args.workdir, "config.py")
    with open(config, "w") as handle:
        handle.write("from configs import tiny\n\n\ndef get_config():\n"
                     "    config = tiny.get_config()\n"
                     "    config.model.name = 'own_models:ReadsMarker'\n"
                     "    config.model.widths = config.model.stage_sizes = None\n"
                     "    config.data.name = 'cifar10'\n"
                     "    config.data.validation_size = 0\n"
                     f"    config.data.data_dir = {os.path.join(args.workdir, 'data')!r}\n"
                     f"    config.data.source_sha256 = {checksums!r}\n"
                     "    config.data.download = False\n"
                     "    config.eval.batch_size = 500\n"
                     "    return config\n")
    checkpoint = os.path.join(args.workdir, "model")
    if not os.path.exists(checkpoint):
        subprocess.run([sys.executable, "-c", (
            "import jax, jax.numpy as jnp, runpy, sys; sys.path[:0] = ['.', 'tests']\n"
            "from fpcm_jax import experiment\nfrom fpcm_jax.runs import checkpoint\n"
            f"config = runpy.run_path({config!r})['get_config']()\n"
            "model = experiment.model_from_description(experiment.describe(config))\n"
            "variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
            f"checkpoint.save_variables({checkpoint!r}, variables, experiment.describe(config))\n")],
            cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/tests"))
    command = ["/usr/bin/time", "-v", sys.executable, "main.py", "--config", config, "--mode",
               "eval", "--attack", "corruptions", "--checkpoint", checkpoint, "--workdir",
               os.path.join(args.workdir, "eval")]
    if args.names:
        command += ["--corruptions", args.names]
    start = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/tests"))
    if done.returncode:
        sys.exit(done.stdout[-2000:] + done.stderr[-3000:])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    print(json.dumps({"seconds": round(time.time() - start, 1), "peak_rss_mb": peak // 1024,
                      "archive_mb": os.path.getsize(tar) // 2**20,
                      "corruptions": args.names or "all 19", "severities": 5,
                      "images_per_cell": TEST_COUNT}))


if __name__ == "__main__":
    main()
