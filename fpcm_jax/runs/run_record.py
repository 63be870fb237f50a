"""A training run's record: its whole configuration and environment, written when it starts.

    config.py            the complete resolved config (every field, after command-line
                         overrides) as a config file: `--config <workdir>/config.py` repeats the run
    config.json          the same fields as JSON, what a resume is compared with
    environment.json     fpcm-jax, JAX, jaxlib, Flax, Optax, orbax versions, backend, devices,
                         processes, the command line, the start time (UTC) and the git commit
    record_history.jsonl one line per start of training in the workdir: time, command line, the
                         settings changed since the start before, environment differences

A resume that changes the experiment (any field outside `HOW_RUN`, the fields that only say
how to compute or log) is refused before anything is written or compiled (`check_resume`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional

import jax
import ml_collections

from fpcm_jax.version import __version__
from fpcm_jax.files import append_json_line, write_json, written_whole

CONFIG_SOURCE_FILE = "config.py"
CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
HISTORY_FILE = "record_history.jsonl"

# The fields a resume may change: each only says how the same experiment is computed, saved,
# logged or analysed. A field (or section) not named here defines the experiment, also one
# added to the config later.
HOW_RUN = {
    "train.checkpoint_every_steps": "when to save; the steps are the same",
    "train.stop_after_steps": "where this invocation stops; resuming continues the same run",
    "train.final_test_attack_steps": "only the final test report's attack; training and the "
                                     "best-model selection never read it",
    "logging": "what is logged (TensorBoard, alpha histograms, curves.png)",
    "analysis": "read by --mode analyze only, never by training",
    "attack.loop": "unrolled or lax.fori_loop: the same attack steps",
    "eval.autoattack_fitted_batches": "the shapes AutoAttack's batches are padded to: the same "
                                      "points and randomness",
    "model.fpcm_lowpass": "fft or matmul: the same filter",
    "data.data_dir": "where the dataset is read from; the images are the same",
    "data.download": "how a missing dataset is obtained",
    "data.source_url": "a mirror of the same files (their checksums are checked)",
    "data.test_sets_url": "a mirror of the test sets' files (their checksums are checked)",
    "data.source_sha256": "checksums of a mirror's files",
    "data.prepare": "tfds preparation instead of the archive: the same images",
    "data.max_in_memory_gb": "held in memory or streamed: the same images in the same order",
    "data.streaming": "held in memory or streamed: the same images in the same order",
    "data.workers": "how many processes decode the streamed images",
    "data.prefetch": "how many streamed batches are read ahead",
    "multihost": "how the processes find each other; the devices are in environment.json",
}
# Not here, though they look like "how": eval.batch_size (validation's PGD random starts are
# drawn per batch, so it changes the validation figures and with them the best models) and
# eval.attack_steps, eval.use_ema (what validation measures).
REASONS = {  # why a changed experiment field cannot resume, where more than "another run"
    "train.epochs": "the learning-rate schedule and the FPCM cutoff curriculum are functions of "
                    "train.epochs, so a run cannot be extended: train a new run",
}
_MISSING = object()  # a field the config does not have
VERSIONS = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
            "orbax_checkpoint": "orbax-checkpoint", "ml_collections": "ml_collections"}


def flat_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """{'train.lr': 0.05, ...}: every field of a config, as its JSON record holds it."""
    return _flatten(json.loads(config.to_json()))


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_how_run(field: str) -> bool:
    """Whether `field` only says how to compute or log (a resume may change it)."""
    return any(field == name or field.startswith(f"{name}.") for name in HOW_RUN)


def experiment_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The fields that define the experiment (for TensorBoard's hparams and comparisons)."""
    return {k: v for k, v in flat_fields(config).items() if not is_how_run(k)}


# --- the config as a config file ---------------------------------------------------------

def config_source(config: ml_collections.ConfigDict) -> str:
    """A config file whose get_config() rebuilds `config`: the same fields, values and types;
    a field held in a typed FieldReference (e.g. model.widths=None) stays one, so command-line
    overrides of it work as with the original file."""
    lines = ['"""The configuration of the fpcm-jax run in this directory, written when it '
             'started.', "", "Repeat the run: python main.py --config <this file> --workdir "
             "<a new workdir>", '"""', "", "import ml_collections", "", "",
             "def get_config():", "    config = ml_collections.ConfigDict()"]
    _section_source(config, "config", lines)
    lines.append("    return config")
    return "\n".join(lines) + "\n"


