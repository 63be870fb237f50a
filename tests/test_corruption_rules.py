"""The rules of a corruption evaluation that the known-answer test of test_corruptions.py does
not pin (issue 37, items 11 and 13), each on an archive in the official layout made here:

- fewer images than a severity block: each severity's cells are the first N images of its own
  block (5 severities of COUNT images), not of another severity's;
- a clean split shorter than the archive's blocks: the count is clamped to the clean split;
- an archive whose labels are not the test split's is refused;
- the CIFAR-10.1 files are checked for their format;
- the perturbation is measured against the clean image (corrupted minus clean), and the
  low/high split follows the measured radius, not the corruptions' names or order: on grey
  test images each corruption adds a pattern of known spectrum, exactly representable in uint8
  (a constant shift, or a wave of period 4 or 2 pixels), the low half being the last 9 names;
- the boundary of the high-frequency share: a wave at radius exactly 0.25 is not "above".
"""

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest

import test_data
from test_corruptions import (COUNT, corruption_tar, marker_checkpoint, marker_config,
                              mirror, npy_bytes, right_markers)  # noqa: F401 (the fixture)
from fpcm_jax.data import archives, corruptions
from fpcm_jax.evaluation import evaluate


def placed_corruptions(data_dir, tar_bytes):
    """CIFAR-10-C.tar placed in data_dir/downloads; the file:sha256 setting accepting it."""
    downloads = data_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    (downloads / "CIFAR-10-C.tar").write_bytes(tar_bytes)
    return f"CIFAR-10-C.tar:{hashlib.sha256(tar_bytes).hexdigest()}"


def marker_run(mirror, tmp_path, tar_bytes=None, **options):
    """The corruption entry of an evaluation of the marker model, on the mirror's CIFAR-10-C or
    on `tar_bytes` placed by hand."""
    config = marker_config(mirror, tmp_path / "data")
    if tar_bytes is not None:
        config.data.source_sha256 += "," + placed_corruptions(tmp_path / "data", tar_bytes)
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    result = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved,
                                     batch_size=8, **options)
    return result["attacks"]["corruptions"]


def test_fewer_images_than_a_block_take_each_severitys_own_first_images(mirror, tmp_path):
    """13 of the 40 images per severity: a cell's accuracy is the share of right markers among
    the first 13 images of its severity's block (the first right_markers(i, s) are right)."""
    entry = marker_run(mirror, tmp_path, num_examples=13,
                       corruption_options={"names": ["fog", "saturate", "jpeg_compression"]})
    assert entry["examples_per_cell"] == 13
    for name in ("fog", "saturate", "jpeg_compression"):
        index = corruptions.ALL.index(name)
        for severity in (1, 2, 3, 4, 5):
            right = min(right_markers(index, severity), 13)
            assert entry["cells"][name][str(severity)]["accuracy"] == right / 13, (name,
                                                                                   severity)


def test_blocks_longer_than_the_clean_split_are_clamped_to_it(mirror, tmp_path):
    """An archive of 50 images per severity for a test split of 40 (its first 40 are the test
    split's): every cell is over the 40, with the known accuracy."""
    _, _, _, test_images, test_labels = mirror
    rng = np.random.default_rng(7)
    extra_images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    longer = corruption_tar("CIFAR-10-C", np.concatenate([test_images, extra_images]),
                            np.concatenate([test_labels, rng.integers(0, 10, 10)]))
    entry = marker_run(mirror, tmp_path, longer,
                       corruption_options={"names": ["snow"], "severities": [2, 5]})
    assert entry["examples_per_cell"] == COUNT
    index = corruptions.ALL.index("snow")
    for severity in (2, 5):  # right_markers counts over 50 now: the first k are right
        right = min(right_markers(index, severity), COUNT)
        assert entry["cells"]["snow"][str(severity)]["accuracy"] == right / COUNT


