"""`main.py --mode report`: the paper's comparison table from run directories.

    python main.py --config configs/tiny.py --mode report \
        --checkpoints runs/a_seed0,runs/a_seed1,runs/b --workdir runs/table

It only reads files (no model, no device, nothing compiled). From each run directory: its
settings (`config.json`, the resolved config a run records when it starts; a run from before
that: `run.json`, its model only), the final test figures (`summary.json`), every `--mode
eval` report (`evaluations.jsonl`) and the validation curves (`metrics.jsonl`).

A column is one figure in one setting: clean accuracy or an attack, with its norm, eps, split,
example count and weights (`final`: tested at the end of training; else the weights `--mode
eval` loaded, best_robust/ by default); of several evaluations in one setting the latest (the
last line of evaluations.jsonl) counts, whatever its attack seed (report.json names each cell's
report, seed and time). A row is one setting: runs whose configs differ only in seed (or in
fields that only say how to compute or log, `run_record.HOW_RUN`) are one row, mean ± sample
standard deviation (ddof=1) over its runs; a run without config.json is a row of its own.
Missing figures are blank cells. Written, each file whole, into the workdir: report.md
(printed too), report.csv, report.json and report_curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from fpcm_jax.data.corruptions import EXTRA as EXTRA_CORRUPTIONS
from fpcm_jax.data.corruptions import STANDARD as STANDARD_CORRUPTIONS
from fpcm_jax.reports import plots, report_render
from fpcm_jax.runs import run_record
from fpcm_jax.files import written_whole

# The run directory's files as fpcm_jax.runs.run_dir, evaluate and metrics name them (not imported:
# they load orbax and the models, which a report does not need).
RUN_FILE, SUMMARY_FILE, CONFIG_FILE = "run.json", "summary.json", run_record.CONFIG_FILE
EVALUATIONS_FILE, METRICS_FILE = "evaluations.jsonl", "metrics.jsonl"
OUTPUT_FILES = ("report.md", "report.csv", "report.json", "report_curves.png")
CORRUPTIONS_FIGURE = "report_corruptions.png"

ATTACK_ORDER = ("clean", "fgsm", "fgm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "square",
                "autoattack", "corruptions", "corruptions-low", "corruptions-high",
                "corruptions-extra")
ATTACK_NAMES = {"clean": "clean", "fgsm": "FGSM", "fgm": "FGM", "pgd": "PGD-{}", "cw": "CW-{}",
                "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square",
                "autoattack": "AutoAttack", "corruptions": "corruptions mean",
                "corruptions-low": "low-freq. corruptions",
                "corruptions-high": "high-freq. corruptions",
                "corruptions-extra": "extra corruptions"}
# A corruption evaluation's figures: its entry's field -> the column's attack name.
CORRUPTION_FIGURES = {"mean_standard": "corruptions", "mean_extra": "corruptions-extra"}


@dataclasses.dataclass(frozen=True)
class Column:
    """One figure in one setting: `attack` is 'clean' or an attack's name (pgd20, autoattack)."""
    attack: str
    weights: str                      # final (summary.json), best_robust, best_sum, checkpoint
    examples: Optional[int]
    split: str = "test"
    norm: Optional[str] = None        # None for clean accuracy
    eps: Optional[float] = None
    step_size: Optional[float] = None
    version: str = ""                 # AutoAttack's parameters when not the standard ones; the
    #                                   corruptions and severities of a corruption mean when
    #                                   not the whole benchmark

    def sort_key(self) -> Tuple:
        family, steps = _attack_family(self.attack)
        rank = ATTACK_ORDER.index(family) if family in ATTACK_ORDER else len(ATTACK_ORDER)
        return (self.weights != "final", self.split != "test", self.split, self.weights,
                rank, self.attack, steps, self.norm or "", self.eps or 0.0,
                self.examples or 0, self.step_size or 0.0, self.version)

    def label(self, detail: int = 0) -> str:
        """e.g. 'PGD-20 Linf 8/255 n=100'; detail 1 adds the step, 2 every field."""
        family, steps = _attack_family(self.attack)
        words = ["final"] if self.weights == "final" else []
        words.append(ATTACK_NAMES.get(family, self.attack).format(steps))
        if self.norm is not None:
            words.append(f"{'Linf' if self.norm == 'linf' else self.norm.upper()} "
                         f"{_number(self.eps) if detail < 2 else repr(self.eps)}")
        if detail >= 1 and self.step_size is not None:
            words.append(f"step {_number(self.step_size)}")
        if self.split != "test":
            words.append(self.split)
        words.append(f"n={self.examples if self.examples is not None else '?'}")
        if self.weights not in ("final", "best_robust"):
            words.append(f"[{self.weights}]")
        if self.version:  # a corruption subset is always named: it is not the benchmark
            named = detail >= 2 or self.attack.startswith("corruptions")
            words.append(f"({self.version})" if named else "(changed)")
        return " ".join(words)


