"""TensorBoard event files of a training run (through tensorboardX: no TensorFlow needed).

    tensorboard --logdir runs/r18/tensorboard

Scalars: train/{loss, clean_acc, adv_acc, lr, cutoff_progress, images_per_second} per step,
validation/{clean_acc, robust_acc} per epoch, test/* at the end; histograms: alpha/<module>,
each FPCM module's alpha on validation images per epoch. `config.logging.tensorboard=False`
turns them off. Only the main process writes.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from fpcm_jax import parallel

DIRECTORY = "tensorboard"


class Board:
    def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
        """A resumed run (start_step > 0) drops the events logged past its checkpoint, as
        metrics.jsonl does."""
        self.writer: Optional[object] = None
        if enabled and parallel.is_main_process():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, DIRECTORY), flush_secs=30,
                                        purge_step=start_step or None)

    def scalars(self, section: str, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{section}/{name}", float(value), step)

    def histograms(self, section: str, step: int, values: Dict[str, np.ndarray]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_histogram(f"{section}/{name}", np.asarray(value).ravel(), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