def _section_source(section: ml_collections.ConfigDict, name: str, lines: List[str]) -> None:
    for key, value in section.items(preserve_field_references=True):
        where = f"{name}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            lines.append(f"    {where} = ml_collections.ConfigDict()")
            _section_source(value, where, lines)
        elif isinstance(value, ml_collections.FieldReference):
            field_type = value.get_type()
            if field_type is None or getattr(field_type, "__module__", "") != "builtins":
                raise ValueError(f"Config field {where[7:]} is a reference of type "
                                 f"{field_type!r}, which the run's config.py cannot hold.")
            lines.append(f"    {where} = ml_collections.FieldReference("
                         f"{_literal(value.get(), where)}, field_type={field_type.__name__})")
        else:
            lines.append(f"    {where} = {_literal(value, where)}")


def _literal(value: Any, where: str) -> str:
    """Python source that evaluates to `value` (of the same type)."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float('{value}')"
    if isinstance(value, (tuple, list)):
        items = [_literal(item, where) for item in value]
        if isinstance(value, list):
            return f"[{', '.join(items)}]"
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, dict):
        pairs = [f"{_literal(k, where)}: {_literal(v, where)}" for k, v in value.items()]
        return "{" + ", ".join(pairs) + "}"
    raise ValueError(f"Config field {where[7:]} holds a {type(value).__name__}; the run's "
                     f"config.py can hold numbers, strings, booleans, None, tuples, lists and "
                     f"dicts of them.")


# --- the environment ---------------------------------------------------------------------

def environment() -> Dict[str, Any]:
    """What the run starts in: versions, devices, command line, time, git commit."""
    devices = jax.devices()
    versions = {"fpcm_jax": __version__, "python": platform.python_version()}
    for name, distribution in VERSIONS.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "argv": list(sys.argv), "versions": versions, "backend": jax.default_backend(),
            "device_kinds": sorted({device.device_kind for device in devices}),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(), "git": git_commit()}


def git_commit() -> Optional[Dict[str, Any]]:
    """{'commit', 'dirty'} of the project checkout fpcm_jax runs from; None when it runs from
    an installed copy, or git is missing (this file is fpcm_jax/runs/run_record.py)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return None  # an installed copy inside some other repository
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return None


# --- resume guard and writing ------------------------------------------------------------

def _read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the run's record {path} ({error}); move the file away "
                         f"to resume without comparing settings.") from None


def recorded_fields(workdir: str) -> Optional[Dict[str, Any]]:
    """{'train.lr': 0.05, ...}: the config a run directory's record holds (None: no record)."""
    path = os.path.join(workdir, CONFIG_FILE)
    return _flatten(_read_json(path)) if os.path.exists(path) else None


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """What this start of training is: {'event': 'start' | 'resume' | 'resume, first record',
    'changed': {field: [old, new]}, 'added': {field: value}}; raises ValueError, before
    anything is written, when a resume changes the experiment (each field, old and new)."""
    recorded, now = recorded_fields(workdir), flat_fields(config)
    if recorded is None:
        existed = os.path.exists(os.path.join(workdir, "run.json"))
        return {"event": "resume, first record" if existed else "start", "changed": {},
                "added": {}}
    changed = {k: [recorded[k], now.get(k)] for k in sorted(recorded)
               if recorded[k] != now.get(k, _MISSING)}
    refused = [k for k in changed if not is_how_run(k)]
    if refused:
        finished = os.path.exists(os.path.join(workdir, "summary.json"))
        raise ValueError(_refusal(workdir, {k: changed[k] for k in refused}, now, finished))
    added = {k: now[k] for k in now if k not in recorded}  # fields new in this fpcm-jax version
    return {"event": "resume", "changed": changed, "added": added}


def _refusal(workdir: str, refused: Dict[str, List[Any]], now: Dict[str, Any],
             finished: bool) -> str:
    parts = []
    for field, (old, new) in refused.items():
        new_text = repr(new) if field in now else "(no such field in this fpcm-jax version)"
        reason = REASONS.get(field)
        if reason and finished:
            reason = f"the run has finished; {reason}"
        parts.append(f"{field}: {old!r} there, {new_text} now" + (f" ({reason})" if reason
                                                                   else ""))
    return (f"--workdir {workdir} holds a run with other settings: {'; '.join(parts)}. Resume "
            f"with the recorded ones (--config {os.path.join(workdir, CONFIG_SOURCE_FILE)}), "
            f"or use a new --workdir.")


def write(workdir: str, config: ml_collections.ConfigDict, entry: Dict[str, Any]) -> None:
    """Write the record (call on the main process, after `check_resume` gave `entry`): the
    config files, environment.json at the first start, a line of the history."""
    current = environment()
    environment_path = os.path.join(workdir, ENVIRONMENT_FILE)
    line = {"time": current["started"], "argv": current["argv"], **entry}
    if os.path.exists(environment_path):
        first = _read_json(environment_path)
        line["environment"] = {k: [first.get(k), v] for k, v in current.items()
                               if k not in ("started", "argv") and first.get(k) != v}
    else:
        write_json(environment_path, current)
    with written_whole(os.path.join(workdir, CONFIG_SOURCE_FILE)) as handle:
        handle.write(config_source(config))
    write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))
    append_json_line(os.path.join(workdir, HISTORY_FILE), line)


