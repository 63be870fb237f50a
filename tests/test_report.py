"""`main.py --mode report`: the comparison table against the runs' own reports.

Three tiny runs made here: PGD-AT with seeds 0 (the session's `trained_tiny_run`, copied) and 1
(TensorBoard and curves off, a final PGD-1 test: fields that only say how to compute or log, so
still one row with seed 0), and standard training (attack.steps=0, not validated: another
row, never evaluated). Seed 0 is evaluated with `--mode eval`'s function (PGD-1, 20 images); each run
costs a compile, so only one is evaluated and the mean ± std are checked on the final figures.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from fpcm_jax.evaluation import evaluate
from fpcm_jax.reports import report
from fpcm_jax.training import train

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report_runs(trained_tiny_run, tmp_path_factory):
    """{name: run directory} of the three runs; seed 0 evaluated (PGD-1, 20 images), with an
    older evaluation of the same setting (other numbers) before it in evaluations.jsonl."""
    root = tmp_path_factory.mktemp("report")
    source, config = trained_tiny_run
    runs = {"pgdat_s0": root / "pgdat_s0", "pgdat_s1": root / "pgdat_s1",
            "standard": root / "standard"}
    shutil.copytree(source, runs["pgdat_s0"])
    seed1 = tiny_config(attack__steps=1, train__epochs=1, train__final_test_attack_steps=1,
                        logging__tensorboard=False, logging__curves=False)
    seed1.seed = 1
    train.train_and_evaluate(seed1, str(runs["pgdat_s1"]))
    train.train_and_evaluate(tiny_config(attack__steps=0, train__epochs=1,  # not validated:
                                         train__eval_every_epochs=0,  # a compile less
                                         train__final_test_attack_steps=0),
                             str(runs["standard"]))
    evaluate.run_evaluation(config, str(runs["pgdat_s0"]), ["pgd1"], num_examples=20,
                            batch_size=20)
    history = runs["pgdat_s0"] / evaluate.HISTORY_FILE
    latest = json.loads(history.read_text())
    older = json.loads(json.dumps(latest))
    older["attacks"]["pgd1"].update(clean_acc=latest["attacks"]["pgd1"]["clean_acc"] / 2 + 0.3,
                                    robust_acc=latest["attacks"]["pgd1"]["robust_acc"] / 2 + 0.2)
    history.write_text(json.dumps(older) + "\n" + json.dumps(latest) + "\n")
    return {name: str(path) for name, path in runs.items()}


@pytest.fixture(scope="module")
def table(report_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    paths = [report_runs[name] for name in ("pgdat_s0", "standard", "pgdat_s1")]
    return report.write_report(paths, str(out)), str(out)


def _own_figures(run_dir):
    """{column label: value} from a run's own files: summary.json and its report file."""
    with open(os.path.join(run_dir, "summary.json")) as handle:
        summary = json.load(handle)
    n = summary["test_examples"]
    figures = {f"final clean n={n}": summary["test_clean_acc"]}
    if "test_pgd1_acc" in summary:
        assert summary["norm"] == "linf" and summary["eps"] == pytest.approx(8 / 255)
        figures[f"final PGD-1 Linf 8/255 n={n}"] = summary["test_pgd1_acc"]
    reports = [name for name in os.listdir(run_dir) if name.startswith("eval_")]
    for name in reports:  # one setting evaluated: one report file
        with open(os.path.join(run_dir, name)) as handle:
            entry = json.load(handle)["attacks"]["pgd1"]
        figures["clean n=20"], figures["PGD-1 Linf 8/255 n=20"] = (entry["clean_acc"],
                                                                   entry["robust_acc"])
    return figures


def test_table_numbers_are_the_runs_own(table, report_runs):
    """Each run's cells are its summary.json and its (latest) evaluation report exactly; the
    PGD-AT seeds are one row, its cells mean and sample std (ddof=1) of the seeds' figures."""
    result, _ = table
    by_path = {run["path"]: run for run in result["runs"]}
    own = {name: _own_figures(path) for name, path in report_runs.items()}
    for name, path in report_runs.items():
        assert {label: cell["value"] for label, cell in by_path[path]["cells"].items()} == \
            own[name], name
    pgdat, standard = result["rows"]
    assert pgdat["names"] == ["pgdat_s0", "pgdat_s1"] and pgdat["seeds"] == [0, 1]
    assert standard["names"] == ["standard"]
    assert result["settings"] == ["attack.steps", "train.eval_every_epochs"]  # not the seed,
    assert pgdat["settings"] == {"attack.steps": 1, "train.eval_every_epochs": 1}  # logging.*
    assert standard["settings"] == {"attack.steps": 0, "train.eval_every_epochs": 0}
    for label, cell in pgdat["cells"].items():
        values = [own[name][label] for name in ("pgdat_s0", "pgdat_s1") if label in own[name]]
        assert cell["values"] == values and cell["n"] == len(values)
        assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        if len(values) > 1:
            assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        else:
            assert cell["std"] is None
    clean = pgdat["cells"][next(iter(own["pgdat_s0"]))]["values"]
    assert clean[0] != clean[1], "the seeds' test accuracies must differ for std to be tested"
    assert "PGD-1 Linf 8/255 n=20" not in standard["cells"]  # never evaluated: no cell


