"""Common corruptions (CIFAR-10-C, CIFAR-100-C) and CIFAR-10.1, on archives in the official
layouts made here and served from 127.0.0.1, with answers known by construction.

The model (`own_models:ReadsMarker`) predicts the class written into one pixel; each
corruption x severity cell of the served CIFAR-10-C has a chosen number of images whose marker
is right, so every cell's accuracy, the standard and extra means are exact. The frequency
measure is checked on perturbations of known spectrum; streaming by weak references: when a
corruption is read, the one before it is no longer in memory.
"""

import gc
import gzip
import hashlib
import io
import json
import os
import tarfile
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_data
from conftest import tiny_config
from fpcm_jax import experiment
from fpcm_jax.evaluation import checks as evaluation_checks
from fpcm_jax.data import archives, corruptions
from fpcm_jax.evaluation import evaluate, spectra
from fpcm_jax.reports import report
from fpcm_jax.runs import checkpoint

COUNT = test_data.TEST_COUNT  # images per severity (the served CIFAR-10 test split)


def right_markers(corruption_index, severity):
    """How many of the COUNT images of a cell carry their right class (known answer)."""
    return (7 * corruption_index + 5 * severity) % (COUNT + 1)


def marked(images, labels, right):
    """images with pixel (0, 0, red) = 16 * class + 8: the label for the first `right`, the
    next class for the others."""
    images = images.copy()
    shown = np.where(np.arange(len(labels)) < right, labels, (labels + 1) % 10)
    images[:, 0, 0, 0] = 16 * shown + 8
    return images


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def corruption_tar(top, test_images, test_labels, skip=()):
    """A tar in the official layout: top/<corruption>.npy, 5 severities x COUNT images, each
    cell with `right_markers` right markers on a perturbed copy of the test images, and
    top/labels.npy."""
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        members = {"labels": np.tile(test_labels.astype(np.int64), 5)}
        for index, name in enumerate(corruptions.ALL):
            if name in skip:
                continue
            noise = rng.integers(-20, 21, (5, *test_images.shape))
            blocks = [marked(np.clip(test_images + noise[s - 1], 0, 255).astype(np.uint8),
                             test_labels, right_markers(index, s)) for s in (1, 2, 3, 4, 5)]
            members[name] = np.concatenate(blocks)
        for name, array in members.items():
            content = npy_bytes(array)
            info = tarfile.TarInfo(f"{top}/{name}.npy")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirror():
    """A mirror serving the CIFAR-10 archive, CIFAR-10-C.tar and CIFAR-10.1's two files, and
    the source_sha256 setting that accepts them."""
    archive, _, _, test_images, test_labels = test_data.cifar10_archive(0)
    rng = np.random.default_rng(5)
    files = {"cifar-10-binary.tar.gz": archive,
             "CIFAR-10-C.tar": corruption_tar("CIFAR-10-C", test_images, test_labels),
             "cifar10.1_v6_data.npy": npy_bytes(rng.integers(0, 256, (30, 32, 32, 3),
                                                            dtype=np.uint8)),
             "cifar10.1_v6_labels.npy": npy_bytes(rng.integers(0, 10, 30))}
    server = test_data.Server(archive, archive, files)
    sha256 = ",".join(f"{name}:{hashlib.sha256(content).hexdigest()}"
                      for name, content in files.items())
    yield server, files, sha256, test_images, test_labels
    server.httpd.shutdown()


def marker_config(mirror, data_dir):
    server, _, sha256, _, _ = mirror
    config = tiny_config(model__name="own_models:ReadsMarker", model__widths=None,
                         model__stage_sizes=None, data__name="cifar10",
                         data__data_dir=str(data_dir), data__validation_size=0,
                         data__source_url=f"{server.url}/files",
                         data__test_sets_url=f"{server.url}/files", data__source_sha256=sha256)
    config.model.kwargs = {}
    return config


def marker_checkpoint(config, path):
    model = experiment.model_from_description(experiment.describe(config))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    checkpoint.save_variables(str(path), variables, experiment.describe(config))
    return str(path)


