"""The datasets' official archives: download once (progress bar, SHA-256 verified), read them
without TensorFlow, and keep the splits prepared as uint8 `.npz` files.

    <data dir>/downloads/<archive>                    verified archives (or placed there by hand)
    <data dir>/fpcm_jax/<dataset>/{train,test}.npz    prepared splits: images (N,H,W,3) uint8,
                                                      labels (N,) int32
    <data dir>/fpcm_jax/<dataset>/prepared.json       their SHA-256, checked on every read
    <data dir>/fpcm_jax/<dataset>/prepare.lock        held by the process preparing the dataset

<data dir> is `config.data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (the
tensorflow-datasets default). One process at a time prepares a dataset (the lock); others wait,
then read what it prepared. Downloads and prepared splits are written under temporary names of
their own (`files.written_whole`) and renamed when whole, a download only once its length and
SHA-256 are right; `prepared.json` is written last. So an interrupted or corrupted download
leaves nothing that a later run takes for prepared data, and a prepared split damaged later
(its SHA-256 differs) is prepared again, or refused in one line when its archive is gone. The
readers follow the official formats (and tensorflow-datasets' label order): CIFAR-10/100 binary
records, SVHN's MATLAB files, Imagenette's JPEG folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from fpcm_jax import progress
from fpcm_jax.files import write_json, written_whole


@dataclasses.dataclass(frozen=True)
class Archive:
    name: str
    size: int
    sha256: Optional[str]


# From tensorflow-datasets' url_checksums (the same files the tfds builders download).
OFFICIAL = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",
                [Archive("cifar-10-binary.tar.gz", 170052171,
                         "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")]),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",
                 [Archive("cifar-100-binary.tar.gz", 168513733,
                          "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec")]),
    "svhn": ("http://ufldl.stanford.edu/housenumbers/",
             [Archive("train_32x32.mat", 182040794,
                      "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"),
              Archive("test_32x32.mat", 64275384,
                      "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b")]),
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/",
                   [Archive("imagenette2-160.tgz", 99003388,
                            "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5")]),
}
# Test sets beyond the datasets' own (`fpcm_jax.data.corruptions`): Hendrycks and Dietterich's
# common corruptions on Zenodo (CIFAR-10-C's checksum is tensorflow-datasets'; none is published
# for CIFAR-100-C where this was written: its first verified file is recorded instead), and
# CIFAR-10.1 v6 (tensorflow-datasets' checksums). {dataset: (base URL, archives)}.
CORRUPTIONS = {
    "cifar10": ("https://zenodo.org/record/2535967/files/",
                [Archive("CIFAR-10-C.tar", 2918471680,
                         "c72763e101c723b7c507b96205f7e938912a5d587376173b825850cf3cb876a7")]),
    "cifar100": ("https://zenodo.org/record/3555552/files/",
                 [Archive("CIFAR-100-C.tar", 0, None)]),
}
CIFAR10_1 = ("https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/",
             [Archive("cifar10.1_v6_data.npy", 6144128,
                      "2997188e5816f5bd545dc77771b6227828c28146049fcecf3fa10775474cacc6"),
              Archive("cifar10.1_v6_labels.npy", 8128,
                      "ae40beda001693674edc94d925ee8268cfe68905f8f9aff800c8dcdfcd6c9448")])
CONNECT_TIMEOUT_SECONDS = 15  # offline, a download fails within this
CHECKSUMS_FILE, LOCK_FILE = "prepared.json", "prepare.lock"


class ArchiveError(RuntimeError):
    """A dataset archive cannot be downloaded or read; the message says what to do."""


class NotPrepared(ArchiveError):
    """Nothing of a dataset is prepared yet."""


class DamagedData(ArchiveError):
    """Prepared splits that are incomplete or differ from their recorded SHA-256."""


def data_root(data_dir: Optional[str]) -> str:
    return os.path.abspath(os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"))


def prepared_paths(name: str, data_dir: Optional[str]) -> Dict[str, str]:
    folder = os.path.join(data_root(data_dir), "fpcm_jax", name)
    return {split: os.path.join(folder, f"{split}.npz") for split in ("train", "test")}


def is_prepared(name: str, data_dir: Optional[str]) -> bool:
    """Whether the splits and their checksums are there (`load_prepared` verifies them)."""
    paths = list(prepared_paths(name, data_dir).values())
    checksums = os.path.join(os.path.dirname(paths[0]), CHECKSUMS_FILE)
    return all(os.path.exists(path) for path in paths + [checksums])


def load(name: str, data_dir: Optional[str], download: bool = True, source_url: str = "",
         source_sha256: str = "", image_size: int = 32) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The prepared splits, verified; prepared first when missing, and again when damaged."""
    try:
        return load_prepared(name, data_dir)
    except NotPrepared:
        prepare(name, data_dir, download, source_url, source_sha256, image_size)
    except DamagedData as damage:
        print(f"{damage} Preparing it again.", flush=True)
        try:
            prepare(name, data_dir, download, source_url, source_sha256, image_size)
        except ArchiveError as error:
            raise DamagedData(f"{damage} It cannot be prepared again: {error}") from None
    return load_prepared(name, data_dir)