def change_lines(entry: Dict[str, Any]) -> List[str]:
    """Console lines for the settings a resume changed (empty when none)."""
    lines = []
    if entry["changed"]:
        lines.append("Resumed with changed settings (recorded in record_history.jsonl): " +
                     ", ".join(f"{k} {old!r} -> {new!r}"
                               for k, (old, new) in entry["changed"].items()))
    if entry["added"]:
        lines.append("Fields this fpcm-jax version added, not in the run's record (resumed "
                     "with): " + ", ".join(f"{k}={v!r}" for k, v in entry["added"].items()))
    return lines


def hparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The experiment's fields as TensorBoard hparams (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (bool, int, float, str))
            else str(tuple(v) if isinstance(v, list) else v)
            for k, v in experiment_fields(config).items()}


def weights_tested(config: ml_collections.ConfigDict) -> str:
    """Which weights validation, selection and the test use: 'EMA' or 'trained'."""
    return "EMA" if config.train.ema_decay > 0 and config.eval.use_ema else "trained"


def settings_lines(config: ml_collections.ConfigDict) -> List[str]:
    """The settings that define the run, in a few lines for the start of the output."""
    model, train, attack, data = config.model, config.train, config.attack, config.data
    shape = ", ".join(f"{k} {tuple(model[k])}" for k in ("widths", "stage_sizes") if model[k])
    alpha = model.get("fpcm_alpha")
    fpcm = (f"FPCM {model.fpcm_variant}, cutoff {model.cutoff_start} -> {model.cutoff_end}, "
            f"alpha {'learned' if alpha is None else f'fixed at {alpha:g}'}"
            if model.fpcm else "no FPCM (baseline)")
    model_line = (f"model: {model.name}{f' ({shape})' if shape else ''}, {fpcm}, "
                  f"{model.activation}, {model.dtype}, normalization {model.normalization}")
    if ":" in model.name:  # your own model (models.imported)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in model.get("kwargs", {}).items())
        model_line = f"model: {model.name}({kwargs}), your own, {model.dtype}"
    lines = [model_line,
             f"data: {data.name}, validation {data.validation_size}, flip {data.flip}, crop "
             f"padding {data.crop_padding}; extra data: " +
             (f"{data.extra_path} ({data.extra_fraction:g} of each batch)" if data.extra_path
              else "none"),
             f"loss: {_loss_text(train, attack.get('norm', 'linf'))}; attack: "
             f"{_attack_text(attack)}",
             f"optimizer: SGD lr {train.lr:g}, momentum {train.momentum:g}"
             f"{' (Nesterov)' if train.nesterov else ''}, weight decay {train.weight_decay:g}, "
             f"{train.schedule} schedule per {train.schedule_per}, warm-up "
             f"{train.warmup_epochs} epochs; AWP " +
             (f"gamma {train.awp_gamma:g} after {train.awp_warmup_epochs} epochs"
              if train.awp_gamma > 0 else "off") + "; EMA " +
             (f"decay {train.ema_decay:g} (warm-up {train.ema_warmup_fraction:g} of training, "
              f"batch statistics: {train.ema_batch_stats})" if train.ema_decay > 0 else "off"),
             f"{train.epochs} epochs, batch {train.batch_size} on {jax.device_count()} "
             f"{jax.default_backend()} device(s) in {jax.process_count()} process(es), seed "
             f"{config.seed}; validated, selected and tested with the "
             f"{weights_tested(config)} weights"]
    return lines


def _loss_text(train, norm: str) -> str:
    smoothing = f", label smoothing {train.label_smoothing:g}" if train.label_smoothing else ""
    if train.loss == "ce":
        return f"ce (PGD-AT){smoothing}"
    extra = ""
    if train.loss == "trades":
        extra = f", attack on {train.trades_attack}"
        if train.trades_attack == "kl" and norm == "l2":
            extra += (" (the TRADES code's L2 loop: lr 2 eps / steps, box then ball)"
                      if train.get("trades_l2_attack", "trades") == "trades"
                      else " (normalised PGD steps, ball then box)")
    elif train.loss == "mart" and train.get("mart_attack_start") == "normal":
        extra = ", attack start x + 0.001 N(0, 1) (the MART code)"
    return f"{train.loss}, beta {train.beta:g}{extra}{smoothing}"


def _attack_text(attack) -> str:
    if not attack.steps:
        return "none (standard training)"
    norm = attack.get("norm", "linf")
    if norm == "linf":
        size = f"eps {attack.eps * 255:.4g}/255, step {attack.step_size * 255:.4g}/255"
    else:
        size = f"eps {attack.eps:g}, step {attack.step_size:g}"
    return f"PGD-{attack.steps} {norm}, {size}, BN mode {attack.bn_mode}"
