"""Your own data: any prepared tensorflow-datasets dataset, or a folder of images, as splits
whose images are read one at a time (random access), so a split larger than memory is never
held whole.

    config.data.name = "tfds:tiny_imagenet"           # tfds:NAME[/CONFIG][:VERSION]
    config.data.name = "folder:/data/my_set"          # PATH/train/<class>/*.png|jpg, PATH/test|val/
    source = open_source(config.data)                  # .train, .test, .classes, .image_size

tfds: read with `tfds.data_source` (ArrayRecord, no TensorFlow) from `data.data_dir`, the splits
`data.train_split` / `data.test_split` (slicing syntax allowed), the features `data.image_key` /
`data.label_key`; the number of classes and the image size come from the builder's info
(`data.image_size` resizes). The labels are read without decoding the images.

folder: classes are the sub-folders of PATH/train, sorted by name (their images found at any
depth below, as Tiny-ImageNet's train/<class>/images/); the test split is PATH/test (else
PATH/val) and must hold every class; images (png, jpg, jpeg, any mode) are decoded to RGB
and resized to `data.image_size` (the shorter side, then a centre crop), or to the first
image's size when that is not given.

Each split is a `LazyImages` (index it, slice it, `np.asarray` it: only what is asked for is
decoded) and its labels as an int32 array. `fingerprint` names the data: the source, the
splits and a SHA-256 over their index (file names and sizes, or the tfds split's records), so a
resume or an evaluation on other data is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

TFDS, FOLDER = "tfds:", "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(RuntimeError):
    """A dataset that cannot be read; the message says how to fix it."""


def is_external(name: str) -> bool:
    """Whether a data.name is your own data (tfds:... or folder:...), not the registry's."""
    return name.startswith(TFDS) or name.startswith(FOLDER)


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): grey or RGBA made RGB, the shorter side resized to `size`, then
    a centre crop."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3].astype(np.uint8)
    if image.shape[:2] == (size, size):
        return image
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(new_size, Image.BILINEAR))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top:top + size, left:left + size]


