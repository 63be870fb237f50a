"""Your own data (issue 38): an image folder and a tensorflow-datasets dataset, held in memory
or streamed with Grain, on data the tests make (PNG and JPEG files written here; tfds's
`mock_data`).

- a folder's classes are its sub-folders sorted by name, its images decoded and resized; a
  folder without images, an unreadable file or a class missing from the test split is one
  line naming it;
- streaming and holding in memory give the same batches, image for image, for the same seed,
  with or without worker processes, and a stream started mid-epoch (a resume) gives the same
  next batch as the stream that went through the epoch.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import cpu_env, free_port, tiny_config
from fpcm_jax import parallel
from fpcm_jax.data import datasets, sources

CLASSES = ("cat", "ant", "bee")  # sorted: ant, bee, cat


def image_folder(root, size=64, train_per_class=6, test_per_class=2, test_name="test"):
    """root/{train,test}/<class>/<i>.png|jpg: each image a class colour plus noise, its index
    written into pixel (0, 0) (so a test can tell which file a decoded image is)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), (test_name, test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                image = np.clip(rng.normal(60 + 60 * label, 20, (size, size, 3)), 0, 255)
                image = image.astype(np.uint8)
                suffix = "jpg" if index == count - 1 else "png"  # one JPEG per class
                Image.fromarray(image).save(folder / f"{index:03d}.{suffix}")
    return root


def folder_config(root, **changes):
    config = tiny_config(data__name=f"folder:{root}", data__validation_size=2,
                         data__image_size=32, **changes)
    return config


def test_a_folders_classes_are_sorted_and_its_images_resized(tmp_path):
    root = image_folder(tmp_path / "set", size=48)
    source = sources.open_source(folder_config(root).data)
    assert source.classes == ("ant", "bee", "cat") and source.image_size == 32
    images, labels = source.train
    assert len(images) == 18 and list(labels) == [0] * 6 + [1] * 6 + [2] * 6
    first = np.asarray(images[:1])
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.uint8
    expected = np.asarray(Image.open(root / "train" / "ant" / "000.png").resize(
        (32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(first[0], expected)  # 48 -> 32: shorter side, no crop
    assert len(source.test[0]) == 6 and source.fingerprint["train"]["files"] == 18
    assert sources.open_source(folder_config(root).data).fingerprint == source.fingerprint


def test_a_folder_named_by_its_first_images_size(tmp_path):
    root = image_folder(tmp_path / "set", size=40)
    config = folder_config(root)
    config.data.image_size = None
    assert sources.open_source(config.data).image_size == 40


@pytest.mark.parametrize("damage, message", [
    ("empty", "holds no images"),
    ("missing_class", "has no folder for the class 'bee'"),
    ("no_test", "has no test/ or val/ folder"),
])
def test_a_broken_folder_is_one_line(tmp_path, damage, message):
    root = image_folder(tmp_path / "set")
    if damage == "empty":
        for name in CLASSES:
            for file in os.listdir(root / "train" / name):
                os.remove(root / "train" / name / file)
    elif damage == "missing_class":
        for file in os.listdir(root / "test" / "bee"):
            os.remove(root / "test" / "bee" / file)
        os.rmdir(root / "test" / "bee")
    else:
        os.rename(root / "test", root / "elsewhere")
    with pytest.raises(sources.DatasetError, match=message) as raised:
        sources.open_source(folder_config(root).data)
    assert "\n" not in str(raised.value)


def test_an_unreadable_image_is_named(tmp_path):
    root = image_folder(tmp_path / "set")
    broken = root / "train" / "bee" / "002.png"
    broken.write_bytes(b"not a png")
    images, _ = sources.open_source(folder_config(root).data).train
    with pytest.raises(sources.DatasetError, match=f"Cannot read the image {broken}"):
        np.asarray(images)


def batches_of(config, streaming, epochs=2, workers=0):
    """Every batch of `epochs` epochs, fetched as numpy, from the in-memory or the streamed
    path of the same config."""
    config.data.streaming, config.data.workers = streaming, workers
    train, _, _ = datasets.load_for(config)
    assert isinstance(train.images, sources.LazyImages) == streaming
    batches = datasets.batches_for(train, None, config.train.batch_size, 0.0, config.seed,
                                   config.data)
    mesh = parallel.make_mesh()
    batches.place(mesh)
    votes = parallel.process_votes(False, mesh)
    found = []
    for epoch in range(epochs):
        for position in range(batches.steps_per_epoch):
            batch, _ = batches.gather(epoch, position, votes)
            found.append({key: np.asarray(value) for key, value in batch.items()})
    return found


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_the_in_memory_batches(tmp_path, workers):
    """Two epochs of batches of 4 (16 training images, 4 steps per epoch): the same images and
    labels in the same order, streamed (Grain, `workers` worker processes) or held in memory;
    the second epoch in another order than the first."""
    root = image_folder(tmp_path / "set")
    config = folder_config(root, train__batch_size=4)
    held = batches_of(config, streaming=False)
    streamed = batches_of(folder_config(root, train__batch_size=4), streaming=True,
                          workers=workers)
    assert len(held) == len(streamed) == 8
    for one, other in zip(held, streamed):
        np.testing.assert_array_equal(one["images"], other["images"])
        np.testing.assert_array_equal(one["labels"], other["labels"])
    assert not np.array_equal(held[0]["images"], held[4]["images"])


def test_a_stream_started_mid_epoch_gives_the_same_next_batch(tmp_path):
    """A resume at position 2 of epoch 1 (a new process: a new stream) reads what the stream
    that ran through epoch 0 and 1 read there."""
    root = image_folder(tmp_path / "set")
    config = folder_config(root, train__batch_size=4, data__streaming=True, data__workers=0)
    whole = batches_of(config, streaming=True)
    train, _, _ = datasets.load_for(config)
    resumed = datasets.batches_for(train, None, 4, 0.0, config.seed, config.data)
    mesh = parallel.make_mesh()
    resumed.place(mesh)
    batch, _ = resumed.gather(1, 2, parallel.process_votes(False, mesh))
    np.testing.assert_array_equal(np.asarray(batch["images"]), whole[4 + 2]["images"])


def mnist_like(count):
    """`tfds.data_source`'s examples for tfds.testing.mock_data: its own random examples are
    encoded with TensorFlow (not installed), so these are given decoded, as the ArrayRecord
    source returns them: 28x28x1 uint8 images, the label i % 10 (split 'test': i % 10 + 1)."""
    def as_data_source(builder, split, decoders=None, **_):
        rng = np.random.default_rng(len(str(split)))
        shift = 1 if str(split).startswith("test") else 0
        return [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                 "label": np.int64((i + shift) % 10)} for i in range(count)]
    return as_data_source


def test_a_tfds_dataset_by_name(tmp_path):
    """tfds:mnist under tfds.testing.mock_data: its classes and image size from the builder's
    info (28x28 grey, made RGB and resized to 32), labels as the source holds them."""
    import tensorflow_datasets as tfds

    config = tiny_config(data__name="tfds:mnist", data__image_size=32,
                         data__validation_size=4, data__data_dir=str(tmp_path))
    with tfds.testing.mock_data(as_data_source_fn=mnist_like(12)):
        source = sources.open_source(config.data)
        assert source.num_classes == 10 and source.image_size == 32
        images, labels = source.train
        assert len(images) == len(labels) == 12 and labels.dtype == np.int32
        assert list(labels) == [i % 10 for i in range(12)]
        assert list(source.test[1]) == [(i + 1) % 10 for i in range(12)]
        first = np.asarray(images[:2])
        assert first.shape == (2, 32, 32, 3)
        assert np.array_equal(first[..., 0], first[..., 2])  # grey made RGB
        train, validation, test = datasets.load_for(config)
        assert len(train) == 8 and len(validation) == 4 and len(test) == 12
        assert datasets.spec_for(config.data).num_classes == 10


SHARD_SCRIPT = """
import json, sys
import numpy as np
from fpcm_jax import parallel
parallel.setup(False, sys.argv[1], 2, int(sys.argv[2]))
import jax
from configs import tiny                                 # (conftest would fake 4 devices)
from fpcm_jax.data import datasets
config = tiny.get_config()
config.data.name, config.data.validation_size = "folder:" + sys.argv[3], 2
config.data.image_size, config.train.batch_size, config.data.workers = 32, 8, 0
held, _, _ = datasets.load_for(config)                  # every image, to check what was read
config.data.streaming = True
train, _, _ = datasets.load_for(config)
batches = datasets.batches_for(train, None, 8, 0.0, config.seed, config.data)
mesh = parallel.make_mesh()
batches.place(mesh)
read = []
for position in range(batches.steps_per_epoch):
    local = batches.local_batch(0, position)
    wanted = batches.indices(0, position)[0][batches._rows]
    assert np.array_equal(local["images"], held.images[wanted])  # these files, decoded
    read += wanted.tolist()
    batch, _ = batches.gather(0, position, parallel.process_votes(False, mesh))
    assert np.array_equal(parallel.fetch(batch["labels"]),
                          held.labels[batches.indices(0, position)[0]])
print(json.dumps({"read": read, "devices": jax.local_device_count()}))
"""


@pytest.mark.slow
def test_two_processes_each_read_half_of_an_epoch(tmp_path):
    """Two processes (2 CPU devices each, gloo) stream one epoch: each reads only the rows its
    devices hold, half of every batch; together they read each image of the epoch once, and
    the global batch they assemble is the in-memory path's."""
    import json
    import subprocess
    import sys

    root = image_folder(tmp_path / "set")
    port = free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(cpu_env(2), PYTHONPATH=f"{repo}:{repo}/tests")
    started = [subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, f"127.0.0.1:{port}",
                                 str(index), str(root)], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
    reports = []
    for process in started:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    first, second = (set(report["read"]) for report in reports)
    assert reports[0]["devices"] == reports[1]["devices"] == 2
    assert len(reports[0]["read"]) == len(reports[1]["read"]) == 8  # 16 images: half each
    assert not first & second and len(first | second) == 16


@pytest.mark.slow
def test_a_streamed_folder_run_trains_evaluates_and_reports(tmp_path):
    """One epoch on an image folder, streamed (Grain, in this process), then --mode eval's
    PGD and AutoAttack's APGD-CE through the checkpoint, and --mode report; the run records
    the data, so resuming on a changed folder is refused with the data named, and evaluating
    on a folder of other classes is refused. (The same at 64 px from the commands of
    docs/data.md, by hand on this 2-core CPU, 2026-12-07: training 65 s, eval PGD-5 +
    AutoAttack on 8 images 30 s, analyze 102 s, report.)"""
    from fpcm_jax.evaluation import evaluate
    from fpcm_jax.reports import report
    from fpcm_jax.training import train

    root = image_folder(tmp_path / "set", size=32, train_per_class=10, test_per_class=3)
    config = folder_config(root, model__widths=(8, 8, 8, 8), train__epochs=1,
                           train__batch_size=8, attack__steps=1,
                           train__final_test_attack_steps=1, data__streaming=True,
                           data__workers=0)
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(config, workdir)
    assert summary["final_step"] == 3  # 28 training images, batches of 8
    import json
    with open(os.path.join(workdir, "run.json")) as handle:
        recorded = json.load(handle)["data"]
    assert recorded["classes"] == ["ant", "bee", "cat"] and recorded["train"]["files"] == 30
    result = evaluate.run_evaluation(config, workdir, ["pgd2", "apgd-ce"], batch_size=8,
                                     autoattack_options={"n_iter": 2})
    assert result["examples"] == 9 and result["dataset"] == f"folder:{root}"
    table = report.write_report([workdir], str(tmp_path / "table"))
    assert any("PGD-2" in column["label"] for column in table["columns"])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "ant" / "new.png")
    datasets._OPENED.clear()  # a new process would open the folder anew
    with pytest.raises(ValueError, match="holds a run of another model.*data"):
        train.train_and_evaluate(config, workdir)
    other = image_folder(tmp_path / "other", size=32)
    os.rename(other / "train" / "cat", other / "train" / "dog")
    os.rename(other / "test" / "cat", other / "test" / "dog")
    with pytest.raises(ValueError, match="its labels mean other classes"):
        evaluate.run_evaluation(folder_config(other), workdir, ["none"])


def prepared_mnist(data_dir, file_format="array_record", counts=(("train", 20), ("test", 6))):
    """Real mnist records in data_dir, written without TensorFlow (which tfds needs to encode
    images when it prepares a dataset): PNGs in tf.train.Example protos (tfds's own copy),
    ArrayRecord shards, and the builder's dataset_info.json / features.json. Image i of a split
    is uniform noise, its label i % 10."""
    import io

    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

    builder = tfds.builder("mnist", data_dir=str(data_dir), file_format=file_format)
    path = os.fspath(builder.data_path)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = []
    for split, count in counts:
        shard = os.path.join(path, f"mnist-{split}.{file_format}-00000-of-00001")
        writer = ArrayRecordWriter(shard, "group_size:1") if file_format == "array_record" else None
        for index in range(count):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png, "PNG")
            feature = {"image": tf_feature_pb2.Feature(
                           bytes_list=tf_feature_pb2.BytesList(value=[png.getvalue()])),
                       "label": tf_feature_pb2.Feature(
                           int64_list=tf_feature_pb2.Int64List(value=[index % 10]))}
            example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature))
            if writer is not None:
                writer.write(example.SerializeToString())
        if writer is not None:
            writer.close()
        else:
            open(shard, "wb").close()
        template = tfds.core.ShardedFileTemplate(
            data_dir=path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="mnist", split=split, filetype_suffix=file_format)
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0,
                                          filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(path)