def _attack_family(name: str) -> Tuple[str, int]:
    match = re.fullmatch(r"([a-z]+)(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


def _number(value: Optional[float]) -> str:
    """k/255 when the value is one, else 4 significant digits ('?' when unknown)."""
    if value is None:
        return "?"
    scaled = value * 255
    if round(scaled) and abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return f"{value:.4g}"


def column_labels(columns: Sequence[Column]) -> Dict[Column, str]:
    """A label per column, unique: more detail only where the shorter labels collide."""
    labels = {column: column.label() for column in columns}
    for detail in (1, 2):
        shared = [c for c in columns
                  if sum(labels[c] == labels[other] for other in columns) > 1]
        labels.update({column: column.label(detail) for column in shared})
    return labels


@dataclasses.dataclass
class Run:
    """What a run directory says: its settings and its figures, one cell per column."""
    path: str
    settings: Dict[str, Any]
    settings_from: str                # config.json, or run.json for runs from before it
    cells: Dict[Column, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    curves: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
    corruptions: Optional[Dict[str, Any]] = None  # the latest corruption evaluation's entry
    warnings: List[str] = dataclasses.field(default_factory=list)
    name: str = ""                    # the directory's name, or its path where names repeat

    @property
    def seed(self) -> Optional[int]:
        return self.settings.get("seed")


def check_run_directories(paths: Sequence[str]) -> List[str]:
    """The run directories, or a one-line ValueError naming the first that is not one."""
    if not paths:
        raise ValueError("--mode report needs --checkpoints runs/a,runs/b,... (run "
                         "directories made by training).")
    seen = set()
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"--checkpoints: the run directory {path} does not exist.")
        if not os.path.isfile(os.path.join(path, RUN_FILE)):
            raise ValueError(f"--checkpoints: {path} is not a run directory (it has no "
                             f"{RUN_FILE}); give the directories training made (--workdir).")
        if os.path.realpath(path) in seen:
            raise ValueError(f"--checkpoints: {path} is given twice; give each run once.")
        seen.add(os.path.realpath(path))
    return list(paths)


def read_run(path: str) -> Run:
    settings, settings_from = _read_settings(path)
    run = Run(path, settings, settings_from)
    summary = _read_json(os.path.join(path, SUMMARY_FILE))
    if summary is not None:
        _add_summary(run, summary)
    for report in _read_lines(os.path.join(path, EVALUATIONS_FILE), run.warnings):
        _add_evaluation(run, report)  # in the order written: the latest of a setting wins
    validation = [r for r in _read_lines(os.path.join(path, METRICS_FILE), run.warnings)
                  if "val_clean_acc" in r]
    by_epoch = {record["epoch"]: record for record in validation}  # a resumed run: the last
    epochs = sorted(by_epoch)
    run.curves = {"epoch": epochs, "clean": [by_epoch[e]["val_clean_acc"] for e in epochs],
                  "robust": [by_epoch[e]["val_robust_acc"] for e in epochs]}
    return run


def _read_json(path: str) -> Optional[Any]:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); restore or remove it.") from None


def _read_lines(path: str, warnings: List[str]) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file; a damaged line (a crash while appending) is passed
    over with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.append(f"{path} line {number} is not JSON: passed over.")
    return records


def _read_settings(path: str) -> Tuple[Dict[str, Any], str]:
    """{dotted config field: value} and the file it came from."""
    config = _read_json(os.path.join(path, CONFIG_FILE))
    if config is not None:
        return run_record.flat_fields(ml_collections.ConfigDict(config)), CONFIG_FILE
    description = _read_json(os.path.join(path, RUN_FILE))
    settings = {f"model.{k}": v for k, v in description.items()
                if k not in ("dataset", "num_classes")}
    settings["data.name"] = description.get("dataset")
    return settings, RUN_FILE


