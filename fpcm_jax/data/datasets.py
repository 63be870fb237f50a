"""Datasets as in-memory uint8 arrays, on-device augmentation, and the training batches.

Each split is read once into NHWC uint8 numpy arrays; training keeps them on the accelerators
and gathers batches by index inside the jitted step. Where the splits come from, first found:
the splits prepared by `fpcm_jax.data.archives` (`<data dir>/fpcm_jax/<name>/`), tensorflow-datasets
ArrayRecord data (read through `tfds.data_source`, which needs no TensorFlow), or else the
official archive, downloaded (unless `data.download=False`), verified and prepared by
`fpcm_jax.data.archives`, without TensorFlow (one process at a time; prepared splits are checked
against their SHA-256 on every read and prepared again when damaged). `data.prepare=True`
prepares through tensorflow-datasets instead (needs TensorFlow).

`digits` is scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package),
upscaled to 32x32x3: small real data for the tiny config and the tests, no download needed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fpcm_jax import parallel
from fpcm_jax.data import archives, sources, streaming
from fpcm_jax.data.sources import DatasetError
from fpcm_jax.models.common import CIFAR10_MEAN, CIFAR10_STD

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    tfds_name: Optional[str]
    train_split: str
    test_split: str
    num_classes: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    archive: str = ""  # what to place in the tfds manual dir to prepare offline


DATASETS = {
    "cifar10": DatasetSpec("cifar10", "train", "test", 10, 32, CIFAR10_MEAN, CIFAR10_STD,
                           "cifar-10-binary.tar.gz"),
    "cifar100": DatasetSpec("cifar100", "train", "test", 100, 32, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), "cifar-100-binary.tar.gz"),
    "svhn": DatasetSpec("svhn_cropped", "train", "test", 10, 32, (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970), "train_32x32.mat and test_32x32.mat"),
    "imagenette": DatasetSpec("imagenette/160px", "train", "validation", 10, 160, IMAGENET_MEAN,
                              IMAGENET_STD, "imagenette2-160.tgz"),
    "digits": DatasetSpec(None, "train", "test", 10, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclasses.dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)


def get_spec(name: str) -> DatasetSpec:
    """A registry dataset's spec (your own data: `spec_for`)."""
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}, or your "
                           f"own: tfds:NAME or folder:PATH.")
    return DATASETS[name]


_OPENED: Dict[Tuple, sources.Source] = {}


def open_source(data_config) -> sources.Source:
    """The source of your own data that config.data names, opened once per process."""
    key = tuple(str(data_config.get(field)) for field in SOURCE_FIELDS)
    if key not in _OPENED:
        _OPENED[key] = sources.open_source(data_config)
    return _OPENED[key]


SOURCE_FIELDS = ("name", "data_dir", "image_size", "train_split", "test_split", "image_key",
                 "label_key")


def spec_for(data_config) -> DatasetSpec:
    """The spec of config.data's dataset: the registry's, or your own data's (its classes
    and image size from the source; ImageNet's statistics for `normalization=dataset`)."""
    if not sources.is_external(data_config.name):
        return get_spec(data_config.name)
    source = open_source(data_config)
    return DatasetSpec(None, data_config.train_split, data_config.test_split,
                       source.num_classes, source.image_size, IMAGENET_MEAN, IMAGENET_STD)


def load_for(config, validation: bool = True) -> Tuple[Split, Split, Split]:
    """(train, validation, test) splits of an experiment config's dataset; validation=False
    for a caller that reads the test split only (no validation split is held out, so
    data.validation_size is not checked against the training split)."""
    settings = config.data
    validation_size = settings.validation_size if validation else 0
    if sources.is_external(settings.name):
        return _load_own(settings, validation_size, config.seed)
    return load(settings.name, settings.data_dir, validation_size, settings.prepare,
                config.seed, settings.download, settings.source_url, settings.source_sha256)


def _load_own(settings, validation_size: int, seed: int) -> Tuple[Split, Split, Split]:
    """Your own data's splits: the validation split held out of the training split (as for
    the registry's) and read into memory; the training and test splits read into memory when
    each fits data.max_in_memory_gb (and data.streaming is off), else left to be read image by
    image (`sources.LazyImages`)."""
    source = open_source(settings)
    images, labels = source.train
    full_train = Split(images, labels)
    if not 0 <= validation_size < len(full_train):
        raise DatasetError(f"validation_size={validation_size} must lie in [0, "
                           f"{len(full_train)}) for {settings.name}.")
    order = np.random.default_rng(seed).permutation(len(full_train))
    held_out, kept = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    limit = settings.max_in_memory_gb * 2 ** 30
    whole = lambda lazy: (np.asarray(lazy) if not settings.streaming and
                          lazy.nbytes_whole() <= limit else lazy)
    return (Split(whole(images[kept]), labels[kept]),
            Split(np.asarray(images[held_out]), labels[held_out]),
            Split(whole(source.test[0]), source.test[1]))


