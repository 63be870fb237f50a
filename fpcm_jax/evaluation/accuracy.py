"""Clean and robust accuracy over a whole split: the jitted eval step and the batch loop.

Eval mode, final FPCM cutoff. The last batch is padded and masked, so every example counts
exactly once. A point counts as robust only if it is classified correctly both clean and under
the attack (AutoAttack's convention), so robust accuracy never exceeds clean accuracy. Used by
training (validation, the final test) and by `--mode eval` (`fpcm_jax.evaluation.evaluate`).
`check_perturbation` stops an evaluation whose adversarial examples left the eps-ball or [0, 1]
(`PerturbationError`); a NaN or infinite example or logit is an `attacks.NonFiniteError`.
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


# What an eval step checks for NaN or infinity, in the order of its `nonfinite` output.
CHECKED = ("logits on the clean images", "adversarial examples",
           "logits at the adversarial examples")


def make_eval_step(model: nn.Module, attack: Callable, mesh, norm: str = "linf") -> Callable:
    """jitted (variables, images uint8, labels, mask, key) -> (clean correct, robust correct,
    the largest perturbation in `norm`, the farthest any adversarial pixel lies outside
    [0, 1], nonfinite) over the batch's real examples; nonfinite (3, 2) holds, for each of
    CHECKED, how many points are not finite and the first one's index in the batch."""

    def eval_step(variables, images, labels, mask, key):
        x = datasets.to_float(images)
        logits_fn = lambda inputs: model.apply(variables, inputs, train=False, progress=1.0)
        clean_logits = logits_fn(x)
        clean_correct = (jnp.argmax(clean_logits, -1) == labels) & mask
        x_adv = attack(logits_fn, x, labels, key)
        adv_logits = logits_fn(x_adv)
        robust_correct = (jnp.argmax(adv_logits, -1) == labels) & clean_correct
        largest = jnp.max(jnp.where(mask, attacks.norms(x_adv - x, norm), 0.0))
        outside = jnp.maximum(-x_adv, x_adv - 1.0).reshape(x.shape[0], -1).max(axis=1)
        nonfinite = jnp.stack([_count_and_first(attacks.nonfinite_points(values) & mask)
                               for values in (clean_logits, x_adv, adv_logits)])
        return (clean_correct.sum(), robust_correct.sum(), largest,
                jnp.max(jnp.where(mask, outside, 0.0)), nonfinite)

    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(repl, sharded, sharded, sharded, repl),
                   out_shardings=(repl, repl, repl, repl, repl))


def _count_and_first(bad: jax.Array) -> jax.Array:
    """[how many of bad are True, the index of the first (len(bad) when none)]."""
    indices = jnp.arange(bad.shape[0])
    first = jnp.min(jnp.where(bad, indices, bad.shape[0]))
    return jnp.stack([bad.sum(), first]).astype(jnp.int32)


MAX_BATCHES_IN_FLIGHT = 8  # dispatched ahead of the results shown; bounds device memory


def evaluate_split(eval_step: Callable, variables: Any, split: datasets.Split, batch_size: int,
                   key: jax.Array, mesh, limit: Optional[int] = None,
                   progress: Optional[Callable[[int, int, int], None]] = None,
                   name: str = "evaluation") -> Dict[str, float]:
    """Clean and robust accuracy over the first `limit` (default all) examples of a split.

    Batches are dispatched without waiting for their results; `progress(done, clean, robust)`
    sees those that are ready, so the host never stalls the device between batches. A
    non-finite logit or adversarial example is an `attacks.NonFiniteError` naming `name`, the
    count of such points and the first one (after every batch has run).
    """
    parallel.check_batch_size(batch_size, "eval.batch_size")
    count = len(split) if limit is None else min(limit, len(split))
    sharded = parallel.batch_sharded(mesh)
    pending = collections.deque()  # (batch start, examples done, the step's outputs) on device
    totals = {"clean": 0, "robust": 0, "perturbation": 0.0, "outside": 0.0,
              "nonfinite": [[0, None] for _ in CHECKED]}

    def collect(keep: int) -> None:
        """Add finished batches in order; wait only while more than `keep` are pending."""
        while pending and (len(pending) > keep or pending[0][2].is_ready()):
            start, stop, clean, robust, perturbation, outside, nonfinite = pending.popleft()
            totals["clean"] += int(clean)
            totals["robust"] += int(robust)
            totals["perturbation"] = max(totals["perturbation"], float(perturbation))
            totals["outside"] = max(totals["outside"], float(outside))
            for seen, (bad, first) in zip(totals["nonfinite"], np.asarray(nonfinite)):
                seen[0] += int(bad)
                seen[1] = start + int(first) if bad and seen[1] is None else seen[1]
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
        pending.append((start, stop,
                        *eval_step(variables, *batch, jax.random.fold_in(key, batch_index))))
        collect(MAX_BATCHES_IN_FLIGHT)
    collect(0)
    for what, (bad, first) in zip(CHECKED, totals["nonfinite"]):
        if bad:
            raise attacks.nonfinite_error(name, what, bad, first)
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


class PerturbationError(ValueError):
    """An attack produced an adversarial example outside its threat model's ball or [0, 1]."""


def check_perturbation(name: str, settings: Dict[str, Any], largest: float,
                       outside_box: float) -> None:
    """A PerturbationError if an attack's examples left the eps-ball or [0, 1]."""
    eps, norm = settings["eps"], settings["norm"]
    if not largest <= attacks.ball_limit(eps):  # NaN fails this, not only a larger norm
        raise PerturbationError(
            f"{name} produced an adversarial example outside the {norm} ball (norm {largest:.6g} "
            f"> eps {eps:.6g}): its robust accuracy would be wrong; this is a bug in the attack, "
            f"no report was written.")
    if not outside_box <= 0:
        raise PerturbationError(
            f"{name} produced an adversarial example outside [0, 1] (by {outside_box:.3g}): "
            f"this is a bug in the attack, no report was written.")