def test_every_cell_and_mean_is_the_known_accuracy(mirror, tmp_path):
    config = marker_config(mirror, tmp_path / "data")
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    result = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved,
                                     batch_size=16)
    entry = result["attacks"]["corruptions"]
    for index, name in enumerate(corruptions.ALL):
        for severity in (1, 2, 3, 4, 5):
            cell = entry["cells"][name][str(severity)]
            assert cell["accuracy"] == right_markers(index, severity) / COUNT, (name, severity)
    expected = lambda names: np.mean([right_markers(corruptions.ALL.index(n), s) / COUNT
                                      for n in names for s in (1, 2, 3, 4, 5)])
    assert entry["mean_standard"] == pytest.approx(expected(corruptions.STANDARD), abs=1e-12)
    assert entry["mean_extra"] == pytest.approx(expected(corruptions.EXTRA), abs=1e-12)
    assert entry["robust_acc"] == entry["mean_standard"] and entry["complete_benchmark"]
    groups = entry["frequency_groups"]
    assert sorted(groups["low"]["corruptions"] + groups["high"]["corruptions"]) == sorted(
        corruptions.ALL)
    assert os.path.basename(result["report_path"]) == f"eval_test_corruptions_n{COUNT}.json"
    assert os.path.getsize(result["figures"]) > 1000
    history = [json.loads(line) for line in open(tmp_path / "eval" / evaluate.HISTORY_FILE)]
    assert history[-1]["attacks"]["corruptions"]["mean_standard"] == entry["mean_standard"]
    # A choice of corruptions and severities, and its name; the report's columns and figure.
    chosen = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved,
                                     corruption_options={"names": ["fog", "saturate"],
                                                         "severities": [2, 5]})
    cells = chosen["attacks"]["corruptions"]["cells"]
    assert set(cells) == {"fog", "saturate"} and set(cells["fog"]) == {"2", "5"}
    assert os.path.basename(chosen["report_path"]) == (
        f"eval_test_corruptions-fog+saturate-s25_n{COUNT}.json")
    os.makedirs(tmp_path / "run")
    for name in ("run.json", evaluate.HISTORY_FILE):
        source = tmp_path / ("ckpt/model.json" if name == "run.json" else f"eval/{name}")
        (tmp_path / "run" / name).write_bytes(source.read_bytes())
    table = report.write_report([str(tmp_path / "run")], str(tmp_path / "table"))
    labels = [column["label"] for column in table["columns"]]
    assert {"corruptions mean n=40 [checkpoint]", "low-freq. corruptions n=40 [checkpoint]",
            "high-freq. corruptions n=40 [checkpoint]"} <= set(labels)
    assert os.path.getsize(tmp_path / "table" / report.CORRUPTIONS_FIGURE) > 1000
    # Issue 37, item 4: the later subset (fog; severities 2 and 5) has a column of its own,
    # named by the subset; the benchmark's column keeps the whole benchmark's mean.
    cells = {label: cell["value"] for label, cell in table["runs"][0]["cells"].items()}
    assert cells["corruptions mean n=40 [checkpoint]"] == entry["mean_standard"]
    fog = [right_markers(corruptions.ALL.index("fog"), s) / COUNT for s in (2, 5)]
    assert cells["corruptions mean n=40 [checkpoint] (1 of 15: fog; severities 2,5)"] == (
        pytest.approx(np.mean(fog), abs=1e-12))
    assert cells["extra corruptions n=40 [checkpoint] (1 of 4: saturate; severities 2,5)"] == (
        chosen["attacks"]["corruptions"]["mean_extra"])