def test_real_array_record_files_through_tfds_data_source(tmp_path):
    """tfds:mnist prepared as ArrayRecord (written here): 20 + 6 records, labels i % 10 read
    without decoding the images, the images decoded on demand (28x28 grey -> 32x32 RGB); a
    slice of the split as the test split."""
    prepared_mnist(tmp_path)
    config = tiny_config(data__name="tfds:mnist", data__data_dir=str(tmp_path),
                         data__image_size=32, data__test_split="train[:5]",
                         data__validation_size=4)
    source = sources.open_source(config.data)
    images, labels = source.train
    assert list(labels) == [i % 10 for i in range(20)] and len(source.test[1]) == 5
    assert np.asarray(images[2:4]).shape == (2, 32, 32, 3)
    assert source.fingerprint["train"]["files"] == 20 and source.fingerprint["version"]


@pytest.mark.parametrize("file_format, message", [
    (None, "mnist is not prepared in"),
    ("tfrecord", "it needs the ArrayRecord format"),
])
def test_a_tfds_dataset_not_prepared_as_array_record_is_one_line(tmp_path, file_format,
                                                                   message):
    if file_format:
        prepared_mnist(tmp_path, file_format)
    config = tiny_config(data__name="tfds:mnist", data__data_dir=str(tmp_path))
    with pytest.raises(sources.DatasetError, match=message) as raised:
        sources.open_source(config.data)
    assert "\n" not in str(raised.value)
    assert "tfds build mnist --file_format=array_record" in str(raised.value)
