"""Common corruptions (CIFAR-10-C, CIFAR-100-C) and CIFAR-10.1: their archives, read one
corruption at a time.

    archive = CorruptionArchive("cifar10", data_dir)         # downloaded or placed, verified
    for severity, images in archive.read("fog", (1, 3, 5), count=1000): ...
    split = cifar10_1(data_dir)                               # CIFAR-10.1 v6, 2,000 images

Hendrycks and Dietterich's archives (Zenodo) hold, under CIFAR-10-C/ (CIFAR-100-C/), one .npy
per corruption, 50,000 x 32 x 32 x 3 uint8: the 10,000 test images at severities 1-5 in blocks
of 10,000 (in the test split's order), and labels.npy beside them. The archive (2.9 GB) is
never read whole into memory: its members are located once (`members.json` in
<data dir>/fpcm_jax/<dataset>_corrupted/: each member's offset, size and SHA-256, with the
archive's size, time and SHA-256), and each read maps one member from the archive file, after
checking that member's SHA-256, and copies out only the severities asked for.

Verification: CIFAR-10-C's SHA-256 and size are tensorflow-datasets' (url_checksums); for
CIFAR-100-C none is published where this was written, so its format is checked (every
corruption and labels.npy, shapes and dtype) and the SHA-256 of the first verified file is
recorded, so that a later, different file is refused. CIFAR-10.1 v6 (two .npy files) has
tensorflow-datasets' checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from fpcm_jax.data import archives
from fpcm_jax.data.archives import ArchiveError
from fpcm_jax.files import write_json

# The 15 corruptions of the benchmark (RobustBench's mean over them x 5 severities) and the 4
# extra ones of the archives (tensorflow-datasets' BENCHMARK_CORRUPTIONS / EXTRA_CORRUPTIONS;
# names as the archives' files).
STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
            "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
            "elastic_transform", "pixelate", "jpeg_compression")
EXTRA = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
ALL = STANDARD + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)
LABELS = "labels"


FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}  # the top folder in each tar
MEMBERS_FILE = "members.json"


def check_request(dataset: str, names: Optional[Sequence[str]],
                  severities: Optional[Sequence[int]]) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """(corruptions, severities) asked for (default: all 19, severities 1-5); a one-line
    ValueError for a dataset without corruptions, an unknown name or a severity outside 1-5."""
    if dataset not in archives.CORRUPTIONS:
        raise ValueError(f"--attack corruptions needs a dataset with common corruptions "
                         f"({', '.join(archives.CORRUPTIONS)}: CIFAR-10-C, CIFAR-100-C); "
                         f"{dataset} has none.")
    names = tuple(names) if names else ALL
    unknown = [name for name in names if name not in ALL]
    if unknown:
        raise ValueError(f"--corruptions: unknown corruption {unknown[0]!r}; valid: "
                         f"{', '.join(ALL)}.")
    severities = tuple(int(s) for s in severities) if severities else SEVERITIES
    wrong = [s for s in severities if s not in SEVERITIES]
    if wrong or not severities:
        raise ValueError(f"--severities: {wrong[0] if wrong else 'none'} is not a severity; "
                         f"give values in 1-5 (e.g. 1,3,5).")
    return names, severities


class CorruptionArchive:
    """A dataset's corruption archive, verified and located (`members.json`) once."""

    def __init__(self, dataset: str, data_dir: Optional[str] = None, download: bool = True,
                 mirror_url: str = "", source_sha256: str = ""):
        """mirror_url: a mirror's base URL for the archive (config.data.test_sets_url);
        source_sha256: 'file:sha256,...' (config.data.source_sha256; a bare digest there is the
        training dataset's, not this archive's)."""
        base_url, files = archives.CORRUPTIONS[dataset]
        [self.archive] = archives.with_checksums(files, source_sha256, training_dataset=False)
        self.top = FOLDERS[dataset]
        self.dataset, self.data_dir, self.download = dataset, data_dir, download
        self.base_url = mirror_url or base_url
        root = archives.data_root(data_dir)
        self.folder = os.path.join(root, "fpcm_jax", f"{dataset}_corrupted")
        self.downloads = os.path.join(root, "downloads")
        self.path, self.members = self._located()

    def _located(self) -> Tuple[str, Dict[str, List]]:
        """(archive path, {member: [offset, size, sha256]}), verifying the archive the first
        time, when it changed since, or when another checksum is required now (one accepted
        under a custom checksum is verified again against the official one), one process at a
        time."""
        recorded = self._recorded()
        if recorded and self._unchanged(recorded):
            return recorded["path"], recorded["members"]
        with archives.one_at_a_time(self.folder, f"{self.dataset} corruptions"):
            recorded = self._recorded()
            if recorded and self._unchanged(recorded):
                return recorded["path"], recorded["members"]
            path = archives.fetch(self.archive, self.base_url, self.downloads, self.download,
                                  f"{self.dataset} corruptions")
            digest = archives.file_sha256(path)
            first = (recorded or {}).get("first_sha256")
            if self.archive.sha256 is None and first and digest != first:
                raise ArchiveError(f"{path} has SHA-256 {digest}, not the {first} of the file "
                                   f"first verified here ({self.archive.name} has no published "
                                   f"checksum): delete it, or replace it with that file.")
            members = self._index(path)
            stat = os.stat(path)
            write_json(os.path.join(self.folder, MEMBERS_FILE),
                       {"path": path, "size": stat.st_size, "mtime": stat.st_mtime,
                        "sha256": digest, "first_sha256": first or digest,
                        "required_sha256": self.archive.sha256, "members": members})
            return path, members

    def _recorded(self) -> Optional[Dict]:
        path = os.path.join(self.folder, MEMBERS_FILE)
        try:
            with open(path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _unchanged(self, recorded: Dict) -> bool:
        try:
            stat = os.stat(recorded["path"])
        except (OSError, KeyError, TypeError):
            return False
        return (stat.st_size == recorded.get("size") and stat.st_mtime == recorded.get("mtime")
                and recorded.get("required_sha256", "unrecorded") == self.archive.sha256)

    def _index(self, path: str) -> Dict[str, List]:
        """{corruption or 'labels': [data offset, size, SHA-256]}: every member of the official
        layout, its format checked (uint8 images (5 n, H, W, 3), n labels per severity)."""
        members = {}
        with _plain_tar(path, self.archive.name) as tar:
            for name in ALL + (LABELS,):
                member_name = f"{self.top}/{name}.npy"
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise ArchiveError(f"{path} lacks {member_name}: not the official "
                                       f"{self.archive.name} (delete it).") from None
                shape, dtype, header = _npy_header(tar.extractfile(member), path, member_name)
                members[name] = [member.offset_data, member.size,
                                 _range_sha256(path, member.offset_data, member.size),
                                 list(shape), dtype, header]
        count = members[LABELS][3][0]
        for name in ALL:
            shape, dtype = members[name][3], members[name][4]
            if dtype != "|u1" or len(shape) != 4 or shape[0] != count or shape[3] != 3 or \
                    count % len(SEVERITIES):
                raise ArchiveError(f"{path}: {name}.npy holds {dtype} {tuple(shape)}, not "
                                   f"{count} uint8 images (5 severities): not the official "
                                   f"{self.archive.name}.")
        return members

    def per_severity(self) -> int:
        """Images per severity (10,000 in the official archives)."""
        return self.members[LABELS][3][0] // len(SEVERITIES)

    def _member(self, name: str) -> np.ndarray:
        """One member, mapped from the archive (nothing read yet), after its SHA-256 check."""
        offset, size, digest, shape, dtype, header = self.members[name]
        if _range_sha256(self.path, offset, size) != digest:
            raise archives.DamagedData(
                f"{self.path} is damaged: {name}.npy differs from the file verified when it was "
                f"first used (SHA-256). Delete it and {os.path.join(self.folder, MEMBERS_FILE)}, "
                f"then run again to fetch it anew.")
        return np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset + header,
                         shape=tuple(shape))

    def labels(self, count: int) -> np.ndarray:
        """The labels of the first `count` images of each severity (the same for all)."""
        return np.asarray(self._member(LABELS)[:count], np.int32)

    def read(self, name: str, severities: Sequence[int], count: int
             ) -> Iterator[Tuple[int, np.ndarray]]:
        """(severity, the first `count` images at it, uint8 in memory) for one corruption; only
        the asked severities are copied out of the archive."""
        images = self._member(name)
        block = self.per_severity()
        try:
            for severity in severities:
                start = (severity - 1) * block
                yield severity, np.array(images[start:start + min(count, block)])
        finally:
            del images  # unmaps the member


