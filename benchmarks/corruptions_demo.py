"""Common corruptions end to end on a small archive, with tiny models: README's example table.

    python benchmarks/corruptions_demo.py --workdir runs/corruptions_demo

No download: scikit-learn's digits (upscaled to 32x32x3, as fpcm-jax's `digits`) are written as
a CIFAR-10 archive in the official binary layout, and their 297 test images, corrupted by
simple stand-ins of the 19 corruptions at 5 severities each, as a CIFAR-10-C.tar in the
official layout; both are placed in the data directory with their SHA-256 given
(config.data.source_sha256), as a mirror's would be. Then three tiny ResNets are trained on it
(configs/tiny.py: standard training, PGD-AT without FPCM, PGD-AT with FPCM), each evaluated
with `--attack corruptions`, and `--mode report` compares them.

The corruptions are stand-ins written here (noise, blur, weather-like low-frequency
patterns, digital ones), not Hendrycks and Dietterich's code: the figures show the pipeline
and the frequency view on known data, not CIFAR-10-C results.
"""

import argparse
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
from scipy import ndimage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from fpcm_jax.data import corruptions, datasets  # noqa: E402
from corruptions_memory import add_npy  # noqa: E402  (this folder is on sys.path)


def blur(x, sigma):
    return ndimage.gaussian_filter(x, (0, sigma, sigma, 0))


def smooth_noise(shape, rng, sigma):
    field = blur(rng.normal(size=shape), sigma)
    return field / (np.abs(field).max() + 1e-9)


def jpeg(x, quality):
    out = []
    for image in (x * 255).astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer)) / 255.0)
    return np.stack(out)


def pixelate(x, factor):
    small = x[:, ::factor, ::factor]
    return np.repeat(np.repeat(small, factor, 1), factor, 2)[:, :32, :32]


def elastic(x, rng, strength):
    dy, dx = (smooth_noise(x.shape[:3] + (1,), rng, 4)[..., 0] * strength for _ in range(2))
    rows, columns = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    out = np.empty_like(x)
    for i in range(len(x)):
        coordinates = [rows + dy[i], columns + dx[i]]
        for c in range(3):
            out[i, :, :, c] = ndimage.map_coordinates(x[i, :, :, c], coordinates, order=1,
                                                      mode="reflect")
    return out


def corrupt(name, x, severity, rng):
    """One stand-in corruption of float images x (N, 32, 32, 3) in [0, 1]."""
    s = severity - 1
    table = {
        "gaussian_noise": lambda: x + rng.normal(0, [.04, .06, .08, .09, .1][s], x.shape),
        "shot_noise": lambda: rng.poisson(x * [500, 250, 100, 75, 50][s]) /
        [500, 250, 100, 75, 50][s],
        "impulse_noise": lambda: np.where(rng.random(x.shape) < [.01, .02, .03, .05, .07][s],
                                          rng.integers(0, 2, x.shape), x),
        "speckle_noise": lambda: x + x * rng.normal(0, [.06, .1, .12, .16, .2][s], x.shape),
        "defocus_blur": lambda: blur(x, [.5, .8, 1.1, 1.5, 2][s]),
        "glass_blur": lambda: np.roll(blur(x, [.4, .6, .8, 1, 1.2][s]), 1, axis=2),
        "motion_blur": lambda: ndimage.uniform_filter1d(x, [2, 3, 4, 5, 6][s], axis=2),
        "zoom_blur": lambda: np.mean([pixelate(x, 1), blur(x, [.5, .7, .9, 1.1, 1.3][s])], 0),
        "snow": lambda: x + [.1, .2, .3, .4, .5][s] * np.maximum(
            smooth_noise(x.shape[:3] + (1,), rng, 1), 0),
        "frost": lambda: 0.7 * x + [.1, .2, .25, .3, .35][s] * np.abs(
            smooth_noise(x.shape[:3] + (1,), rng, 2)),
        "fog": lambda: x + [.2, .3, .4, .5, .6][s] * smooth_noise(x.shape[:3] + (1,), rng, 6),
        "brightness": lambda: x + [.1, .2, .3, .4, .5][s],
        "contrast": lambda: (x - x.mean(axis=(1, 2, 3), keepdims=True)) *
        [.4, .3, .2, .1, .05][s] + x.mean(axis=(1, 2, 3), keepdims=True),
        "elastic_transform": lambda: elastic(x, rng, [.5, 1, 1.5, 2, 2.5][s]),
        "pixelate": lambda: pixelate(x, [3, 3, 5, 6, 7][s]),  # the digits are 4x4 blocks
        "jpeg_compression": lambda: jpeg(np.clip(x, 0, 1), [25, 18, 15, 10, 7][s]),
        "gaussian_blur": lambda: blur(x, [.4, .6, .7, .8, 1][s]),
        "saturate": lambda: x * (1 + np.array([1, 0, -1]) * [.1, .2, .3, .4, .5][s]),  # gray
        "spatter": lambda: x - [.1, .2, .3, .4, .5][s] * np.maximum(
            smooth_noise(x.shape[:3] + (1,), rng, 0.8), 0),
    }
    return (np.clip(table[name](), 0, 1) * 255).round().astype(np.uint8)


