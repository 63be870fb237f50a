"""One writer for what a training run reports: console lines, `metrics.jsonl` and TensorBoard.

Only the main process writes. A resumed run (start_step > 0) drops the JSONL lines and the
TensorBoard events logged past the step it resumes from, since they are written again.
TensorBoard also gets the run's hyperparameters (its HPARAMS tab compares runs on them).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from fpcm_jax import parallel, progress
from fpcm_jax.files import append_json_line

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool, start_step: int = 0):
        self.main = parallel.is_main_process()
        self.path = os.path.join(workdir, METRICS_FILE)
        self.board: Optional[object] = None
        self._session_end = None  # the hparams summary that marks the run finished
        if not self.main:
            return
        self._drop_lines_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional until a run asks for it

            self.board = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30,
                                       purge_step=start_step or None)

    def _drop_lines_after(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as handle:
            kept = [line for line in handle if json.loads(line).get("step", 0) <= start_step]
        with open(self.path, "w") as handle:
            handle.writelines(kept)

    def record(self, record: Dict[str, Any]) -> None:
        """One line of metrics.jsonl."""
        if self.main:
            append_json_line(self.path, record)

    def scalars(self, section: str, step: int, values: Dict[str, float]) -> None:
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(f"{section}/{name}", float(value), step)

    def histograms(self, section: str, step: int, values: Dict[str, np.ndarray]) -> None:
        if self.board is not None:
            for name, value in values.items():
                self.board.add_histogram(f"{section}/{name}", np.asarray(value).ravel(), step)

    def hparams(self, values: Dict[str, Any], metric_tags: List[str]) -> None:
        """The run's hyperparameters for TensorBoard's HPARAMS tab, which compares runs on
        `metric_tags` (scalars this run logs). Written in the run's own event files, as
        TensorFlow's hparams API does (tensorboardX's add_hparams would make a separate run)."""
        if self.board is not None:
            from tensorboardX.summary import hparams

            experiment, session_start, self._session_end = hparams(values, dict.fromkeys(
                metric_tags, 0.0))
            writer = self.board._get_file_writer()  # no public call adds a ready summary
            writer.add_summary(experiment)
            writer.add_summary(session_start)

    def session_ended(self) -> None:
        """Mark the hparams session finished (the run completed)."""
        if self.board is not None and self._session_end is not None:
            self.board._get_file_writer().add_summary(self._session_end)

    def say(self, message: str) -> None:
        """A console line (through the progress bars, so they stay intact)."""
        if self.main:
            progress.say(message)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