def test_a_subset_mean_is_named_as_a_subset():
    """Issue 37, item 4: the printed mean over a choice of corruptions says how many of the
    15 standard (or 4 extra) ones it covers."""
    chosen = ["gaussian_noise", "contrast", "brightness", "gaussian_blur", "impulse_noise"]
    assert evaluate.corruption_mean_label(chosen, corruptions.STANDARD) == (
        "mean over 4 of the 15 standard corruptions (gaussian_noise, contrast, brightness, "
        "impulse_noise)")
    assert evaluate.corruption_mean_label(chosen, corruptions.EXTRA) == (
        "mean over 1 of the 4 extra corruptions (gaussian_blur)")
    assert evaluate.corruption_mean_label(list(corruptions.ALL), corruptions.STANDARD) == (
        "mean over the 15 standard corruptions")


def test_only_one_corruption_is_in_memory_at_a_time(mirror, tmp_path, monkeypatch):
    """Weak references to every array read from the archive: when a corruption's file is
    mapped, the earlier corruptions' maps and copies are gone."""
    config = marker_config(mirror, tmp_path / "data")
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    alive, mapped = [], []
    member, read = corruptions.CorruptionArchive._member, corruptions.CorruptionArchive.read

    def watched_member(self, name):
        gc.collect()
        if name != corruptions.LABELS:
            mapped.append(name)
            assert not [ref for ref in alive if ref() is not None], (
                f"reading {name}: arrays of an earlier corruption are still in memory")
        array = member(self, name)
        alive.append(weakref.ref(array))
        return array

    def watched_read(self, name, severities, count):
        for severity, images in read(self, name, severities, count):
            alive.append(weakref.ref(images))
            yield severity, images

    monkeypatch.setattr(corruptions.CorruptionArchive, "_member", watched_member)
    monkeypatch.setattr(corruptions.CorruptionArchive, "read", watched_read)
    evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved,
                            corruption_options={"names": ["fog", "snow", "contrast"]})
    assert mapped == ["fog", "snow", "contrast"]


@pytest.mark.parametrize("u, v, radius, high", [(4, 0, 0.125, 0.0), (0, 12, 0.375, 1.0),
                                                (3, 4, 5 / 32, 0.0), (8, 8, np.sqrt(2) / 4,
                                                                      1.0)])
def test_a_single_fourier_component_lands_at_its_radius(u, v, radius, high):
    """cos(2 pi (u y + v x) / 32) in every channel: all its energy at radius sqrt(u^2+v^2)/32."""
    rows, columns = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    wave = np.cos(2 * np.pi * (u * rows + v * columns) / 32)
    delta = np.repeat(wave[None, :, :, None], 3, axis=3) * np.array([1.0, 0.5, 0.2])
    measure = spectra.perturbation_spectrum(np.concatenate([delta, 2 * delta]))
    assert measure["mean_radius"] == pytest.approx(radius, abs=1e-9)
    assert measure["high_fraction"] == pytest.approx(high, abs=1e-9)


def test_white_noise_spreads_evenly_and_the_cutoff_is_exclusive():
    """An impulse (one pixel) has an exactly flat spectrum, the exact form of white noise:
    its mean radius is the mean radius of the 32x32 frequency grid and its high share the
    share of grid points beyond 0.25 cycles per pixel (the grid written out here: 827 of the
    1024 lie beyond it, and the 4 at exactly 0.25, (0, +-8) and (+-8, 0), are not counted)."""
    impulse = np.zeros((1, 32, 32, 1))
    impulse[0, 5, 9, 0] = 0.3
    frequencies = np.arange(32) / 32
    frequencies[frequencies >= 0.5] -= 1.0  # 0, 1/32, ..., 15/32, -16/32, ..., -1/32
    radius = np.hypot(frequencies[:, None], frequencies[None, :])
    measure = spectra.perturbation_spectrum(impulse)
    assert measure["mean_radius"] == pytest.approx(radius.mean(), abs=1e-12)
    assert np.sum(radius > 0.25) == 827 and np.sum(radius == 0.25) == 4
    assert measure["high_fraction"] == pytest.approx(827 / 1024, abs=1e-12)