def write_archives(downloads, seed=0):
    """The digits as cifar-10-binary.tar.gz and their corrupted test images as CIFAR-10-C.tar;
    returns the source_sha256 setting."""
    os.makedirs(downloads, exist_ok=True)
    (train_images, train_labels), (test_images, test_labels) = (
        (split.images, split.labels) for split in datasets._load_digits(32))
    record = lambda images, labels: np.concatenate(
        [labels.astype(np.uint8)[:, None], images.transpose(0, 3, 1, 2).reshape(len(images),
                                                                               3072)], 1)
    cifar = os.path.join(downloads, "cifar-10-binary.tar.gz")
    parts = np.array_split(np.arange(len(train_labels)), 5)
    # gzip's header carries a time: mtime=0 keeps the archive, and so its SHA-256, the same
    # when the demo is run again (a resume then sees the same data.source_sha256).
    with open(cifar, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as packed, \
            tarfile.open(fileobj=packed, mode="w") as archive:
        files = [(f"data_batch_{i + 1}.bin", record(train_images[p], train_labels[p]))
                 for i, p in enumerate(parts)]
        files.append(("test_batch.bin", record(test_images, test_labels)))
        for name, rows in files:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = rows.nbytes
            archive.addfile(info, io.BytesIO(rows.tobytes()))
    rng = np.random.default_rng(seed)
    x = test_images / 255.0
    corrupted = os.path.join(downloads, "CIFAR-10-C.tar")
    with tarfile.open(corrupted, "w") as tar:
        members = {name: np.concatenate([corrupt(name, x, s, rng) for s in range(1, 6)])
                   for name in corruptions.ALL}
        members[corruptions.LABELS] = np.tile(test_labels.astype(np.int64), 5)
        for name, array in members.items():
            add_npy(tar, f"CIFAR-10-C/{name}.npy", array)
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()
    return f"cifar-10-binary.tar.gz:{digest(cifar)},CIFAR-10-C.tar:{digest(corrupted)}"


RUNS = {"standard": ["--config.attack.steps=0"], "pgd_at": ["--config.model.fpcm=False"],
        "pgd_at_fpcm": []}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/corruptions_demo")
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    data_dir = os.path.join(workdir, "data")
    checksums = write_archives(os.path.join(data_dir, "downloads"))
    common = ["--config", "configs/tiny.py", "--config.data.name=cifar10",
              f"--config.data.data_dir={data_dir}", f"--config.data.source_sha256={checksums}",
              "--config.data.download=False", "--config.data.validation_size=100"]
    for name, extra in RUNS.items():
        run = os.path.join(workdir, name)
        for mode in (["--mode", "train"], ["--mode", "eval", "--attack", "none,corruptions"]):
            subprocess.run([sys.executable, "main.py", *common, *extra, "--workdir", run, *mode],
                           cwd=REPO, check=True)
    subprocess.run([sys.executable, "main.py", *common, "--mode", "report", "--checkpoints",
                    ",".join(os.path.join(workdir, name) for name in RUNS), "--workdir",
                    os.path.join(workdir, "table")], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
