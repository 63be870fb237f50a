"""`--mode eval --attack corruptions`: accuracy under common corruptions, and where each
corruption puts its energy in frequency.

For each corruption (read one at a time from its archive, `fpcm_jax.data.corruptions`) and each
severity: the accuracy over the first N test images (the model in eval mode at the final
cutoff, batches sharded over every device, the last one padded and masked), and the spectrum of
the perturbation the corruption makes, corrupted minus clean over the same images
(`spectra.perturbation_energy`): its energy-weighted mean radius and its share above half the
Nyquist frequency. The summary: the mean over the 15 standard corruptions x the severities
evaluated (RobustBench's figure when all 5 are), the 4 extra corruptions' mean apart, and the
corruptions split at the median of their measured mean radius into a low- and a
high-frequency group (the split comes from the data, not from names).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from fpcm_jax import attacks, parallel, progress
from fpcm_jax.data import corruptions, datasets
from fpcm_jax.evaluation import accuracy, spectra

CHUNK = 1000  # images per FFT chunk of the perturbation spectrum


def evaluate(config, model, variables, clean: datasets.Split, names: Sequence[str],
             severities: Sequence[int], batch_size: int, key: jax.Array, mesh,
             after_each: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The report entry (see the module docstring); after_each(entry so far) after each
    corruption, for partial reports."""
    settings = config.data
    archive = corruptions.CorruptionArchive(settings.name, settings.data_dir, settings.download,
                                            settings.test_sets_url, settings.source_sha256)
    count = min(len(clean), archive.per_severity())
    labels = archive.labels(count)
    if not np.array_equal(labels, clean.labels[:count]):
        raise ValueError(f"{archive.path}'s labels differ from the {settings.name} test split's "
                         f"(first {count}): corruptions are evaluated on the test split (the "
                         f"default --split), whose images they corrupt in order.")
    step = accuracy.make_eval_step(model, attacks.get("none"), mesh)
    clean_images = clean.images[:count]
    clean_result = accuracy.evaluate_split(step, variables, datasets.Split(clean_images, labels),
                                           batch_size, key, mesh,
                                           name="corruptions: the clean test images")
    cells: Dict[str, Dict[str, Dict[str, float]]] = {}
    main, start = parallel.is_main_process(), time.time()
    for index, name in enumerate(names):
        cells[name] = {}
        for severity, images in archive.read(name, severities, count):
            result = accuracy.evaluate_split(step, variables, datasets.Split(images, labels),
                                             batch_size, key, mesh,
                                             name=f"corruptions: {name} at severity {severity}")
            cells[name][str(severity)] = {"accuracy": result["clean_acc"],
                                          **_spectrum(images, clean_images)}
        del images  # one corruption in memory at a time (the next is read after this)
        if main:
            mean = np.mean([cell["accuracy"] for cell in cells[name].values()])
            progress.say(f"  corruptions: {name} ({index + 1}/{len(names)}) accuracy "
                         f"{mean:.4f} over severities {','.join(map(str, severities))} "
                         f"({time.time() - start:.0f} s)")
        if after_each is not None:
            after_each(summarize(cells, clean_result["clean_acc"], count, severities))
    return summarize(cells, clean_result["clean_acc"], count, severities)


def _spectrum(images: np.ndarray, clean: np.ndarray) -> Dict[str, float]:
    energy = sum(spectra.perturbation_energy(images[i:i + CHUNK].astype(np.float32) / 255.0 -
                                              clean[i:i + CHUNK].astype(np.float32) / 255.0)
                 for i in range(0, len(images), CHUNK))
    return spectra.spectrum_summary(np.asarray(energy))


def summarize(cells: Dict[str, Dict[str, Dict[str, float]]], clean_acc: float, count: int,
              severities: Sequence[int]) -> Dict[str, Any]:
    """The report entry: every cell, the standard and extra means, the frequency groups."""
    def mean_of(names: List[str]) -> Optional[float]:
        values = [cell["accuracy"] for name in names for cell in cells[name].values()]
        return float(np.mean(values)) if values else None

    standard = [name for name in cells if name in corruptions.STANDARD]
    extra = [name for name in cells if name in corruptions.EXTRA]
    radius = {name: float(np.mean([cell["mean_radius"] for cell in cells[name].values()]))
              for name in cells}
    ordered = sorted(cells, key=radius.get)
    half = len(ordered) // 2
    groups = ({"low": ordered[:half], "high": ordered[half:]} if len(ordered) >= 2 else {})
    mean_standard = mean_of(standard)
    return {"clean_acc": clean_acc,
            "robust_acc": mean_standard if mean_standard is not None else mean_of(extra),
            "examples_per_cell": count, "severities": list(severities),
            "mean_standard": mean_standard, "mean_extra": mean_of(extra),
            "complete_benchmark": (set(standard) == set(corruptions.STANDARD) and
                                   list(severities) == list(corruptions.SEVERITIES)),
            "frequency_groups": {group: {"corruptions": members, "accuracy": mean_of(members),
                                         "mean_radius": float(np.mean([radius[m]
                                                                       for m in members]))}
                                 for group, members in groups.items()},
            "cells": cells}