def _add_summary(run: Run, summary: Dict[str, Any]) -> None:
    """The final test figures: clean, and PGD-N when training ended with one."""
    examples = summary.get("test_examples")
    cell = {"from": SUMMARY_FILE, "step": summary.get("final_step")}
    if "test_clean_acc" in summary:
        run.cells[Column("clean", "final", examples)] = {"value": summary["test_clean_acc"],
                                                         **cell}
    for key, value in summary.items():
        match = re.fullmatch(r"test_pgd(\d+)_acc", key)
        if match and int(match.group(1)) > 0:  # pgd0: clean only
            column = Column(f"pgd{match.group(1)}", "final", examples, "test",
                            summary.get("norm", run.settings.get("attack.norm", "linf")),
                            summary.get("eps", run.settings.get("attack.eps")),
                            run.settings.get("attack.step_size"))
            run.cells[column] = {"value": value, **cell}


def _add_evaluation(run: Run, report: Dict[str, Any]) -> None:
    """One `--mode eval` report: a clean cell, and a cell per attack (`none` is clean)."""
    weights = (report.get("checkpoint_info") or {}).get("selected_by") or "checkpoint"
    split, examples = report.get("split", "test"), report.get("examples")
    cell = {"from": report.get("report_path", EVALUATIONS_FILE), "time": report.get("time"),
            "attack_seed": report.get("seed"), "checkpoint": report.get("checkpoint")}
    for name, entry in report.get("attacks", {}).items():
        if "robust_acc" not in entry:
            continue
        run.cells[Column("clean", weights, examples, split)] = {"value": entry["clean_acc"],
                                                               **cell}
        if name == "none":
            continue
        if name == "corruptions":
            _add_corruptions(run, entry, weights, split, cell)
            continue
        parameters = entry.get("parameters", {})
        version = str(parameters.get("version", "standard"))
        column = Column(name, weights, examples, split, report.get("norm", "linf"),
                        report.get("eps"), parameters.get("step_size"),
                        "" if version == "standard" else version)
        run.cells[column] = {"value": entry["robust_acc"], **cell}


def _add_corruptions(run: Run, entry: Dict[str, Any], weights: str, split: str,
                     cell: Dict[str, Any]) -> None:
    """The corruption means (standard, extra) and the frequency halves' means, each a column.
    A mean over fewer corruptions or severities than the benchmark's is a column of its own,
    whose version names the subset (never the benchmark's column)."""
    severities = entry.get("severities", [])
    evaluated = list(entry.get("cells", {}))
    groups = {"corruptions": STANDARD_CORRUPTIONS, "corruptions-extra": EXTRA_CORRUPTIONS}
    figures = {attack: entry.get(key) for key, attack in CORRUPTION_FIGURES.items()}
    for group, values in entry.get("frequency_groups", {}).items():
        figures[f"corruptions-{group}"] = values.get("accuracy")
    for attack, value in figures.items():
        if value is not None:
            among = groups.get(attack, STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS)
            version = corruption_subset(evaluated, among, severities)
            column = Column(attack, weights, entry.get("examples_per_cell"), split,
                            version=version)
            run.cells[column] = {"value": value, **cell}
    run.corruptions = entry


def corruption_subset(evaluated: Sequence[str], among: Sequence[str],
                      severities: Sequence[int]) -> str:
    """'' for the whole benchmark (every corruption of `among`, severities 1-5), else what
    was evaluated, e.g. '4 of 15: brightness, contrast, gaussian_noise, impulse_noise;
    severities 1,3'."""
    chosen = [name for name in evaluated if name in among]
    parts = [] if len(chosen) == len(among) else [
        f"{len(chosen)} of {len(among)}: {', '.join(sorted(chosen))}"]
    if list(severities) != [1, 2, 3, 4, 5]:
        parts.append(f"severities {','.join(map(str, severities))}")
    return "; ".join(parts)