def load_prepared(name: str, data_dir: Optional[str]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The prepared splits, each checked against the SHA-256 recorded when it was prepared."""
    _check_prepared(name, data_dir)
    splits = {}
    for split, path in prepared_paths(name, data_dir).items():
        with np.load(path) as stored:
            splits[split] = (stored["images"], stored["labels"])
    return splits


def _check_prepared(name: str, data_dir: Optional[str]) -> None:
    """Raise NotPrepared when nothing is prepared, DamagedData when the splits are incomplete
    or differ from their checksums (hashing CIFAR-10's 184 MB of splits took 0.36 s warm, 0.9 s
    cold, on a 2-core machine: cheap next to a start, so no cache that could miss damage)."""
    paths = prepared_paths(name, data_dir)
    checksums = os.path.join(os.path.dirname(paths["train"]), CHECKSUMS_FILE)
    if not any(os.path.exists(path) for path in [checksums, *paths.values()]):
        raise NotPrepared(f"Dataset {name} is not prepared in {os.path.dirname(checksums)}.")
    try:
        with open(checksums) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError) as error:
        raise DamagedData(f"The prepared {name} cannot be verified: {checksums} is unreadable "
                          f"({error}).") from None
    for path in paths.values():
        if not os.path.exists(path):
            raise DamagedData(f"{path} is missing (its checksum is in {checksums}).")
        found, expected = file_sha256(path), recorded.get(os.path.basename(path))
        if found != expected:
            raise DamagedData(f"{path} is damaged: SHA-256 {found}, not the {expected} "
                              f"recorded when it was prepared.")


def prepare(name: str, data_dir: Optional[str], download: bool = True, source_url: str = "",
            source_sha256: str = "", image_size: int = 32) -> None:
    """Download (unless the archives are there already) and prepare a dataset's splits, unless
    another process has just prepared them intact: one at a time, the others wait."""
    base_url, archives = OFFICIAL[name]
    archives = with_checksums(archives, source_sha256)
    paths = prepared_paths(name, data_dir)
    folder = os.path.dirname(paths["train"])
    with one_at_a_time(folder, name):
        try:
            _check_prepared(name, data_dir)
            return  # prepared, intact, by another process while this one waited
        except ArchiveError:
            pass  # not prepared, or damaged: prepare it
        downloads = os.path.join(data_root(data_dir), "downloads")
        sources = [fetch(archive, (source_url or base_url), downloads, download, name)
                   for archive in archives]
        splits = READERS[name](sources, image_size)
        for split, path in paths.items():
            images, labels = splits[split]
            with written_whole(path, "wb") as handle:
                np.savez(handle, images=images.astype(np.uint8), labels=labels.astype(np.int32))
        write_json(os.path.join(folder, CHECKSUMS_FILE),
                   {os.path.basename(path): file_sha256(path) for path in paths.values()})
    print(f"Prepared {name} in {folder} ({len(splits['train'][1])} training, "
          f"{len(splits['test'][1])} test images).")


@contextlib.contextmanager
def one_at_a_time(folder: str, name: str) -> Iterator[None]:
    """Hold `folder/prepare.lock` (released by the system if the process dies)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process preparing {name} ({lock.name}).", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks: the temporary names still hold
            print(f"warning: cannot lock {lock.name} ({error}); preparing {name} unlocked.",
                  file=sys.stderr)
        yield


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def with_checksums(archives: List[Archive], source_sha256: str,
                   training_dataset: bool = True) -> List[Archive]:
    """The official checksums, or those given as 'file:sha256,...' for files that differ from
    the official ones. A bare sha256 (no file name) is the training dataset's one archive: it
    never applies to the test sets' files (training_dataset=False: CIFAR-10-C, CIFAR-10.1)."""
    if not source_sha256:
        return archives
    names = [archive.name for archive in archives]
    known = {archive.name for _, files in [*OFFICIAL.values(), *CORRUPTIONS.values(), CIFAR10_1]
             for archive in files}  # a mirror's list may name the test sets' files too
    given = {}
    for item in source_sha256.split(","):
        file_name, _, digest = item.strip().rpartition(":")
        if not file_name and not training_dataset:
            continue
        if not file_name and len(archives) == 1:
            file_name = names[0]
        if file_name not in known | set(names):
            raise ArchiveError(f"--config.data.source_sha256: {item.strip()!r} names no archive "
                               f"of this dataset; give 'file:sha256' for {', '.join(names)}.")
        given[file_name] = digest.lower()
    return [Archive(a.name, 0, given[a.name]) if a.name in given else a for a in archives]


def fetch(archive: Archive, base_url: str, downloads: str, download: bool,
           dataset: str) -> str:
    """The verified archive's path: already downloaded (or placed by hand in downloads/ or
    downloads/manual/), else downloaded now."""
    for folder in (downloads, os.path.join(downloads, "manual")):
        path = os.path.join(folder, archive.name)
        if os.path.exists(path):
            verify(path, archive, placed=True)
            return path
    target = os.path.join(downloads, archive.name)
    url = base_url.rstrip("/") + "/" + archive.name
    if not download:
        raise ArchiveError(f"Dataset {dataset} is not prepared and --config.data.download is "
                           f"False: place {archive.name} (from {url}) in {downloads}/, or allow "
                           f"the download.")
    os.makedirs(downloads, exist_ok=True)
    with written_whole(target, "wb") as handle:
        _download(url, handle, archive)
        handle.flush()
        verify(handle.name, archive, placed=False)
    return target


def _download(url: str, handle: io.BufferedWriter, archive: Archive) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_SECONDS)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ArchiveError(f"Cannot download {url} ({reason}). Offline? Place {archive.name} in "
                           f"{os.path.dirname(handle.name)}/ and run again.") from None
    expected = int(response.headers.get("Content-Length") or archive.size or 0)
    received = 0
    with response:
        bar = progress.bar(expected or None, f"downloading {archive.name}", unit="B",
                           unit_scale=True)
        try:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, urllib.error.URLError, ValueError) as error:
            raise ArchiveError(f"The download of {url} broke off after {received:,} bytes "
                               f"({error}); nothing was kept. Run again.") from None
        finally:
            bar.close()
    if expected and received != expected:
        raise ArchiveError(f"The download of {url} is truncated ({received:,} of {expected:,} "
                           f"bytes); nothing was kept. Run again.")


