"""Clean and robust accuracy over a whole split: the jitted eval step and the batch loop.

Eval mode, final FPCM cutoff. The last batch is padded and masked, so every example counts
exactly once. A point counts as robust only if it is classified correctly both clean and under
the attack (AutoAttack's convention), so robust accuracy never exceeds clean accuracy. Used by
training (validation, the final test) and by `--mode eval` (`fpcm_jax.evaluation.evaluate`).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fpcm_jax import attacks, parallel
from fpcm_jax.data import datasets


def make_eval_step(model: nn.Module, attack: Callable, mesh, norm: str = "linf") -> Callable:
    """jitted (variables, images uint8, labels, mask, key) -> (clean correct, robust correct,
    the largest perturbation in `norm`, the farthest any adversarial pixel lies outside
    [0, 1]) over the batch's real examples."""

    def eval_step(variables, images, labels, mask, key):
        x = datasets.to_float(images)
        logits_fn = lambda inputs: model.apply(variables, inputs, train=False, progress=1.0)
        clean_correct = (jnp.argmax(logits_fn(x), -1) == labels) & mask
        x_adv = attack(logits_fn, x, labels, key)
        robust_correct = (jnp.argmax(logits_fn(x_adv), -1) == labels) & clean_correct
        largest = jnp.max(jnp.where(mask, attacks.norms(x_adv - x, norm), 0.0))
        outside = jnp.maximum(-x_adv, x_adv - 1.0).reshape(x.shape[0], -1).max(axis=1)
        return (clean_correct.sum(), robust_correct.sum(), largest,
                jnp.max(jnp.where(mask, outside, 0.0)))

    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(repl, sharded, sharded, sharded, repl),
                   out_shardings=(repl, repl, repl, repl))


MAX_BATCHES_IN_FLIGHT = 8  # dispatched ahead of the results shown; bounds device memory


def evaluate_split(eval_step: Callable, variables: Any, split: datasets.Split, batch_size: int,
                   key: jax.Array, mesh, limit: Optional[int] = None,
                   progress: Optional[Callable[[int, int, int], None]] = None) -> Dict[str, float]:
    """Clean and robust accuracy over the first `limit` (default all) examples of a split.

    Batches are dispatched without waiting for their results; `progress(done, clean, robust)`
    sees those that are ready, so the host never stalls the device between batches.
    """
    parallel.check_batch_size(batch_size, "eval.batch_size")
    count = len(split) if limit is None else min(limit, len(split))
    sharded = parallel.batch_sharded(mesh)
    pending = collections.deque()  # (examples done, the eval step's outputs) on device
    totals = {"clean": 0, "robust": 0, "perturbation": 0.0, "outside": 0.0}

    def collect(keep: int) -> None:
        """Add finished batches in order; wait only while more than `keep` are pending."""
        while pending and (len(pending) > keep or pending[0][1].is_ready()):
            stop, clean, robust, perturbation, outside = pending.popleft()
            totals["clean"] += int(clean)
            totals["robust"] += int(robust)
            totals["perturbation"] = max(totals["perturbation"], float(perturbation))
            totals["outside"] = max(totals["outside"], float(outside))
            if progress is not None:
                progress(stop, totals["clean"], totals["robust"])

    start_time = time.time()
    for batch_index, start in enumerate(range(0, count, batch_size)):
        stop = min(start + batch_size, count)
        pad = batch_size - (stop - start)
        images = np.pad(split.images[start:stop], ((0, pad), (0, 0), (0, 0), (0, 0)))
        labels = np.pad(split.labels[start:stop], (0, pad))
        mask = np.arange(batch_size) < stop - start
        batch = [parallel.global_array(a, sharded) for a in (images, labels, mask)]
        pending.append((stop, *eval_step(variables, *batch, jax.random.fold_in(key, batch_index))))
        collect(MAX_BATCHES_IN_FLIGHT)
    collect(0)
    seconds = time.time() - start_time
    return {"examples": count, "clean_acc": totals["clean"] / max(count, 1),
            "robust_acc": totals["robust"] / max(count, 1), "seconds": seconds,
            "max_perturbation": totals["perturbation"], "max_outside_box": totals["outside"]}


def pgd_eval_step(model: nn.Module, mesh, steps: int, eps: float = 8 / 255,
                  step_size: float = 2 / 255, norm: str = "linf") -> Callable:
    """The eval step for clean accuracy plus PGD-`steps` in `norm` (clean only when
    steps == 0)."""
    name = f"pgd{steps}" if steps else "none"
    attack = attacks.get(name, **attacks.options_for(name, eps, step_size, norm))
    return make_eval_step(model, attack, mesh, norm)
