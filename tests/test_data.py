"""Data that prepares itself: an archive in the official CIFAR-10 binary format, served from
127.0.0.1, is downloaded, verified, read and prepared once, by one of several processes at once;
a truncated download, a checksum mismatch, a bad placed archive and no network each stop with a
one-line error and leave nothing behind; a damaged prepared split is prepared again, or refused
in one line when its archive is gone."""

import errno
import hashlib
import http.server
import io
import os
import select
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest

from fpcm_jax.data import archives, datasets
from fpcm_jax.files import written_whole

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
    """/good/, /truncated/ (announces the full length, sends half), /other/ (another archive)
    and /slow/ (the good one in 10 parts 0.08 s apart) each serve cifar-10-binary.tar.gz;
    /files/<name> serves files[name] (a mirror of several files); `requests` counts what was
    asked."""

    def __init__(self, good, other, files=None):
        self.requests = []
        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server_self.requests.append(self.path)
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "files" and name in (files or {}):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(files[name])))
                    self.end_headers()
                    self.wfile.write(files[name])
                    return
                body = {"good": good, "truncated": good, "other": other, "slow": good}.get(kind)
                if body is None or not self.path.endswith("cifar-10-binary.tar.gz"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind == "slow":
                    for part in np.array_split(np.frombuffer(body, np.uint8), 10):
                        self.wfile.write(part.tobytes())
                        time.sleep(0.08)
                    return
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


PREPARED = ["fpcm_jax/cifar10/prepare.lock", "fpcm_jax/cifar10/prepared.json",
            "fpcm_jax/cifar10/test.npz", "fpcm_jax/cifar10/train.npz"]
LOCK_ONLY = ["fpcm_jax/cifar10/prepare.lock"]  # what a failed preparation leaves


def leftovers(data_dir):
    return sorted(os.path.relpath(os.path.join(root, name), data_dir)
                  for root, _, names in os.walk(data_dir) for name in names)


def test_download_verifies_prepares_once_and_reads_the_official_layout(served, tmp_path):
    server, (_, train_images, train_labels, test_images, test_labels), digest = served
    before = len(server.requests)
    options = dict(validation_size=0, source_url=f"{server.url}/good", source_sha256=digest)
    train, _, test = datasets.load("cifar10", str(tmp_path), **options)
    np.testing.assert_array_equal(train.images, train_images)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert len(server.requests) == before + 1
    assert leftovers(tmp_path) == ["downloads/cifar-10-binary.tar.gz", *PREPARED]
    again, _, _ = datasets.load("cifar10", str(tmp_path), **options)
    np.testing.assert_array_equal(again.images, train_images)
    assert len(server.requests) == before + 1  # prepared: no second download


@pytest.mark.parametrize("kind, message", [("truncated", "is truncated"),
                                           ("other", "has SHA-256")])
def test_a_bad_download_is_one_line_and_keeps_nothing(served, tmp_path, kind, message):
    server, _, digest = served
    with pytest.raises(datasets.DatasetError, match=message) as error:
        datasets.load("cifar10", str(tmp_path), source_url=f"{server.url}/{kind}",
                  source_sha256=digest)
    assert "\n" not in str(error.value) and "nothing was kept" in str(error.value)
    assert leftovers(tmp_path) == LOCK_ONLY


def test_offline_fails_at_once_naming_the_file_and_where_to_put_it(tmp_path):
    start = time.time()
    with pytest.raises(datasets.DatasetError) as error:
        datasets.load("cifar10", str(tmp_path), source_url="http://127.0.0.1:9")  # nothing listens
    assert time.time() - start < 10
    message = str(error.value)
    assert "cifar-10-binary.tar.gz" in message and os.path.join(str(tmp_path), "downloads") in message
    with pytest.raises(datasets.DatasetError, match="not prepared and --config.data.download is False"):
        datasets.load("cifar10", str(tmp_path), download=False)
    assert leftovers(tmp_path) == LOCK_ONLY


def test_a_placed_archive_is_verified_and_used_without_a_download(served, tmp_path):
    server, (archive, train_images, *_), digest = served
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(archive)
    train, _, _ = datasets.load("cifar10", str(tmp_path), source_url="http://127.0.0.1:9",
                            source_sha256=digest)
    np.testing.assert_array_equal(train.images, train_images)
    with pytest.raises(archives.ArchiveError, match="names no archive"):
        archives.prepare("svhn", str(tmp_path), source_sha256="abc")


@pytest.mark.slow
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


PREPARER = """
import hashlib, sys
from fpcm_jax.data import archives
data_dir, url, digest = sys.argv[1:4]
print("ready", flush=True)
sys.stdin.readline()  # all start together
splits = archives.load("cifar10", data_dir, source_url=url, source_sha256=digest)
print(*(hashlib.sha256(a.tobytes()).hexdigest() for a in splits["train"] + splits["test"]))
"""


def digests(train_images, train_labels, test_images, test_labels):
    """SHA-256 of the arrays as prepared: uint8 images, int32 labels."""
    arrays = [train_images, train_labels.astype(np.int32), test_images,
              test_labels.astype(np.int32)]
    return [hashlib.sha256(array.tobytes()).hexdigest() for array in arrays]


def test_three_processes_preparing_one_directory_download_once_and_read_the_same(served,
                                                                                   tmp_path):
    """Three JAX-free processes start preparing one data directory at the same moment, the
    download taking 0.8 s: one downloads and prepares while the others wait, then all read the
    same verified splits, and nothing temporary is left. The code before (one `.part` name
    shared by all, no lock) failed this test 5 runs of 5: a process found the shared `.part`
    renamed away by another (FileNotFoundError)."""
    server, (_, *arrays), digest = served
    before = len(server.requests)
    env = dict(os.environ, PYTHONPATH=REPO)
    command = [sys.executable, "-c", PREPARER, str(tmp_path), f"{server.url}/slow", digest]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    try:
        for process in processes:  # every wait is bounded: a hung child fails the test
            assert select.select([process.stdout], [], [], 60)[0], "a child did not start"
            assert process.stdout.readline() == "ready\n"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err
        assert out.split()[-4:] == digests(*arrays), out
    assert sum("Prepared cifar10" in out for out, _ in results) == 1
    assert server.requests[before:] == ["/slow/cifar-10-binary.tar.gz"]
    assert leftovers(tmp_path) == ["downloads/cifar-10-binary.tar.gz", *PREPARED]


def test_two_writers_of_one_path_each_write_whole_and_a_failed_one_changes_nothing(tmp_path):
    """Each writer has a temporary name of its own; the path shows a whole file only."""
    path = str(tmp_path / "file.bin")
    with written_whole(path, "wb") as first:
        first.write(b"first")
        with written_whole(path, "wb") as second:
            second.write(b"second, longer")
        assert open(path, "rb").read() == b"second, longer"
        first.write(b" whole")
    assert open(path, "rb").read() == b"first whole"
    with pytest.raises(RuntimeError, match="cut"):
        with written_whole(path, "wb") as third:
            third.write(b"cut off")
            third.flush()
            assert open(path, "rb").read() == b"first whole"  # nothing shown before the end
            raise RuntimeError("cut")
    assert open(path, "rb").read() == b"first whole"
    assert os.listdir(tmp_path) == ["file.bin"]


def damage(path, how):
    """Truncate, flip one byte of the image data, or replace with another valid npz."""
    raw = bytearray(open(path, "rb").read())
    if how == "truncated":
        raw = raw[:len(raw) // 2]
    elif how == "flipped":
        raw[len(raw) // 2] ^= 0x10
    else:
        with np.load(path) as stored:
            images, labels = stored["images"].copy(), stored["labels"]
        images[0, 0, 0, 0] ^= 1
        buffer = io.BytesIO()
        np.savez(buffer, images=images, labels=labels)
        raw = buffer.getvalue()
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("file, how", [("train.npz", "truncated"), ("train.npz", "flipped"),
                                       ("train.npz", "replaced"), ("prepared.json", "truncated")])
def test_a_damaged_prepared_split_is_prepared_again_from_its_archive(served, tmp_path, capsys,
                                                                     file, how):
    """Checked on every read: a truncated file, one flipped byte, a valid npz of other content
    (which zip's CRC cannot notice) and unreadable checksums are each prepared again (the
    checksums rewritten), without a download."""
    server, (_, *arrays), digest = served
    options = dict(validation_size=0, source_url=f"{server.url}/good", source_sha256=digest)
    datasets.load("cifar10", str(tmp_path), **options)
    before = len(server.requests)
    damage(str(tmp_path / "fpcm_jax" / "cifar10" / file), how)
    capsys.readouterr()
    train, _, test = datasets.load("cifar10", str(tmp_path), **options)
    assert "Preparing it again." in capsys.readouterr().out
    assert digests(train.images, train.labels, test.images, test.labels) == digests(*arrays)
    assert len(server.requests) == before
    assert leftovers(tmp_path) == ["downloads/cifar-10-binary.tar.gz", *PREPARED]
    splits = archives.load_prepared("cifar10", str(tmp_path))  # verified again
    assert digests(*splits["train"], *splits["test"]) == digests(*arrays)


@pytest.mark.parametrize("how", ["flipped", "replaced"])
def test_a_damaged_split_without_its_archive_is_refused_in_one_line(served, tmp_path, how):
    """Named with the reason it cannot be prepared again and the fix."""
    server, (archive, *_), digest = served
    place(tmp_path, "cifar-10-binary.tar.gz", archive)
    datasets.load("cifar10", str(tmp_path), source_sha256=digest)
    os.remove(tmp_path / "downloads" / "cifar-10-binary.tar.gz")
    damaged = tmp_path / "fpcm_jax" / "cifar10" / "train.npz"
    damage(str(damaged), how)
    with pytest.raises(datasets.DatasetError) as error:
        datasets.load("cifar10", str(tmp_path), source_sha256=digest, download=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{damaged} is damaged: SHA-256 ")
    assert "It cannot be prepared again" in message and "place cifar-10-binary.tar.gz" in message


def test_a_placed_archive_with_a_wrong_checksum_is_refused_in_one_line(served, tmp_path):
    """Named with both checksums and the fix; nothing is prepared and nothing downloaded."""
    server, _, digest = served
    other = cifar10_archive(1)[0]
    placed = tmp_path / "downloads" / "cifar-10-binary.tar.gz"
    place(tmp_path, placed.name, other)
    before = len(server.requests)
    with pytest.raises(datasets.DatasetError) as error:
        datasets.load("cifar10", str(tmp_path), source_url=f"{server.url}/good", source_sha256=digest)
    assert str(error.value) == (f"{placed} (placed there) has SHA-256 "
                                f"{hashlib.sha256(other).hexdigest()}, not the expected {digest}: "
                                f"delete it, or replace it with the official file.")
    assert len(server.requests) == before
    assert leftovers(tmp_path) == ["downloads/cifar-10-binary.tar.gz", *LOCK_ONLY]


def test_without_file_locks_the_data_is_still_prepared(served, tmp_path, monkeypatch, capsys):
    """Some network file systems refuse locks (ENOLCK): preparation goes on, with a warning."""
    server, (_, *arrays), digest = served

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(archives.fcntl, "flock", refuse)
    splits = archives.load("cifar10", str(tmp_path), source_url=f"{server.url}/good",
                           source_sha256=digest)
    assert digests(*splits["train"], *splits["test"]) == digests(*arrays)
    assert "cannot lock" in capsys.readouterr().err


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
    train, _, test = datasets.load("cifar100", str(tmp_path), source_sha256=checksum)
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
    train, _, test = datasets.load("svhn", str(tmp_path), source_sha256=",".join(checksums))
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
    train, _, test = datasets.load("imagenette", str(tmp_path), source_sha256=checksum)
    assert train.images.shape == (6, 160, 160, 3) and test.images.shape == (6, 160, 160, 3)
    assert sorted(train.labels.tolist()) == sorted(expected["train"])
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert abs(int(train.images[..., 2].mean()) - 200) <= 3  # the colour survives JPEG