def verify(path: str, archive: Archive, placed: bool) -> None:
    """The file's SHA-256 is the archive's (an archive without a published one, sha256 None,
    is checked by its reader and recorded there instead)."""
    if archive.sha256 is None:
        return
    found = file_sha256(path)
    if found != archive.sha256:
        what = (f"{path} (placed there) has SHA-256 {found}, not the expected "
                f"{archive.sha256}: delete it, or replace it with the official file" if placed else
                f"The downloaded {archive.name} has SHA-256 {found}, not "
                f"{archive.sha256}; nothing was kept. Run again, or check the mirror "
                f"(--config.data.source_url, or test_sets_url for the test sets) and "
                f"--config.data.source_sha256")
        raise ArchiveError(what + ".")


def _cifar(paths: List[str], image_size: int, label_bytes: int, folder: str,
           train_files: List[str], test_files: List[str]):
    record = label_bytes + 3072
    with tarfile.open(paths[0]) as archive:
        def read(files):
            raw = b"".join(archive.extractfile(f"{folder}/{name}").read() for name in files)
            if len(raw) % record:
                raise ArchiveError(f"{paths[0]}: {files} is not in the CIFAR binary format.")
            rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
            images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(images), rows[:, label_bytes - 1].astype(np.int32)

        try:
            return {"train": read(train_files), "test": read(test_files)}
        except KeyError as error:
            raise ArchiveError(f"{paths[0]} lacks {error}: not the official archive.") from None


def _read_cifar10(paths, image_size):
    return _cifar(paths, image_size, 1, "cifar-10-batches-bin",
                  [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"])


def _read_cifar100(paths, image_size):  # records: coarse label, fine label (the label), image
    return _cifar(paths, image_size, 2, "cifar-100-binary", ["train.bin"], ["test.bin"])


def _read_svhn(paths, image_size):
    from scipy.io import loadmat  # scipy comes with scikit-learn

    splits = {}
    for split, path in zip(("train", "test"), paths):
        content = loadmat(path)
        images = np.ascontiguousarray(content["X"].transpose(3, 0, 1, 2))  # (32,32,3,N) -> NHWC
        labels = content["y"].reshape(-1).astype(np.int32) % 10  # the digit 0 is stored as 10
        splits[split] = (images, labels)
    return splits


def _read_imagenette(paths, image_size):
    from PIL import Image

    splits = {"train": ([], []), "test": ([], [])}
    with tarfile.open(paths[0]) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith(".JPEG")),
                         key=lambda m: m.name)
        classes = sorted({m.name.split("/")[-2] for m in members})
        for member in members:
            _, split_dir, wnid, _ = member.name.split("/")[-4:]
            images, labels = splits["train" if split_dir == "train" else "test"]
            image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
            images.append(fit_image(np.asarray(image), image_size))
            labels.append(classes.index(wnid))
    return {split: (np.stack(images), np.asarray(labels, np.int32))
            for split, (images, labels) in splits.items()}


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and center-crop (Imagenette); CIFAR passes through."""
    if image.shape[:2] == (size, size):
        return image
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    from PIL import Image

    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(new_size, Image.BILINEAR))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top:top + size, left:left + size]


READERS = {"cifar10": _read_cifar10, "cifar100": _read_cifar100, "svhn": _read_svhn,
           "imagenette": _read_imagenette}


if __name__ == "__main__":  # python -m fpcm_jax.data.archives cifar10 [DATA_DIR]: prepare ahead
    prepare(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