def test_a_constant_shift_is_at_zero_frequency_and_nothing_is_nothing():
    shift = np.full((4, 32, 32, 3), 0.1)
    assert spectra.perturbation_spectrum(shift) == {"mean_radius": 0.0, "high_fraction": 0.0}
    assert spectra.perturbation_spectrum(np.zeros((2, 8, 8, 3))) == {"mean_radius": 0.0,
                                                                      "high_fraction": 0.0}
    mixed = shift + np.cos(np.pi * np.arange(32))[None, None, :, None] * 0.1  # DC + Nyquist
    assert spectra.perturbation_spectrum(mixed)["mean_radius"] == pytest.approx(0.25)


def test_cifar10_1_is_a_split(mirror, tmp_path):
    config = marker_config(mirror, tmp_path / "data")
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    _, files, _, _, _ = mirror
    images = np.load(io.BytesIO(files["cifar10.1_v6_data.npy"]))
    labels = np.load(io.BytesIO(files["cifar10.1_v6_labels.npy"]))
    result = evaluate.run_evaluation(config, str(tmp_path / "eval"), ["none"], saved,
                                     split="cifar10.1")
    marker = np.floor(images[:, 0, 0, 0] / 16).astype(int)
    predicted = np.where(marker < 10, marker, 0)  # no class of its own: all logits tie, 0
    assert result["examples"] == 30
    assert result["attacks"]["none"]["clean_acc"] == np.mean(predicted == labels)


@pytest.mark.parametrize("dataset, options, message", [
    ("cifar10", {"corruption_names": ["fogg"]}, "unknown corruption 'fogg'; valid: "),
    ("cifar10", {"severities": [0]}, "--severities: 0 is not a severity"),
    ("cifar10", {"severities": [6]}, "--severities: 6 is not a severity"),
    ("digits", {}, "needs a dataset with common corruptions (cifar10, cifar100"),
    ("svhn", {}, "svhn has none"),
    ("cifar10", {"split": "train"}, "--split train has none"),
])
def test_bad_corruption_requests_are_one_line_before_any_work(dataset, options, message):
    config = tiny_config(data__name=dataset)
    with pytest.raises(ValueError) as raised:
        evaluation_checks.check_evaluation(config, "corruptions", **options)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="add corruptions to --attack"):
        evaluation_checks.check_evaluation(tiny_config(data__name="cifar10"), "pgd20",
                                       corruption_names=["fog"])


