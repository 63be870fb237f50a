"""The run's record: config.py reloads into the same config, the environment, the resume guard
(refusals touch nothing; cadence changes are recorded), TensorBoard's hparams."""

import hashlib
import importlib.metadata
import json
import os
import re
import struct
import subprocess

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import fpcm_jax
from conftest import tiny_config
from fpcm_jax.runs import run_record
from fpcm_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILES = (run_record.CONFIG_SOURCE_FILE, run_record.CONFIG_FILE,
                run_record.ENVIRONMENT_FILE, run_record.HISTORY_FILE)


def load_config_file(path, *overrides):
    """A config file loaded as main.py's --config flag loads it (locked), with overrides."""
    argv = ["main.py", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def typed_fields(config, prefix=""):
    """{field: (value, its type, the FieldReference's type or None)} over a whole config."""
    fields = {}
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, ml_collections.ConfigDict):
            fields.update(typed_fields(value, f"{prefix}{key}."))
        elif isinstance(value, ml_collections.FieldReference):
            fields[prefix + key] = (value.get(), type(value.get()), value.get_type())
        else:
            fields[prefix + key] = (value, type(value), None)
    return fields


def file_hashes(directory):
    """{relative path: sha256 (None for a folder)} of everything below `directory`."""
    hashes = {}
    for root, folders, files in os.walk(directory):
        for name in folders:
            hashes[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                hashes[os.path.relpath(os.path.join(root, name), directory)] = \
                    hashlib.sha256(handle.read()).hexdigest()
    return hashes


def history(workdir):
    with open(os.path.join(workdir, run_record.HISTORY_FILE)) as handle:
        return [json.loads(line) for line in handle]


def test_config_file_rebuilds_the_config_field_by_field(tmp_path):
    """Also the None FieldReferences (default model.widths) stay typed: overrides still work."""
    from configs import default

    for name, config in (("default", default.get_config()), ("tiny", tiny_config())):
        config.train.lr = 1 / 3  # a float whose repr must round-trip
        path = tmp_path / f"{name}.py"
        path.write_text(run_record.config_source(config))
        loaded = load_config_file(str(path))
        assert typed_fields(loaded) == typed_fields(config)
        assert typed_fields(loaded)["data.data_dir"] == (None, type(None), str)
    assert typed_fields(default.get_config())["model.widths"] == (None, type(None), tuple)
    overridden = load_config_file(str(tmp_path / "default.py"), "--config.model.widths=8,8,8,8",
                                  "--config.data.data_dir=/data", "--config.train.lr=0.2")
    assert (overridden.model.widths, overridden.data.data_dir) == ((8, 8, 8, 8), "/data")
    assert overridden.train.lr == 0.2


def test_record_of_a_run_holds_every_field_and_reloads(trained_tiny_run):
    workdir, config = trained_tiny_run
    loaded = load_config_file(str(workdir / run_record.CONFIG_SOURCE_FILE))
    assert typed_fields(loaded) == typed_fields(config)
    with open(workdir / run_record.CONFIG_FILE) as handle:
        assert run_record._flatten(json.load(handle)) == run_record.flat_fields(config)
    assert set(run_record.flat_fields(config)) == set(typed_fields(config))
    [start] = history(workdir)
    assert (start["event"], start["changed"]) == ("start", {})


def test_environment_file_holds_versions_devices_and_commit(trained_tiny_run, monkeypatch):
    workdir, _ = trained_tiny_run
    with open(workdir / run_record.ENVIRONMENT_FILE) as handle:
        environment = json.load(handle)
    versions = environment["versions"]
    assert versions["fpcm_jax"] == fpcm_jax.__version__
    for name, distribution in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
                               ("optax", "optax"), ("orbax_checkpoint", "orbax-checkpoint")):
        assert versions[name] == importlib.metadata.version(distribution)
    assert environment["backend"] == jax.default_backend()
    assert environment["device_count"] == jax.device_count()
    assert environment["process_count"] == 1 and environment["device_kinds"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", environment["started"])
    assert isinstance(environment["argv"], list)
    if os.path.isdir(os.path.join(REPO, ".git")):
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert environment["git"]["commit"] == head
        assert isinstance(environment["git"]["dirty"], bool)
    monkeypatch.setenv("PATH", "")  # no git: no commit, no error
    assert run_record.git_commit() is None


@pytest.mark.parametrize("changes, fields", [
    ({"train.lr": 0.1}, ["train.lr: 0.05 there, 0.1 now"]),
    ({"train.loss": "trades"}, ["train.loss: 'ce' there, 'trades' now"]),
    ({"seed": 3, "attack.eps": 0.5}, ["attack.eps: 0.03137", "seed: 0 there, 3 now"]),
], ids=["lr", "loss", "seed_and_eps"])
def test_resume_that_changes_the_experiment_is_refused_and_touches_nothing(tiny_run, changes,
                                                                          fields):
    workdir, config = tiny_run
    config.train.checkpoint_every_steps = 7  # allowed: not named in the refusal
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        (config[section] if section else config)[name] = value
    before = file_hashes(workdir)
    with pytest.raises(ValueError) as refusal:
        train.train_and_evaluate(config, str(workdir))
    message = str(refusal.value)
    assert "\n" not in message and "checkpoint_every_steps" not in message
    assert re.search(r"; ".join(re.escape(field) + ".*" for field in fields), message), message
    assert f"--config {workdir}/config.py" in message
    assert file_hashes(workdir) == before


def test_extending_a_finished_runs_epochs_is_refused_with_the_reason(tiny_run):
    workdir, config = tiny_run
    config.train.epochs = 3
    before = file_hashes(workdir)
    with pytest.raises(ValueError, match=r"train.epochs: 1 there, 3 now \(the run has finished; "
                                         r"the learning-rate schedule and the FPCM cutoff "
                                         r"curriculum are functions of train.epochs"):
        train.train_and_evaluate(config, str(workdir))
    assert file_hashes(workdir) == before


def test_changed_cadence_is_accepted_and_recorded(tiny_run, capsys):
    """The finished run resumes (only its final test runs again) and the change is recorded."""
    workdir, config = tiny_run
    config.train.checkpoint_every_steps = 7
    config.logging.curves = False
    with open(workdir / "summary.json") as handle:
        steps = json.load(handle)["final_step"]
    assert train.train_and_evaluate(config, str(workdir))["final_step"] == steps
    start, resume = history(workdir)
    assert resume["event"] == "resume"
    assert resume["changed"] == {"train.checkpoint_every_steps": [50, 7],
                                 "logging.curves": [True, False]}
    assert resume["environment"] == {} and resume["time"] >= start["time"]
    with open(workdir / run_record.CONFIG_FILE) as handle:
        assert json.load(handle)["train"]["checkpoint_every_steps"] == 7
    output = capsys.readouterr().out
    assert ("Resumed with changed settings (recorded in record_history.jsonl): "
            "logging.curves True -> False, train.checkpoint_every_steps 50 -> 7") in output
    assert "Final model (trained weights) on the test split" in output


def test_record_is_written_at_the_start_also_for_a_run_from_before_records(tiny_run, capsys):
    """A workdir without a record (checkpoints only) resumes and gets one, before training."""
    workdir, config = tiny_run
    for name in RECORD_FILES:
        os.remove(workdir / name)
    config.train.lr = 0.2  # no record to compare with: accepted, as before records existed
    training = train._Training(config, str(workdir))  # built, nothing run yet
    training.metrics.close()
    [entry] = history(workdir)
    assert (entry["event"], entry["changed"]) == ("resume, first record", {})
    assert load_config_file(str(workdir / run_record.CONFIG_SOURCE_FILE)).train.lr == 0.2
    assert os.path.exists(workdir / run_record.ENVIRONMENT_FILE)
    output = capsys.readouterr().out
    for expected in ("model: resnet18 (widths (8, 8, 8, 8), stage_sizes (1, 1, 1, 1)), FPCM "
                     "tokens, cutoff 0.5 -> 0.125", "data: digits, validation 100",
                     "loss: ce (PGD-AT); attack: PGD-1 linf, eps 8/255, step 2/255",
                     "SGD lr 0.2", "AWP off; EMA off", "1 epochs, batch 128 on",
                     "tested with the trained weights", "resuming at step 10 of 10"):
        assert expected in output


def test_settings_name_awp_ema_trades_and_the_ema_weights():
    config = tiny_config(train__loss="trades", train__awp_gamma=0.005,
                         train__awp_warmup_epochs=9, train__ema_decay=0.999)
    text = "\n".join(run_record.settings_lines(config))
    assert "loss: trades, beta 6, attack on ce" in text
    assert "AWP gamma 0.005 after 9 epochs; EMA decay 0.999" in text
    assert run_record.weights_tested(config) == "EMA" and "with the EMA weights" in text
    config.eval.use_ema = False
    assert run_record.weights_tested(config) == "trained"


def hparams_events(directory):
    """The hparams plugin's records in tensorboardX event files: [HParamsPluginData]."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    found = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as handle:
            content = handle.read()
        offset = 0
        while offset < len(content):  # records: length, its CRC, the event, its CRC
            (length,) = struct.unpack("<Q", content[offset:offset + 8])
            event = event_pb2.Event.FromString(content[offset + 12:offset + 12 + length])
            offset += 16 + length
            found += [plugin_hparams_pb2.HParamsPluginData.FromString(
                value.metadata.plugin_data.content) for value in event.summary.value
                if value.metadata.plugin_data.plugin_name == "hparams"]
    return found


def test_tensorboard_holds_the_runs_hyperparameters(trained_tiny_run):
    workdir, config = trained_tiny_run
    experiment, start, end = hparams_events(workdir / "tensorboard")
    names = {info.name for info in experiment.experiment.hparam_infos}
    assert names == set(run_record.experiment_fields(config)) and "train.lr" in names
    assert "train.checkpoint_every_steps" not in names  # how it ran, not the experiment
    assert {info.name.tag for info in experiment.experiment.metric_infos} >= {
        "validation/robust_acc", "test/clean_acc"}
    values = start.session_start_info.hparams
    assert values["train.lr"].number_value == config.train.lr == 0.05
    assert values["train.loss"].string_value == "ce"
    assert values["model.fpcm"].bool_value is True
    assert values["model.widths"].string_value == "(8, 8, 8, 8)"
    assert end.session_end_info.status == 1  # STATUS_SUCCESS: the run finished


# Every field a resume may change, written out: an allow-list entry broader than these (a
# whole section, or a field that changes the experiment) makes the test below fail.
MAY_CHANGE_ON_RESUME = {
    "train.checkpoint_every_steps", "train.stop_after_steps", "train.final_test_attack_steps",
    "logging.tensorboard", "logging.alpha_examples", "logging.curves",
    "analysis.num_examples", "analysis.bands", "analysis.noise_l2_norm",
    "analysis.filter_steps", "analysis.heatmap_examples", "analysis.heatmap_l2_norm",
    "analysis.feature_examples", "attack.loop", "eval.autoattack_fitted_batches",
    "model.fpcm_lowpass", "data.data_dir",
    "data.download", "data.source_url", "data.test_sets_url", "data.source_sha256",
    "data.prepare", "data.max_in_memory_gb", "data.streaming", "data.workers",
    "data.prefetch", "multihost"}


def another_value(value, field_type):
    """A different value of the field's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, (tuple, list)):
        return tuple(value) + (1,)
    return {float: 0.5, int: 7, str: "/elsewhere", tuple: (1, 1, 1, 1)}[field_type]


def test_every_field_changed_on_resume_is_refused_unless_allow_listed(tmp_path):
    """Field by field over the whole config: a changed field is refused (the refusal names it)
    unless it is in MAY_CHANGE_ON_RESUME, which must be exactly the fields accepted."""
    config = tiny_config()
    workdir = str(tmp_path)
    run_record.write(workdir, config, run_record.check_resume(workdir, config))
    accepted = set()
    for field, (value, _, field_type) in typed_fields(config).items():
        changed = config.copy_and_resolve_references()
        section, _, name = field.rpartition(".")
        (changed[section] if section else changed)[name] = another_value(value, field_type)
        try:
            entry = run_record.check_resume(workdir, changed)
        except ValueError as error:
            assert f"{field}: " in str(error), field
            continue
        assert field in entry["changed"], field
        accepted.add(field)
    assert accepted == MAY_CHANGE_ON_RESUME
    assert "eval.batch_size" not in accepted  # it changes validation's draws, hence selection
