"""PNG figures of `analysis.run_analysis` results, a run's training curves and the runs'
validation curves of `--mode report` (matplotlib's object API: no display, no global backend
chosen at import)."""

from __future__ import annotations

import io
import os
from typing import Any, Dict, List, Optional

import json
import math
from typing import Tuple

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close


def _figure(figsize: Tuple[float, float], rows: int = 1, columns: int = 1, **options):
    """(figure, axes) as pyplot.subplots gives them, on a Figure of its own."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, **options)


def write_all(results: Dict[str, Any], workdir: str) -> List[str]:
    """Write every figure; returns their paths."""
    writers = [alpha_distribution, band_noise, filtered_accuracy, fourier_heat_maps,
               feature_spectrum]
    paths = []
    for writer in writers:
        figure, name = writer(results)
        if figure is None:
            continue
        path = os.path.join(workdir, name)
        figure.savefig(path, dpi=90, bbox_inches="tight")
        paths.append(path)
    return paths


def alpha_distribution(results):
    models = {k: v for k, v in results["models"].items() if v["_alpha_samples"]}
    if not models:
        return None, None
    figure, axes = _figure((4.5 * len(models), 3.4), 1, len(models), squeeze=False)
    for axis, (label, result) in zip(axes[0], models.items()):
        stages = list(result["_alpha_samples"])
        axis.violinplot([result["_alpha_samples"][s].ravel() for s in stages], showmeans=True)
        axis.set_xticks(range(1, len(stages) + 1), stages)
        axis.set_ylim(0.5, 1.0)
        axis.set_title(f"{label}: FPCM alpha (low-pass weight)")
        axis.set_xlabel("FPCM module (network stage)")
        axis.set_ylabel("alpha over samples x channels")
    return figure, "alpha_distribution.png"


def band_noise(results):
    figure, axis = _figure((5.5, 3.6))
    bands = results["settings"]["bands"]
    centres = (np.arange(bands) + 0.5) * np.sqrt(0.5) / bands
    for label, result in results["models"].items():
        axis.plot(centres, result["band_noise_accuracy"], marker="o", label=label)
    axis.set_xlabel("noise band centre (cycles/pixel)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"Band-limited noise, L2 norm {results['settings']['noise_l2_norm']}")
    axis.legend()
    return figure, "band_noise.png"


def filtered_accuracy(results):
    figure, axes = _figure((10, 3.6), 1, 2, sharey=True)
    for label, result in results["models"].items():
        for axis, kind in zip(axes, ("lowpass", "highpass")):
            axis.plot(results["filter_radii"], result["filtered_accuracy"][kind], marker=".",
                      label=label)
    for axis, title in zip(axes, ("low-pass filtered images", "high-pass filtered images")):
        axis.set_xlabel("cutoff radius (cycles/pixel)")
        axis.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    return figure, "filtered_accuracy.png"


def fourier_heat_maps(results):
    models = results["models"]
    figure, axes = _figure((3.8 * len(models), 3.4), 1, len(models), squeeze=False)
    for axis, (label, result) in zip(axes[0], models.items()):
        heat = np.asarray(result["fourier_heat_map"])
        rows, columns = heat.shape  # fftshifted: index i is frequency i - size // 2
        extent = (-columns // 2 - 0.5, columns - columns // 2 - 0.5,
                  rows - rows // 2 - 0.5, -rows // 2 - 0.5)
        image = axis.imshow(heat, vmin=0.0, vmax=1.0, cmap="viridis", extent=extent)
        axis.set_title(f"{label}: error rate")
        axis.set_xlabel("horizontal frequency (cycles/image)")
        axis.set_ylabel("vertical frequency (cycles/image)")
    figure.colorbar(image, ax=list(axes[0]), label="error rate")
    figure.suptitle(f"Fourier heat map, L2 norm {results['settings']['heatmap_l2_norm']} "
                    f"(centre = lowest frequency)", y=1.02)
    return figure, "fourier_heat_map.png"


def feature_spectrum(results):
    figure, axis = _figure((6.5, 3.6))
    bars = []
    for label, result in results["models"].items():
        for stage, shares in result["feature_high_frequency_share"].items():
            for kind in ("before", "after"):
                if kind in shares:
                    bars.append((f"{label}\n{stage} {kind}", shares[kind]))
    colours = {"before": "tab:blue", "after": "tab:orange"}
    for kind, colour in colours.items():
        chosen = [(index, value) for index, (name, value) in enumerate(bars)
                  if name.endswith(kind)]
        if chosen:
            axis.bar([i for i, _ in chosen], [v for _, v in chosen], color=colour,
                     label=f"{kind} FPCM")
    axis.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=90, fontsize=7)
    axis.set_xlabel("model and stage output")
    axis.set_ylabel("high-frequency energy share")
    axis.set_title("Stage outputs before and after FPCM")
    if bars:
        axis.legend()
    return figure, "feature_spectrum.png"


def training_curves(metrics_path: str, out_path: str) -> str:
    """curves.png from a run's metrics.jsonl: per epoch, the mean training loss, training
    clean and adversarial accuracy, validation clean and robust accuracy, and learning rate."""
    steps, validation = {}, {}
    with open(metrics_path) as handle:
        for record in map(json.loads, handle):
            if "loss" in record:
                steps.setdefault(max(1, math.ceil(record["epoch"] - 1e-9)), []).append(record)
            elif "val_clean_acc" in record:
                validation[record["epoch"]] = record
    epochs = sorted(steps)
    mean = lambda key: [np.mean([r[key] for r in steps[e]]) for e in epochs]
    figure, (loss_axis, accuracy_axis, lr_axis) = _figure((14, 3.6), 1, 3)
    loss_axis.plot(epochs, mean("loss"), marker=".")
    loss_axis.set_ylabel("training loss (mean over the epoch)")
    accuracy_axis.plot(epochs, mean("clean_acc"), marker=".", label="train, clean")
    accuracy_axis.plot(epochs, mean("adv_acc"), marker=".", label="train, adversarial")
    if validation:
        done = sorted(validation)
        accuracy_axis.plot(done, [validation[e]["val_clean_acc"] for e in done], marker="o",
                           label="validation, clean")
        accuracy_axis.plot(done, [validation[e]["val_robust_acc"] for e in done], marker="o",
                           label="validation, PGD")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.legend()
    lr_axis.plot(epochs, mean("lr"), marker=".")
    lr_axis.set_ylabel("learning rate")
    for axis in (loss_axis, accuracy_axis, lr_axis):
        axis.set_xlabel("epoch")
    figure.savefig(out_path, dpi=90, bbox_inches="tight")
    return out_path


def report_curves(runs: List[Tuple[str, int, Dict[str, List[float]]]], attack: str) -> bytes:
    """report_curves.png of `--mode report`, as PNG bytes: each run's validation clean and
    `attack` accuracy per epoch (metrics.jsonl), side by side; runs of one row of the table
    (`group`) share a colour, each seed a line style."""
    figure, (clean_axis, robust_axis) = _figure((11, 3.8), 1, 2, sharey=True)
    styles, seen = ("-", "--", ":", "-."), {}
    for name, group, curves in runs:
        if not curves.get("epoch"):
            continue
        seen[group] = seen.get(group, -1) + 1  # the how-manyth run of its row
        style = styles[seen[group] % len(styles)]
        options = {"color": f"C{group % 10}", "linestyle": style, "marker": ".", "label": name}
        clean_axis.plot(curves["epoch"], curves["clean"], **options)
        robust_axis.plot(curves["epoch"], curves["robust"], **options)
    for axis, title in ((clean_axis, "validation, clean"), (robust_axis, f"validation, {attack}")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if not seen:
            axis.text(0.5, 0.5, "no validation records", ha="center", transform=axis.transAxes)
    clean_axis.set_ylabel("accuracy")
    if seen:
        robust_axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def corruption_figures(entries: Dict[str, Dict[str, Any]], out_path: Optional[str] = None):
    """Common corruptions seen through frequency (`corruption_eval` entries, one per model):
    left, accuracy against the perturbation's mean radius for every corruption and severity,
    a colour per model (Yin et al.'s view); right, one corruption x severity heat map per model
    (the corruptions named on the first), one colour bar for all. Written to out_path (PNG),
    which is returned; without out_path, the PNG's bytes."""
    models = list(entries)
    figure, axes = _figure((6 + 3.2 * len(models) + 1, 4.8), 1, 1 + len(models), squeeze=False,
                           gridspec_kw={"width_ratios": [6] + [3.2] * len(models)})
    figure.subplots_adjust(wspace=0.3)
    scatter_axis = axes[0][0]
    for index, (label, entry) in enumerate(entries.items()):
        points = [(cell["mean_radius"], cell["accuracy"])
                  for cells in entry["cells"].values() for cell in cells.values()]
        scatter_axis.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.7,
                             color=f"C{index % 10}", label=label)
    scatter_axis.set_xlabel("perturbation mean radius (cycles/pixel)")
    scatter_axis.set_ylabel("accuracy")
    scatter_axis.set_title("accuracy vs. where the corruption's energy lies", fontsize=10)
    if models:
        scatter_axis.legend(fontsize=8)
    image = None
    for index, (axis, (label, entry)) in enumerate(zip(axes[0][1:], entries.items())):
        names = list(entry["cells"])
        severities = [str(s) for s in entry["severities"]]
        grid = np.array([[entry["cells"][n][s]["accuracy"] for s in severities] for n in names])
        image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(severities)), severities)
        # Names on the first heat map only: the rows are the same corruptions in every one.
        axis.set_yticks(range(len(names)), names if index == 0 else [], fontsize=7)
        axis.set_xlabel("severity")
        axis.set_title(label, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=list(axes[0][1:]), label="accuracy", fraction=0.03)
    if out_path is None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        return buffer.getvalue()
    figure.savefig(out_path, dpi=90, bbox_inches="tight")
    return out_path