class LazyImages:
    """A split's images, (N, S, S, 3) uint8, decoded only when read: an int gives one image, a
    slice or an index array another LazyImages, `np.asarray` (or np.pad, np.stack) the
    images themselves. Picklable (worker processes read from it)."""

    def __init__(self, read: Callable[[int], np.ndarray], count: int, image_size: int,
                 indices: Optional[np.ndarray] = None):
        self._read, self.image_size = read, image_size
        self.indices = np.arange(count) if indices is None else np.asarray(indices)
        self.shape = (len(self.indices), image_size, image_size, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read(int(self.indices[key]))
        return LazyImages(self._read, 0, self.image_size, self.indices[key])

    def __array__(self, dtype=None, copy=None):
        images = np.empty(self.shape, np.uint8)
        for position, index in enumerate(self.indices):
            images[position] = self._read(int(index))
        return images if dtype is None else images.astype(dtype)

    def nbytes_whole(self) -> int:
        return int(np.prod(self.shape))


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset of your own: its splits (lazy images, int32 labels) and what it is."""
    name: str
    classes: Tuple[str, ...]
    image_size: int
    train: Tuple[LazyImages, np.ndarray]
    test: Tuple[LazyImages, np.ndarray]
    fingerprint: Dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_source(data_config) -> Source:
    """The source config.data names (tfds:... or folder:...); a one-line DatasetError when it
    cannot be read."""
    name = data_config.name
    size = data_config.get("image_size")
    if name.startswith(FOLDER):
        return _folder_source(name, name[len(FOLDER):], size)
    if name.startswith(TFDS):
        return _tfds_source(name, data_config, size)
    raise DatasetError(f"--config.data.name={name!r} is not tfds:NAME or folder:PATH.")


# ---- image folders ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _FolderReader:
    """Reads image i of a list of files (picklable: a worker process can hold it)."""
    files: Tuple[str, ...]
    image_size: int

    def __call__(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as opened:
                image = np.asarray(opened.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise DatasetError(f"Cannot read the image {path} ({error}): remove or replace "
                               f"it.") from None
        return fit_image(image, self.image_size)


def _class_files(folder: str, classes: Optional[Sequence[str]] = None
                 ) -> Tuple[List[str], List[str], List[int]]:
    """(classes, files, labels) of folder/<class>/*: classes sorted by name (or those given,
    each of which must be there)."""
    found = sorted(entry for entry in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, entry)))
    if classes is not None:
        missing = [name for name in classes if name not in found]
        if missing:
            raise DatasetError(f"{folder} has no folder for the class {missing[0]!r} of the "
                               f"training split: every class needs its test images.")
        extra = [name for name in found if name not in classes]
        if extra:
            raise DatasetError(f"{folder}/{extra[0]} is a class the training split does not "
                               f"have: remove it, or add its training images.")
    classes = list(classes) if classes is not None else found
    files, labels = [], []
    for label, name in enumerate(classes):
        found_files = sorted(os.path.join(root, file)
                             for root, _, names in os.walk(os.path.join(folder, name))
                             for file in names if file.lower().endswith(IMAGE_EXTENSIONS))
        files += found_files
        labels += [label] * len(found_files)
    return classes, files, labels


def _folder_source(name: str, path: str, size: Optional[int]) -> Source:
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir):
        raise DatasetError(f"--config.data.name={name}: {train_dir} does not exist; an image "
                           f"folder holds train/<class>/*.png|jpg and test/ (or val/).")
    test_dir = next((os.path.join(path, d) for d in ("test", "val")
                     if os.path.isdir(os.path.join(path, d))), None)
    if test_dir is None:
        raise DatasetError(f"--config.data.name={name}: {path} has no test/ or val/ folder "
                           f"beside train/.")
    classes, train_files, train_labels = _class_files(train_dir)
    if not train_files:
        raise DatasetError(f"{train_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)} in "
                           f"one folder per class).")
    _, test_files, test_labels = _class_files(test_dir, classes)
    if not test_files:
        raise DatasetError(f"{test_dir} holds no images.")
    if size is None:
        first = _FolderReader((train_files[0],), 1)
        from PIL import Image
        with Image.open(first.files[0]) as opened:
            width, height = opened.size
        if width != height:
            raise DatasetError(f"{train_files[0]} is {width}x{height}: give "
                               f"--config.data.image_size=N (images are resized to NxN).")
        size = width
    fingerprint = {"source": name, "classes": classes,
                   "train": _files_digest(train_files, path),
                   "test": _files_digest(test_files, path)}
    return Source(name, tuple(classes), int(size),
                  (LazyImages(_FolderReader(tuple(train_files), size), len(train_files), size),
                   np.asarray(train_labels, np.int32)),
                  (LazyImages(_FolderReader(tuple(test_files), size), len(test_files), size),
                   np.asarray(test_labels, np.int32)),
                  fingerprint)


def _files_digest(files: Sequence[str], root: str) -> Dict[str, Any]:
    """{'files': count, 'sha256': over each file's path (relative to root) and size}."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{os.path.relpath(file, root)}\t{os.path.getsize(file)}\n".encode())
    return {"files": len(files), "sha256": digest.hexdigest()}


# ---- tensorflow-datasets ------------------------------------------------------------------

class _TfdsReader:
    """Reads record i of a tfds split's image (picklable: the data source is opened anew in
    each process that reads)."""

    def __init__(self, dataset: str, split: str, data_dir: Optional[str], image_key: str,
                 image_size: int):
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.image_key, self.image_size = image_key, image_size
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __call__(self, index: int) -> np.ndarray:
        if self._source is None:
            self._source = _data_source(self.dataset, self.split, self.data_dir)
        return fit_image(np.asarray(self._source[index][self.image_key]), self.image_size)


def _data_source(dataset: str, split: str, data_dir: Optional[str], decoders=None,
                 builder=None):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except Exception as error:  # not prepared, prepared as TFRecord only, an unknown split
        build = (f"`tfds build {dataset.split(':')[0]} --file_format=array_record"
                 f"{f' --data_dir={data_dir}' if data_dir else ''}`")
        if builder is not None and not builder.is_prepared():
            raise DatasetError(f"{dataset} is not prepared in {builder.data_dir_root}: prepare "
                               f"it as ArrayRecord, {build}.") from None
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"Cannot read {dataset} [{split}] with tfds.data_source ({text[:160]})"
                           f": it needs the ArrayRecord format, {build}, and a split the "
                           f"dataset has.") from None


def _tfds_source(name: str, data_config, size: Optional[int]) -> Source:
    import tensorflow_datasets as tfds

    dataset = name[len(TFDS):]
    data_dir = data_config.data_dir
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"--config.data.name={name}: {text[:200]}") from None
    features = builder.info.features
    image_key, label_key = data_config.image_key, data_config.label_key
    for key, option in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise DatasetError(f"--config.data.{option}={key!r}: {dataset} has the features "
                               f"{sorted(features)}.")
    shape = features[image_key].shape
    if size is None:
        if not shape[0] or shape[0] != shape[1]:
            raise DatasetError(f"{dataset}'s images are {shape}, of no one square size: give "
                               f"--config.data.image_size=N (images are resized to NxN).")
        size = int(shape[0])
    classes = tuple(features[label_key].names)
    splits, fingerprint = [], {"source": name, "version": str(builder.info.version),
                               "classes": list(classes)}
    for role, split in (("train", data_config.train_split), ("test", data_config.test_split)):
        skip = {image_key: tfds.decode.SkipDecoding()}
        records = _data_source(dataset, split, data_dir, decoders=skip, builder=builder)
        labels = np.asarray([records[i][label_key] for i in range(len(records))], np.int32)
        reader = _TfdsReader(dataset, split, data_dir, image_key, int(size))
        splits.append((LazyImages(reader, len(labels), int(size)), labels))
        digest = hashlib.sha256(f"{split}\n".encode() + labels.tobytes())
        fingerprint[role] = {"split": split, "files": len(labels), "sha256": digest.hexdigest()}
    return Source(name, classes, int(size), splits[0], splits[1], fingerprint)