def test_a_missing_or_damaged_archive_is_one_line(mirror, tmp_path):
    config = marker_config(mirror, tmp_path / "data")
    config.data.download = False
    with pytest.raises(archives.ArchiveError, match="place CIFAR-10-C.tar"):
        corruptions.CorruptionArchive("cifar10", str(tmp_path / "data"), download=False)
    located = corruptions.CorruptionArchive("cifar10", str(tmp_path / "data"), True,
                                            config.data.test_sets_url, config.data.source_sha256)
    offset, size = located.members["fog"][:2]
    with open(located.path, "r+b") as handle:  # flip a byte inside fog.npy, keep the time
        stat = os.stat(located.path)
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(offset + size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(located.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = corruptions.CorruptionArchive("cifar10", str(tmp_path / "data"), False,
                                          source_sha256=config.data.source_sha256)
    with pytest.raises(archives.DamagedData, match="fog.npy differs") as raised:
        list(again.read("fog", [1], 5))
    assert "\n" not in str(raised.value)
    list(again.read("snow", [1], 5))  # the others are intact


def test_cifar100_c_records_its_first_verified_file_and_refuses_another(tmp_path):
    """No published checksum: the format is checked, the first file's SHA-256 recorded, and
    a different file placed later is refused."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 10
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "CIFAR-100-C.tar").write_bytes(corruption_tar("CIFAR-100-C", images, labels))
    first = corruptions.CorruptionArchive("cifar100", str(tmp_path), download=False)
    assert first.per_severity() == 6
    (downloads / "CIFAR-100-C.tar").write_bytes(corruption_tar("CIFAR-100-C", images,
                                                               (labels + 1) % 10))
    with pytest.raises(archives.ArchiveError, match="of the file first verified here"):
        corruptions.CorruptionArchive("cifar100", str(tmp_path), download=False)
    (downloads / "CIFAR-100-C.tar").write_bytes(
        corruption_tar("CIFAR-100-C", images, labels, skip=("fog",)))
    os.remove(tmp_path / "fpcm_jax" / "cifar100_corrupted" / corruptions.MEMBERS_FILE)
    with pytest.raises(archives.ArchiveError, match="lacks CIFAR-100-C/fog.npy"):
        corruptions.CorruptionArchive("cifar100", str(tmp_path), download=False)


def test_an_archive_accepted_under_a_custom_checksum_is_verified_again(mirror, tmp_path):
    """Issue 37, item 2: CIFAR-10-C.tar accepted once under `file:sha256` is refused when the
    official checksum is required again (the required checksum is part of the cached index),
    and accepted again under the custom one without a new download."""
    server, files, sha256, _, _ = mirror
    data_dir = str(tmp_path / "data")
    custom = corruptions.CorruptionArchive("cifar10", data_dir, True, f"{server.url}/files",
                                           sha256)
    official = archives.CORRUPTIONS["cifar10"][1][0].sha256
    with pytest.raises(archives.ArchiveError, match=f"not the expected {official}") as raised:
        corruptions.CorruptionArchive("cifar10", data_dir, download=False)
    assert "\n" not in str(raised.value)
    requests = len(server.requests)
    again = corruptions.CorruptionArchive("cifar10", data_dir, False, "", sha256)
    assert again.members == custom.members and len(server.requests) == requests


def test_a_bare_digest_and_the_source_url_are_the_training_datasets_only(mirror, tmp_path):
    """Issue 37, item 3: a bare data.source_sha256 (the CIFAR-10 mirror's archive) leaves the
    test sets' official checksums in place, and data.source_url is not their mirror:
    CIFAR-10-C comes from data.test_sets_url, CIFAR-10.1's files too."""
    server, files, sha256, _, _ = mirror
    cifar_digest = hashlib.sha256(files["cifar-10-binary.tar.gz"]).hexdigest()
    for dataset_files in (archives.CORRUPTIONS["cifar10"][1], archives.CIFAR10_1[1]):
        assert archives.with_checksums(dataset_files, cifar_digest,
                                       training_dataset=False) == dataset_files
    [cifar] = archives.with_checksums(archives.OFFICIAL["cifar10"][1], cifar_digest)
    assert cifar.sha256 == cifar_digest
    config = marker_config(mirror, tmp_path / "data")
    config.data.source_sha256 = cifar_digest  # only the training archive's, bare
    saved = marker_checkpoint(config, tmp_path / "ckpt")
    official = archives.CORRUPTIONS["cifar10"][1][0].sha256
    with pytest.raises(archives.ArchiveError, match=f"not {official}"):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), ["corruptions"], saved)
    # data.source_url (the mirror) set, test_sets_url not: CIFAR-10.1 is the official file's
    config.data.source_sha256, config.data.test_sets_url = sha256, ""
    config.data.download, config.data.data_dir = False, str(tmp_path / "fresh")
    base_url = archives.CIFAR10_1[0]
    with pytest.raises(archives.ArchiveError, match=f"from {base_url}cifar10.1_v6_data.npy"):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), ["none"], saved,
                                split="cifar10.1")


def test_a_compressed_corruption_archive_is_refused_in_one_line(tmp_path):
    """Issue 37, item 8: CIFAR-100-C.tar gzip-compressed (member offsets would point into the
    decompressed stream) is refused, naming the fix."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 10
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "CIFAR-100-C.tar").write_bytes(
        gzip.compress(corruption_tar("CIFAR-100-C", images, labels), mtime=0))
    with pytest.raises(archives.ArchiveError, match="is not an uncompressed tar") as raised:
        corruptions.CorruptionArchive("cifar100", str(tmp_path), download=False)
    assert "\n" not in str(raised.value) and "decompress it first" in str(raised.value)