def group_runs(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs whose settings differ only in seed and `run_record.HOW_RUN` fields, in the order
    given (each group by seed); a run without config.json alone."""
    groups: Dict[Any, List[Run]] = {}
    for index, run in enumerate(runs):
        key = (("alone", index) if run.settings_from != CONFIG_FILE else
               tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in run.settings.items()
                            if k != "seed" and not run_record.is_how_run(k))))
        groups.setdefault(key, []).append(run)
    return [sorted(group, key=lambda run: (run.seed is None, run.seed or 0))
            for group in groups.values()]


def aggregate(values: Sequence[float]) -> Dict[str, Any]:
    """mean, sample std (ddof=1; None for one value), n and the values."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if len(array) > 1 else None,
            "n": len(array), "values": [float(v) for v in values]}


def build_table(runs: Sequence[Run]) -> Dict[str, Any]:
    """The table (what report.json holds): columns, the settings that differ, rows."""
    columns = sorted({column for run in runs for column in run.cells},
                     key=Column.sort_key)
    labels = column_labels(columns)
    groups = group_runs(runs)
    differing = _differing_settings(runs)
    rows = []
    for group in groups:
        cells = {}
        for column in columns:
            present = [run for run in group if column in run.cells]
            if present:
                cells[labels[column]] = {
                    **aggregate([run.cells[column]["value"] for run in present]),
                    "runs": [run.name for run in present]}
        rows.append({"runs": [run.path for run in group], "names": [run.name for run in group],
                     "seeds": [run.seed for run in group],
                     "settings_from": sorted({run.settings_from for run in group}),
                     "settings": {k: _shared(group, k) for k in differing}, "cells": cells})
    return {"columns": [{"label": labels[c], **dataclasses.asdict(c)} for c in columns],
            "settings": differing, "rows": rows,
            "std": "sample standard deviation (ddof=1) over the runs of a row; null for one",
            "runs": [{"path": run.path, "seed": run.seed, "settings_from": run.settings_from,
                      "cells": {labels[c]: cell for c, cell in run.cells.items()}}
                     for run in runs],
            "warnings": [warning for run in runs for warning in run.warnings]}


def _differing_settings(runs: Sequence[Run]) -> List[str]:
    """Fields (not the seed, not HOW_RUN) whose known values differ between runs."""
    fields = sorted({k for run in runs for k in run.settings})
    return [k for k in fields if k != "seed" and not run_record.is_how_run(k) and len(
        {json.dumps(run.settings[k], sort_keys=True) for run in runs if k in run.settings}) > 1]


def _shared(group: Sequence[Run], field: str) -> Any:
    """The group's value of a field (the same in all its runs that know it), None if unknown."""
    known = [run.settings[field] for run in group if field in run.settings]
    return known[0] if known else None


def write_report(checkpoints: Sequence[str], workdir: str) -> Dict[str, Any]:
    """Read the runs, build the table, write the four files (each whole; all rendered before
    the first is written) and print the Markdown; returns the table with the files' paths."""
    runs = [read_run(path) for path in check_run_directories(checkpoints)]
    names = [os.path.basename(os.path.normpath(run.path)) for run in runs]
    for run, name in zip(runs, names):
        run.name = name if names.count(name) == 1 else run.path
    table = build_table(runs)
    contents = {"report.md": report_render.markdown(table),
                "report.csv": report_render.csv_text(table),
                "report.json": json.dumps(table, indent=1) + "\n",
                "report_curves.png": plots.report_curves(
                    [(run.name, group_index, run.curves) for group_index, group
                     in enumerate(group_runs(runs)) for run in group],
                    _validation_attack(runs))}
    evaluated = {run.name: run.corruptions for run in runs if run.corruptions}
    if evaluated:  # beside the table: the runs' corruption accuracy against frequency
        contents[CORRUPTIONS_FIGURE] = plots.corruption_figures(evaluated)
    os.makedirs(workdir, exist_ok=True)
    table["files"] = []
    for name in [*OUTPUT_FILES, *([CORRUPTIONS_FIGURE] if evaluated else [])]:
        path = os.path.join(workdir, name)
        content = contents[name]
        with written_whole(path, "wb") as handle:  # UTF-8 (±) whatever the locale
            handle.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        table["files"].append(path)
    print(contents["report.md"])
    return table


def _validation_attack(runs: Sequence[Run]) -> str:
    """'PGD-N' of the validation (eval.attack_steps), when the runs agree and say it."""
    steps = {run.settings.get("eval.attack_steps") for run in runs}
    return f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
