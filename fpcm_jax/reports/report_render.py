"""The comparison table of `fpcm_jax.reports.report` as Markdown (percent, mean ± std) and CSV (the
unrounded fractions, a mean, std and n column per figure)."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List


def markdown(table: Dict[str, Any]) -> str:
    """The table, then what its numbers are and where they come from."""
    labels = [column["label"] for column in table["columns"]]
    header = ["run", "seeds", "n", *table["settings"], *labels]
    lines = [_markdown_row(header), _markdown_row(["---"] * len(header))]
    for row in table["rows"]:
        size = len(row["runs"])
        cells = [_percent(row["cells"].get(label), size) for label in labels]
        lines.append(_markdown_row([", ".join(row["names"]), _seeds(row), str(size),
                                    *(_setting(row["settings"][k]) for k in table["settings"]),
                                    *cells]))
    return "\n".join(lines + [""] + _notes(table)) + "\n"


def _notes(table: Dict[str, Any]) -> List[str]:
    notes = ["Accuracy in %. A row is one setting: its runs differ only in seed (or in fields "
             "that only say how to compute or log); mean ± sample standard deviation (ddof=1) "
             "over its n runs, (n=k) where only k of them have the figure. Blank: not "
             "evaluated. `final`: the weights tested at the end of training (summary.json; the "
             "EMA weights when train.ema_decay > 0); the other columns: the latest `--mode "
             "eval` report of that setting (evaluations.jsonl), of best_robust/ unless the "
             "column names other weights [in brackets]; on the test split unless it names "
             "another."]
    alone = [name for row in table["rows"] if "config.json" not in row["settings_from"]
             for name in row["names"]]
    if alone:
        notes.append(f"No config.json in {', '.join(alone)} (trained before runs recorded "
                     f"their config): settings from run.json (the model only; ? where unknown), "
                     f"each a row of its own.")
    notes += [f"Warning: {warning}" for warning in table["warnings"]]
    return [f"{note}\n" for note in notes]


def _markdown_row(cells: List[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _seeds(row: Dict[str, Any]) -> str:
    return ", ".join("?" if seed is None else str(seed) for seed in row["seeds"])


def _percent(cell: Dict[str, Any], size: int) -> str:
    """'84.40', '84.40 ± 1.23', '84.40 ± 1.23 (n=2)' (of 3 runs), or '' when missing."""
    if cell is None:
        return ""
    text = f"{100 * cell['mean']:.2f}"
    if cell["std"] is not None:
        text += f" ± {100 * cell['std']:.2f}"
    if cell["n"] < size:
        text += f" (n={cell['n']})"
    return text


def _setting(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, list):
        return "(" + ", ".join(_setting(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_text(table: Dict[str, Any]) -> str:
    """One line per row: runs, seeds, n, the differing settings, then of each figure its mean
    and std as fractions and how many runs have it (blank when none)."""
    labels = [column["label"] for column in table["columns"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["runs", "seeds", "n", *table["settings"],
                     *(f"{label}{part}" for label in labels for part in ("", " std", " runs"))])
    for row in table["rows"]:
        figures = []
        for label in labels:
            cell = row["cells"].get(label)
            figures += (["", "", ""] if cell is None else
                        [repr(cell["mean"]), "" if cell["std"] is None else repr(cell["std"]),
                         str(cell["n"])])
        writer.writerow(["; ".join(row["names"]), _seeds(row), len(row["runs"]),
                         *(_setting(row["settings"][k]) for k in table["settings"]), *figures])
    return buffer.getvalue()
