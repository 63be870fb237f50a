"""Training batches streamed with Grain, for a training split read image by image
(`sources.LazyImages`) instead of held on the devices.

The order is `datasets.Batches`' own (a permutation per (seed, epoch), the last partial batch
dropped), so streaming and the in-memory path give the same images in the same order for the
same seed, and a resume at (epoch, position) continues with the same next batch. Each process
reads only the rows of each global batch that its devices hold; worker processes
(`data.workers`, 0: this process) decode the images, a few batches ahead (`data.prefetch`);
the batch is placed on the mesh as a global array, as the in-memory path places its gather.
Augmentation stays in the jitted step, the same for both paths.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fpcm_jax import parallel


class _ReadExample:
    """index -> (image, label) of a lazy split (picklable, for Grain's worker processes)."""

    def __init__(self, images, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __call__(self, index):
        return np.asarray(self.images[int(index)]), np.int32(self.labels[int(index)])


class StreamedBatches:
    """`datasets.Batches`' interface (steps_per_epoch, place, indices, gather) over a split
    whose images are read on demand; `order` is the in-memory Batches whose indices it
    follows."""

    def __init__(self, order, workers: int = 2, prefetch: int = 2):
        self.order, self.workers, self.prefetch = order, workers, prefetch
        self.steps_per_epoch = order.steps_per_epoch
        self.split = order.split
        self._stream: Optional[Tuple[int, int, Iterator]] = None  # (epoch, next position, it)

    def indices(self, epoch: int, position: int):
        return self.order.indices(epoch, position)

    def place(self, mesh) -> None:
        self._sharded = parallel.batch_sharded(mesh)
        self._repl = parallel.replicated(mesh)
        size = self.order.main_count
        local = self._sharded.addressable_devices_indices_map((size,))
        # The rows of each global batch that this process's devices hold, in batch order.
        self._rows = np.unique(np.concatenate([np.arange(size)[index] for index in
                                               local.values()]))
        self._vote = jax.jit(jnp.any, out_shardings=self._repl)

    def _iterator(self, epoch: int, position: int) -> Iterator:
        import grain

        wanted = np.concatenate([self.order.indices(epoch, step)[0][self._rows]
                                 for step in range(position, self.steps_per_epoch)])
        dataset = (grain.MapDataset.source(wanted)
                   .map(_ReadExample(self.split.images, self.split.labels))
                   .batch(len(self._rows)))
        stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                           prefetch_buffer_size=self.prefetch))
        if self.workers > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags: their
                flags.FLAGS.mark_as_parsed()  # defaults, when no program parsed them (the API)
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=self.prefetch))
        return iter(stream)

    def local_batch(self, epoch: int, position: int) -> Dict[str, np.ndarray]:
        """This process's rows of the batch at (epoch, position), as numpy."""
        if self._stream is None or self._stream[:2] != (epoch, position):
            self._stream = (epoch, position, self._iterator(epoch, position))
        images, labels = next(self._stream[2])
        self._stream = (epoch, position + 1, self._stream[2])
        return {"images": np.asarray(images, np.uint8), "labels": np.asarray(labels, np.int32)}

    def gather(self, epoch: int, position: int, votes: jax.Array) -> Tuple[Dict[str, Any],
                                                                           jax.Array]:
        local = self.local_batch(epoch, position)
        size = self.order.main_count
        where = {int(row): i for i, row in enumerate(self._rows)}
        batch = {key: jax.make_array_from_callback(
            (size, *values.shape[1:]), self._sharded,
            lambda index, values=values: values[[where[row] for row in
                                                 range(size)[index[0]]]])
            for key, values in local.items()}
        return batch, self._vote(votes)