def _plain_tar(path: str, name: str) -> tarfile.TarFile:
    """The archive opened as an uncompressed tar (member offsets are file offsets only
    there); a compressed or other file is a one-line ArchiveError."""
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError:
        raise ArchiveError(f"{path} is not an uncompressed tar (compressed, or another format): "
                           f"{name} is read in place, so give the plain .tar as published "
                           f"(decompress it first, e.g. gunzip).") from None


def _npy_header(handle, path: str, member: str) -> Tuple[Tuple[int, ...], str, int]:
    """(shape, dtype string, header length) of a .npy file object."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except ValueError as error:
        raise ArchiveError(f"{path}: {member} is not a .npy file ({error}).") from None
    if fortran:
        raise ArchiveError(f"{path}: {member} is stored in Fortran order, not the official.")
    return tuple(shape), dtype.str, handle.tell()


def _range_sha256(path: str, offset: int, size: int) -> str:
    """SHA-256 of `size` bytes of a file from `offset`, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = size
        while left:
            chunk = handle.read(min(left, 1 << 22))
            if not chunk:
                raise archives.DamagedData(f"{path} is truncated (a member ends past its end).")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def cifar10_1(data_dir: Optional[str] = None, download: bool = True, mirror_url: str = "",
              source_sha256: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10.1 v6 (Recht et al. 2019): 2,000 new CIFAR-10 test images, (images uint8,
    labels int32), its two files downloaded (from mirror_url, config.data.test_sets_url, when
    given) or placed, and verified, on every call; source_sha256 as for CorruptionArchive."""
    base_url, files = archives.CIFAR10_1
    files = archives.with_checksums(files, source_sha256, training_dataset=False)
    downloads = os.path.join(archives.data_root(data_dir), "downloads")
    images, labels = (np.load(archives.fetch(archive, mirror_url or base_url, downloads,
                                             download, "cifar10.1"))
                      for archive in files)
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
        raise ArchiveError(f"The CIFAR-10.1 files hold {images.dtype} {images.shape} and "
                           f"{labels.shape} labels, not 32x32x3 uint8 images with a label each.")
    return images, labels.astype(np.int32)
