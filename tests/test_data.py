"""Data that prepares itself: an archive in the official CIFAR-10 binary format, served from
127.0.0.1, is downloaded, verified, read and prepared once; a truncated download, a checksum
mismatch and no network each stop with a one-line error and leave nothing behind."""

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest

from fpcm_jax import archives, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PER_BATCH, TEST_COUNT = 24, 40


def cifar10_archive(seed):
    """(tar.gz bytes, train images, train labels, test images, test labels) in the layout of
    cifar-10-binary.tar.gz: records of 1 label byte + 3072 bytes (R, G, B planes, rows)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    splits = {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        files = [(f"data_batch_{i}.bin", TRAIN_PER_BATCH) for i in range(1, 6)]
        for name, count in files + [("test_batch.bin", TEST_COUNT)]:
            images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, count).astype(np.uint8)
            planes = images.transpose(0, 3, 1, 2).reshape(count, 3072)
            content = np.concatenate([labels[:, None], planes], axis=1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
            split = "test" if name.startswith("test") else "train"
            splits.setdefault(split, []).append((images, labels))
    train_images, train_labels = (np.concatenate(parts) for parts in zip(*splits["train"]))
    test_images, test_labels = splits["test"][0]
    return buffer.getvalue(), train_images, train_labels, test_images, test_labels


class Server:
    """/good/, /truncated/ (announces the full length, sends half) and /other/ (another
    archive) each serve cifar-10-binary.tar.gz; `requests` counts what was asked."""

    def __init__(self, good, other):
        self.requests = []
        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server_self.requests.append(self.path)
                kind = self.path.strip("/").split("/")[0]
                body = {"good": good, "truncated": good, "other": other}.get(kind)
                if body is None or not self.path.endswith("cifar-10-binary.tar.gz"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if kind == "truncated" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served():
    good = cifar10_archive(0)
    other = cifar10_archive(1)
    server = Server(good[0], other[0])
    yield server, good, hashlib.sha256(good[0]).hexdigest()
    server.httpd.shutdown()


def leftovers(data_dir):
    return sorted(os.path.relpath(os.path.join(root, name), data_dir)
                  for root, _, names in os.walk(data_dir) for name in names)


def test_download_verifies_prepares_once_and_reads_the_official_layout(served, tmp_path):
    server, (_, train_images, train_labels, test_images, test_labels), digest = served
    before = len(server.requests)
    options = dict(validation_size=0, source_url=f"{server.url}/good", source_sha256=digest)
    train, _, test = data.load("cifar10", str(tmp_path), **options)
    np.testing.assert_array_equal(train.images, train_images)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert len(server.requests) == before + 1
    assert leftovers(tmp_path) == ["downloads/cifar-10-binary.tar.gz",
                                   "fpcm_jax/cifar10/test.npz", "fpcm_jax/cifar10/train.npz"]
    again, _, _ = data.load("cifar10", str(tmp_path), **options)
    np.testing.assert_array_equal(again.images, train_images)
    assert len(server.requests) == before + 1  # prepared: no second download


@pytest.mark.parametrize("kind, message", [("truncated", "is truncated"),
                                           ("other", "has SHA-256")])
def test_a_bad_download_is_one_line_and_keeps_nothing(served, tmp_path, kind, message):
    server, _, digest = served
    with pytest.raises(data.DatasetError, match=message) as error:
        data.load("cifar10", str(tmp_path), source_url=f"{server.url}/{kind}",
                  source_sha256=digest)
    assert "\n" not in str(error.value) and "nothing was kept" in str(error.value)
    assert leftovers(tmp_path) == []


def test_offline_fails_at_once_naming_the_file_and_where_to_put_it(tmp_path):
    start = time.time()
    with pytest.raises(data.DatasetError) as error:
        data.load("cifar10", str(tmp_path), source_url="http://127.0.0.1:9")  # nothing listens
    assert time.time() - start < 10
    message = str(error.value)
    assert "cifar-10-binary.tar.gz" in message and os.path.join(str(tmp_path), "downloads") in message
    with pytest.raises(data.DatasetError, match="not prepared and --config.data.download is False"):
        data.load("cifar10", str(tmp_path), download=False)
    assert leftovers(tmp_path) == []


def test_a_placed_archive_is_verified_and_used_without_a_download(served, tmp_path):
    server, (archive, train_images, *_), digest = served
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(archive)
    train, _, _ = data.load("cifar10", str(tmp_path), source_url="http://127.0.0.1:9",
                            source_sha256=digest)
    np.testing.assert_array_equal(train.images, train_images)
    with pytest.raises(archives.ArchiveError, match="names no archive"):
        archives.prepare("svhn", str(tmp_path), source_sha256="abc")


def test_the_main_command_downloads_prepares_and_trains(served, tmp_path):
    server, _, digest = served
    before = len(server.requests)
    command = [sys.executable, "main.py", "--config", "configs/cifar10_resnet18.py",
               "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'data'}",
               f"--config.data.source_url={server.url}/good",
               f"--config.data.source_sha256={digest}", "--config.data.validation_size=8",
               "--config.model.widths=8,8,8,8", "--config.model.stage_sizes=1,1,1,1",
               "--config.train.batch_size=16", "--config.attack.steps=1",
               "--config.train.stop_after_steps=1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Prepared cifar10" in result.stdout and "Stopped at step 1" in result.stdout
    assert len(server.requests) == before + 1


def place(data_dir, name, content):
    folder = data_dir / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return f"{name}:{hashlib.sha256(content).hexdigest()}"


def test_cifar100_binary_records_carry_coarse_then_fine_labels(tmp_path):
    rng = np.random.default_rng(0)
    buffer, splits = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, count in (("train.bin", 30), ("test.bin", 12)):
            images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
            fine = rng.integers(0, 100, count).astype(np.uint8)
            coarse = (fine // 5).astype(np.uint8)
            rows = np.concatenate([coarse[:, None], fine[:, None],
                                   images.transpose(0, 3, 1, 2).reshape(count, 3072)], axis=1)
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = rows.nbytes
            archive.addfile(info, io.BytesIO(rows.tobytes()))
            splits[name] = (images, fine)
    checksum = place(tmp_path, "cifar-100-binary.tar.gz", buffer.getvalue())
    train, _, test = data.load("cifar100", str(tmp_path), source_sha256=checksum)
    np.testing.assert_array_equal(train.images, splits["train.bin"][0])
    np.testing.assert_array_equal(train.labels, splits["train.bin"][1])
    np.testing.assert_array_equal(test.labels, splits["test.bin"][1])


def test_svhn_matlab_files_give_nhwc_images_and_digit_labels(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    checksums, expected = [], {}
    for name, count in (("train_32x32.mat", 20), ("test_32x32.mat", 8)):
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        digits = rng.integers(0, 10, count)
        buffer = io.BytesIO()
        savemat(buffer, {"X": images.transpose(1, 2, 3, 0),
                         "y": np.where(digits == 0, 10, digits).reshape(-1, 1)})
        checksums.append(place(tmp_path, name, buffer.getvalue()))
        expected[name] = (images, digits)
    train, _, test = data.load("svhn", str(tmp_path), source_sha256=",".join(checksums))
    np.testing.assert_array_equal(train.images, expected["train_32x32.mat"][0])
    np.testing.assert_array_equal(train.labels, expected["train_32x32.mat"][1])
    np.testing.assert_array_equal(test.labels, expected["test_32x32.mat"][1])


def test_imagenette_folders_give_160px_images_and_sorted_wordnet_labels(tmp_path):
    from PIL import Image

    wnids = ["n03000684", "n01440764", "n02102040"]  # not in sorted order on purpose
    buffer = io.BytesIO()
    expected = {"train": [], "test": []}
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for split_dir, split in (("train", "train"), ("val", "test")):
            for wnid in wnids:
                for index in range(2):
                    image = Image.new("RGB", (213, 160), color=(index * 90, 40, 200))
                    encoded = io.BytesIO()
                    image.save(encoded, format="JPEG")
                    info = tarfile.TarInfo(f"imagenette2-160/{split_dir}/{wnid}/{index}.JPEG")
                    info.size = len(encoded.getvalue())
                    archive.addfile(info, io.BytesIO(encoded.getvalue()))
                    expected[split].append(sorted(wnids).index(wnid))
    checksum = place(tmp_path, "imagenette2-160.tgz", buffer.getvalue())
    train, _, test = data.load("imagenette", str(tmp_path), source_sha256=checksum)
    assert train.images.shape == (6, 160, 160, 3) and test.images.shape == (6, 160, 160, 3)
    assert sorted(train.labels.tolist()) == sorted(expected["train"])
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert abs(int(train.images[..., 2].mean()) - 200) <= 3  # the colour survives JPEG