def load(name: str, data_dir: Optional[str] = None, validation_size: int = 0,
         prepare: bool = False, seed: int = 0, download: bool = True, source_url: str = "",
         source_sha256: str = "") -> Tuple[Split, Split, Split]:
    """(train, validation, test) splits; validation is held out of the training split."""
    spec = get_spec(name)
    if spec.tfds_name is None:
        full_train, test = _load_digits(spec.image_size)
    else:
        full_train, test = _load_official(name, spec, data_dir, prepare, download, source_url,
                                          source_sha256)
    if not 0 <= validation_size < len(full_train):
        raise DatasetError(f"validation_size={validation_size} must lie in [0, "
                           f"{len(full_train)}) for {name}.")
    order = np.random.default_rng(seed).permutation(len(full_train))
    held_out, kept = np.sort(order[:validation_size]), np.sort(order[validation_size:])
    train = Split(full_train.images[kept], full_train.labels[kept])
    validation = Split(full_train.images[held_out], full_train.labels[held_out])
    return train, validation, test


def load_extra(path: str, spec: DatasetSpec, name: str) -> Split:
    """Extra labelled training data (e.g. the 1M EDM-generated CIFAR-10 images of Wang et al.
    2023): an .npz holding uint8 NHWC images (`image` or `images`) and integer labels (`label`
    or `labels`), or a folder of such files, read whole into memory."""
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".npz")]
             if os.path.isdir(path) else [path])
    if not files:
        raise DatasetError(f"--config.data.extra_path={path!r} holds no .npz file.")
    images, labels = [], []
    for file in files:
        with np.load(file) as stored:
            image_key = next((k for k in ("image", "images") if k in stored.files), None)
            label_key = next((k for k in ("label", "labels") if k in stored.files), None)
            if image_key is None or label_key is None:
                raise DatasetError(f"{file} holds {stored.files}; extra data needs images "
                                   f"('image' or 'images') and labels ('label' or 'labels').")
            images.append(np.asarray(stored[image_key]))
            labels.append(np.asarray(stored[label_key]).reshape(-1).astype(np.int32))
    extra = Split(np.concatenate(images), np.concatenate(labels))
    wanted = (spec.image_size, spec.image_size, 3)
    if extra.images.dtype != np.uint8 or extra.images.shape[1:] != wanted:
        raise DatasetError(f"Extra data in {path} is {extra.images.dtype} "
                           f"{extra.images.shape[1:]}; {name} needs uint8 images of {wanted}.")
    if len(extra.images) != len(extra.labels) or not len(extra.labels):
        raise DatasetError(f"Extra data in {path}: {len(extra.images)} images, "
                           f"{len(extra.labels)} labels.")
    if extra.labels.min() < 0 or extra.labels.max() >= spec.num_classes:
        raise DatasetError(f"Extra data in {path} has labels outside [0, {spec.num_classes}).")
    return extra


def _load_digits(image_size: int) -> Tuple[Split, Split]:
    from sklearn.datasets import load_digits  # ships its data; imported only when used

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
    scale = image_size // images.shape[1]
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    test_ids, train_ids = np.sort(order[:297]), np.sort(order[297:])
    return Split(images[train_ids], labels[train_ids]), Split(images[test_ids], labels[test_ids])


def _load_official(name: str, spec: DatasetSpec, data_dir: Optional[str], prepare: bool,
                   download: bool, source_url: str, source_sha256: str) -> Tuple[Split, Split]:
    if not archives.is_prepared(name, data_dir):
        tfds_splits = [_load_tfds(spec, split, data_dir, prepare)
                       for split in (spec.train_split, spec.test_split)]
        if None not in tfds_splits:
            return tfds_splits[0], tfds_splits[1]
    try:
        splits = archives.load(name, data_dir, download, source_url, source_sha256,
                               spec.image_size)
    except archives.ArchiveError as error:
        raise DatasetError(str(error)) from None
    return Split(*splits["train"]), Split(*splits["test"])