def test_markdown_and_csv(table, report_runs):
    """report.md shows mean ± std in %, (n=1) for a figure only one seed has and blank
    cells for what was not evaluated; report.csv holds the same unrounded numbers."""
    result, out = table
    pgdat, standard = result["rows"]
    labels = [column["label"] for column in result["columns"]]
    with open(os.path.join(out, "report.md")) as handle:
        lines = handle.read().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["run", "seeds", "n", "attack.steps", "train.eval_every_epochs", *labels]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:4]]
    assert rows[0][:5] == ["pgdat_s0, pgdat_s1", "0, 1", "2", "1", "1"]
    assert rows[1][:5] == ["standard", "0", "1", "0", "0"]
    for label in labels:
        cell, shown = pgdat["cells"][label], rows[0][header.index(label)]
        expected = f"{100 * cell['mean']:.2f}"
        if cell["n"] == 2:
            expected += f" ± {100 * np.std(cell['values'], ddof=1):.2f}"
        else:
            expected += " (n=1)"
        assert shown == expected, label
    blank = [label for label in labels if label not in standard["cells"]]
    tested = result["columns"][0]["examples"]
    assert blank == [f"final PGD-1 Linf 8/255 n={tested}", "clean n=20", "PGD-1 Linf 8/255 n=20"]
    assert all(rows[1][header.index(label)] == "" for label in blank)
    with open(os.path.join(out, "report.csv")) as handle:
        records = list(csv.DictReader(handle))
    for record, row in zip(records, (pgdat, standard)):
        for label in labels:
            cell = row["cells"].get(label)
            assert record[label] == ("" if cell is None else repr(cell["mean"]))
            assert record[f"{label} std"] == ("" if cell is None or cell["std"] is None
                                              else repr(cell["std"]))
    with open(os.path.join(out, "report_curves.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.json")) as handle:
        assert json.load(handle)["rows"] == result["rows"]


def test_runs_without_config_json_are_rows_of_their_own(report_runs, tmp_path):
    """Runs from before config.json (their seed unknown) are never averaged together, even
    with the same run.json; the table says where their settings came from."""
    old = []
    for name in ("pgdat_s0", "pgdat_s1"):
        shutil.copytree(report_runs[name], tmp_path / f"old_{name}")
        os.remove(tmp_path / f"old_{name}" / "config.json")
        old.append(str(tmp_path / f"old_{name}"))
    result = report.write_report(old, str(tmp_path / "table"))
    assert [row["names"] for row in result["rows"]] == [["old_pgdat_s0"], ["old_pgdat_s1"]]
    assert [row["seeds"] for row in result["rows"]] == [[None], [None]]
    markdown = (tmp_path / "table" / "report.md").read_text()
    assert "| old_pgdat_s0 | ? | 1 |" in markdown
    assert "No config.json in old_pgdat_s0, old_pgdat_s1" in markdown


def test_missing_run_directory_is_named_before_writing(trained_tiny_run, tmp_path):
    source, _ = trained_tiny_run
    out = tmp_path / "table"
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(ValueError, match=f"run directory {missing} does not exist"):
        report.write_report([str(source), missing], str(out))
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    with pytest.raises(ValueError, match=f"{not_a_run} is not a run directory"):
        report.write_report([str(source), str(not_a_run)], str(out))
    assert not out.exists()


def test_command_line(report_runs, tmp_path):
    """main.py --mode report prints the table and writes the files, with no JAX backend
    (JAX_PLATFORMS names none that exists)."""
    out = tmp_path / "table"
    paths = ",".join(report_runs[name] for name in ("pgdat_s0", "pgdat_s1", "standard"))
    done = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/tiny.py", "--mode", "report",
         "--checkpoints", paths, "--workdir", str(out)], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "no_such_backend"})
    assert done.returncode == 0, done.stderr
    assert "| pgdat_s0, pgdat_s1 | 0, 1 | 2 |" in done.stdout
    assert sorted(os.listdir(out)) == sorted(report.OUTPUT_FILES)
    with open(out / "report.json") as handle:
        rows = json.load(handle)["rows"]
    assert [row["names"] for row in rows] == [["pgdat_s0", "pgdat_s1"], ["standard"]]