def test_an_archive_with_other_labels_is_refused(mirror, tmp_path):
    _, _, _, test_images, test_labels = mirror
    shuffled = np.roll(test_labels, 1)
    assert not np.array_equal(shuffled, test_labels)
    with pytest.raises(ValueError, match="labels differ from the cifar10 test split's") as raised:
        marker_run(mirror, tmp_path, corruption_tar("CIFAR-10-C", test_images, shuffled))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("images, labels", [
    (np.zeros((6, 32, 32, 1), np.uint8), np.zeros(6, np.int64)),     # one channel
    (np.zeros((6, 32, 32, 3), np.float32), np.zeros(6, np.int64)),   # not uint8
    (np.zeros((6, 32, 32, 3), np.uint8), np.zeros(5, np.int64)),     # a label missing
])
def test_cifar10_1_files_of_another_format_are_refused(images, labels, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    files = {"cifar10.1_v6_data.npy": npy_bytes(images),
             "cifar10.1_v6_labels.npy": npy_bytes(labels)}
    for name, content in files.items():
        (downloads / name).write_bytes(content)
    checksums = ",".join(f"{name}:{hashlib.sha256(content).hexdigest()}"
                         for name, content in files.items())
    with pytest.raises(archives.ArchiveError, match="The CIFAR-10.1 files hold"):
        corruptions.cifar10_1(str(tmp_path), False, "", checksums)


GREY = 128
# Patterns of known spectrum with values in {-a, 0, a} (exact in uint8 around grey): a wave of
# period 4 along x (cos(pi x / 2): radius 8/32 = 0.25), along y and x (radius sqrt(2)/4), of
# period 2 (radius 0.5), and a constant shift (radius 0).
WAVE4 = np.rint(np.cos(np.pi * np.arange(32) / 2)).astype(np.int64)
WAVE2 = np.rint(np.cos(np.pi * np.arange(32))).astype(np.int64)
PATTERNS = {"shift": (np.ones((32, 32), np.int64), 0.0, 0.0),
            "x4": (np.tile(WAVE4, (32, 1)), 0.25, 0.0),          # exactly at the cutoff
            "xy4": (np.outer(WAVE4, WAVE4), np.sqrt(2) / 4, 1.0),
            "x2": (np.tile(WAVE2, (32, 1)), 0.5, 1.0)}
LOW = corruptions.ALL[-9:]  # the last 9 names: a constant shift each


def pattern_of(name):
    if name in LOW:
        return "shift"
    return ("x4", "xy4", "x2")[corruptions.ALL.index(name) % 3]


def grey_cifar_archive(test_labels):
    """cifar-10-binary.tar.gz whose test images are all grey (train images random)."""
    rng = np.random.default_rng(2)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as packed, \
            tarfile.open(fileobj=packed, mode="w") as tar:
        for index in range(1, 7):
            name = f"data_batch_{index}.bin" if index < 6 else "test_batch.bin"
            count = len(test_labels) if index == 6 else 8
            images = (np.full((count, 32, 32, 3), GREY, np.uint8) if index == 6 else
                      rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))
            labels = test_labels if index == 6 else rng.integers(0, 10, count)
            rows = np.concatenate([labels.astype(np.uint8)[:, None],
                                   images.transpose(0, 3, 1, 2).reshape(count, 3072)], 1)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = rows.nbytes
            tar.addfile(info, io.BytesIO(rows.tobytes()))
    return buffer.getvalue()


def patterned_corruptions(count, labels):
    """CIFAR-10-C.tar: each corruption adds its pattern (amplitude 10 x severity) to grey."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        members = {"labels": np.tile(labels.astype(np.int64), 5)}
        for name in corruptions.ALL:
            pattern = PATTERNS[pattern_of(name)][0]
            blocks = [np.broadcast_to((GREY + 10 * s * pattern)[None, :, :, None],
                                      (count, 32, 32, 3)).astype(np.uint8) for s in range(1, 6)]
            members[name] = np.concatenate(blocks)
        for name, array in members.items():
            content = npy_bytes(array)
            info = tarfile.TarInfo(f"CIFAR-10-C/{name}.npy")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_the_split_follows_the_measured_radius_of_the_perturbation(mirror, tmp_path):
    """Every cell's radius and high-frequency share are the pattern's (measured on corrupted
    minus clean: the grey images themselves would put nearly all energy at 0), and the low
    half is the 9 shifted corruptions, the last 9 names."""
    labels = np.arange(8) % 10
    cifar, tar = grey_cifar_archive(labels), patterned_corruptions(8, labels)
    data_dir = tmp_path / "data"
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "cifar-10-binary.tar.gz").write_bytes(cifar)
    config = marker_config(mirror, data_dir)
    config.data.download = False
    config.data.source_sha256 = (f"cifar-10-binary.tar.gz:{hashlib.sha256(cifar).hexdigest()},"
                                 + placed_corruptions(data_dir, tar))
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    entry = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved,
                                    batch_size=8)["attacks"]["corruptions"]
    for name in corruptions.ALL:
        _, radius, high = PATTERNS[pattern_of(name)]
        for severity in "12345":
            cell = entry["cells"][name][severity]
            assert cell["mean_radius"] == pytest.approx(radius, abs=1e-6), name
            assert cell["high_fraction"] == pytest.approx(high, abs=1e-6), name
    groups = entry["frequency_groups"]
    assert sorted(groups["low"]["corruptions"]) == sorted(LOW)
    assert sorted(groups["high"]["corruptions"]) == sorted(set(corruptions.ALL) - set(LOW))
    assert groups["low"]["mean_radius"] == 0.0