def _load_tfds(spec: DatasetSpec, split: str, data_dir: Optional[str],
               prepare: bool) -> Optional[Split]:
    """A split of tensorflow-datasets ArrayRecord data; None when it is not prepared."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    data_dir = os.fspath(builder.data_dir_root)
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    if prepare and not builder.is_prepared():
        if importlib.util.find_spec("tensorflow") is None:
            raise DatasetError(f"Preparing {spec.tfds_name} through tensorflow-datasets "
                               f"(--config.data.prepare=True) needs TensorFlow: `pip install "
                               f"tensorflow-cpu`; or leave it False to prepare without it.")
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    try:
        source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # never prepared, or prepared as TFRecord (no random access)
        if not builder.is_prepared():
            return None
        raise DatasetError(f"Cannot read {spec.tfds_name} [{split}] from {data_dir}: {error}. "
                           f"fpcm-jax needs the ArrayRecord format: `tfds build "
                           f"{spec.tfds_name} --file_format=array_record`.") from error
    images, labels = [], []
    for index in range(len(source)):
        example = source[index]
        images.append(archives.fit_image(np.asarray(example["image"]), spec.image_size))
        labels.append(int(example["label"]))
    return Split(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))


def to_float(images) -> jax.Array:
    """uint8 -> float32 in [0, 1], for evaluation (lazy images are read first)."""
    if isinstance(images, sources.LazyImages):
        images = np.asarray(images)
    return images.astype(jnp.float32) / 255.0


def normalization(kind: str, spec: DatasetSpec) -> Tuple[Optional[Sequence[float]],
                                                         Optional[Sequence[float]]]:
    """(mean, std) for the model: 'none', 'cifar10' (the official WRN's) or 'dataset'."""
    if kind == "none":
        return None, None
    if kind == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if kind == "dataset":
        return spec.mean, spec.std
    raise ValueError(f"Unknown model.normalization {kind!r}; use none, cifar10 or dataset.")


class Batches:
    """The training batches, gathered by index inside a jitted function from the datasets held
    on the devices (uint8, replicated). Each epoch permutes the training split (seeded by
    (seed, epoch), so a resumed run sees the same batches); with extra data, a share
    `extra_fraction` of every batch comes from it (its own permutation per epoch, cycled when
    an epoch needs more), after the training images; an epoch then covers the training split
    once. The gather also returns whether any process has been told to stop: every process
    reads the same vote for the same step, without an extra collective or host sync."""

    def __init__(self, train_split: Split, extra: Optional[Split], batch_size: int,
                 extra_fraction: float, seed: int):
        self.split, self.extra, self.seed = train_split, extra, seed
        self.extra_count = round(batch_size * extra_fraction) if extra is not None else 0
        self.main_count = batch_size - self.extra_count
        self.steps_per_epoch = len(train_split) // self.main_count  # the last partial dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"--config.train.batch_size={batch_size} exceeds the "
                             f"{len(train_split)} training images.")
        self._orders = {}

    def place(self, mesh) -> None:
        repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self._repl, self._sharded = repl, sharded
        self._arrays = [parallel.global_array(a, repl)
                        for a in (self.split.images, self.split.labels)]
        if self.extra is None:
            self._gather = jax.jit(lambda imgs, lbls, idx, votes: (
                {"images": imgs[idx], "labels": lbls[idx]}, jnp.any(votes)),
                out_shardings=(sharded, repl))
            return
        self._arrays += [parallel.global_array(a, repl)
                         for a in (self.extra.images, self.extra.labels)]
        self._gather = jax.jit(lambda imgs, lbls, extra_imgs, extra_lbls, idx, extra_idx, votes: (
            {"images": jnp.concatenate([imgs[idx], extra_imgs[extra_idx]]),
             "labels": jnp.concatenate([lbls[idx], extra_lbls[extra_idx]])}, jnp.any(votes)),
            out_shardings=(sharded, repl))

    def indices(self, epoch: int, position: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(training-split indices, extra-data indices or None) of a step's batch."""
        if epoch not in self._orders:
            self._orders = {epoch: (
                np.random.default_rng([self.seed, epoch]).permutation(len(self.split)),
                None if self.extra is None else
                np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.extra)))}
        order, extra_order = self._orders[epoch]
        main = order[position * self.main_count:(position + 1) * self.main_count]
        if extra_order is None:
            return main, None
        picks = (position * self.extra_count + np.arange(self.extra_count)) % len(extra_order)
        return main, extra_order[picks]

    def gather(self, epoch: int, position: int, votes: jax.Array):
        main, extra = self.indices(epoch, position)
        if extra is None:
            return self._gather(*self._arrays, parallel.global_array(main, self._sharded), votes)
        return self._gather(*self._arrays, parallel.global_array(main, self._repl),
                            parallel.global_array(extra, self._repl), votes)


def batches_for(train_split: Split, extra: Optional[Split], batch_size: int,
                extra_fraction: float, seed: int, data_config=None):
    """`Batches` over a training split held in memory, or the same batches streamed with
    Grain (`streaming.StreamedBatches`) when its images are read on demand."""
    batches = Batches(train_split, extra, batch_size, extra_fraction, seed)
    if not isinstance(train_split.images, sources.LazyImages):
        return batches
    if extra is not None:
        raise DatasetError("--config.data.extra_path with a streamed training split is not "
                           "supported: hold the training split in memory (raise "
                           "data.max_in_memory_gb) or leave the extra data out.")
    workers = data_config.workers if data_config is not None else 2
    prefetch = data_config.prefetch if data_config is not None else 2
    return streaming.StreamedBatches(batches, workers, prefetch)
