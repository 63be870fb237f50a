"""AutoAttack, standard version (Croce and Hein, 2020): APGD-CE, APGD-T, FAB-T, Square.

    result = autoattack(logits_fn, x, y, key, eps=8/255)              # L-inf
    result = autoattack(logits_fn, x, y, key, eps=0.5, norm="l2")      # L2
    result["robust_accuracy"], result["flags_after"]["apgd-t"], result["warnings"]

Each attack runs only on the points still robust after the attacks before it, and a point
counts as robust only if every attack fails on it. APGD-T and FAB-T run their 9 target classes
in turn, each again only on the points still robust. The points are gathered into batches of
`batch_size`, the last one padded (by repeating its points) to a power-of-two size that fits
it (`fitted_size`), so a stage compiles once per size and few padded copies are attacked when
few points are left robust. Random starts come from keys derived from each point's index: a
point meets the same randomness whatever batch it is in, and the same as when the attack runs
alone. Published parameters: APGD 100 iterations, rho 0.75, momentum 0.75, first step 2 eps;
APGD-T and FAB-T 9 targets, 100 iterations; Square 5,000 queries, p_init 0.8; the same four in
L2 (each with its L2 step, projection or, for Square, its L2 algorithm). The components and their stages come from
`registry`.

The reference implementation's sanity checks are reported as warnings: the output varies
between identical passes (randomness), the outputs look like probabilities, some points have
zero gradient at the start of APGD-T, and Square lowers the robust accuracy by more than 0.2
points below the white-box attacks. The result also holds the largest perturbation (in the
attack's norm) of the adversarial examples found, as the reference reports it.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fpcm_jax.attacks._common import ball_limit, check_norm, norms, target_ranks
from fpcm_jax.attacks.finite import check_finite, nonfinite_error
from fpcm_jax.attacks.registry import COMPONENTS, Attack, component

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


class _Call(NamedTuple):
    """What every stage of one `autoattack` call shares."""
    x: np.ndarray
    y: np.ndarray
    key: jax.Array
    params: Any
    apply: Callable  # apply(params, x) -> logits
    cache: Dict[Any, Callable]
    put: Callable[[np.ndarray], jax.Array]
    fetch: Callable[[jax.Array], np.ndarray]
    batch_size: int
    eps: float
    norm: str
    n_iter: int
    n_queries: int
    n_target_classes: int
    fitted_batches: bool
    on_batch: Optional[Callable[[str, int, int, int, int, int], None]]


def autoattack(logits_fn: Callable, x: Any, y: Any, key: jax.Array, eps: float = 8 / 255,
               params: Any = None, attacks_to_run=STANDARD, batch_size: int = 256,
               n_iter: int = 100, n_queries: int = 5000, n_target_classes: int = 9,
               put: Optional[Callable[[np.ndarray], jax.Array]] = None,
               fetch: Optional[Callable[[jax.Array], np.ndarray]] = None,
               progress: Optional[Callable[[str, float], None]] = None,
               on_batch: Optional[Callable[[str, int, int, int, int, int], None]] = None,
               norm: str = "linf", fitted_batches: bool = True) -> Dict[str, Any]:
    """Run AutoAttack over all of x (NHWC in [0, 1]) with labels y.

    logits_fn(x) -> logits, or logits_fn(params, x) when `params` is given (then the weights
    are an argument of the compiled attacks, not constants baked into them, and the compiled
    stages are kept for the next call with the same logits_fn).
    put(numpy batch) -> device array and fetch(device array) -> numpy place the batches and
    bring results back; the defaults use one device. For several devices or hosts, put shards
    the batch (`batch_size` a multiple of the device count) and fetch gathers it
    (`fpcm_jax.evaluation.evaluate` passes `parallel.global_array` and `parallel.fetch`).
    progress(component, robust accuracy) is called after each component; on_batch(component,
    stage, stages, points done, points in the stage, robust points now) when a stage starts
    (0 done) and after each of its batches.
    Returns clean and per-component robust flags and accuracies, x_adv, times and warnings.
    norm: the threat model, 'linf' (default) or 'l2'.
    fitted_batches: True (default) pads a stage's last batch only up to the next power-of-two
    multiple of the device count (at least FITTED_MIN_BATCH) instead of batch_size: when few
    points are left robust, far fewer padded copies are attacked, for a few more compiled
    shapes; the points, their randomness and their results are the same. False: every batch
    padded to batch_size, one compiled shape per stage.
    An unknown component name in `attacks_to_run` or an unknown norm is a ValueError before
    anything runs.
    """
    check_norm(norm)
    components = [(name, component(name)) for name in attacks_to_run]
    call = _Call(np.asarray(x, np.float32), np.asarray(y, np.int32), key, params,
                 (lambda p, inputs: logits_fn(inputs)) if params is None else logits_fn,
                 _stage_cache(logits_fn if params is not None else None),
                 put or jnp.asarray, fetch or np.asarray, batch_size, eps, norm, n_iter, n_queries,
                 n_target_classes, fitted_batches, on_batch)
    result, robust = _clean_pass(call)
    x_adv = call.x.copy()
    zero_grad_points = 0
    for name, entry in components:
        start_time = time.time()
        zero_grad_points += _run_component(call, name, entry, robust, x_adv)
        result["flags_after"][name] = robust.copy()
        result["accuracy_after"][name] = _fraction(robust)
        result["seconds"][name] = time.time() - start_time
        if progress is not None:
            progress(name, result["accuracy_after"][name])
    _finish(result, call, robust, x_adv, zero_grad_points)
    return result


def _fraction(flags: np.ndarray) -> float:
    return float(flags.mean()) if len(flags) else 0.0


# The smallest fitted batch: below it a compile costs more than the padded points it saves.
FITTED_MIN_BATCH = 8


def _batches(indices: np.ndarray, batch_size: int,
             fitted: bool = False) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(chosen, padded) per batch: the indices of the batch, and the same repeated to fill
    `batch_size`, or with `fitted` the last batch only to `fitted_size`."""
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        size = fitted_size(len(chosen), batch_size) if fitted else batch_size
        yield chosen, np.resize(chosen, size)


def fitted_size(count: int, batch_size: int) -> int:
    """The batch `count` points are padded to: the device count times the smallest power of two
    that holds max(count, FITTED_MIN_BATCH), at most batch_size (a multiple of the device
    count): a few shapes per stage, each compiled once."""
    devices = jax.device_count()
    shares = -(-max(count, FITTED_MIN_BATCH) // devices)
    return min(devices * (1 << (shares - 1).bit_length()), batch_size)


def _clean_pass(call: _Call) -> Tuple[Dict[str, Any], np.ndarray]:
    """The result's clean fields and output warnings, and the flags of the points classified
    correctly (the points the first component attacks)."""
    count = len(call.y)
    predict = _predict_fn(call)
    clean_logits = _logits_of(call, call.x)
    check_finite("AutoAttack's clean pass", "logits", clean_logits)
    robust = clean_logits.argmax(1) == call.y
    warnings = _output_warnings(lambda inputs: call.fetch(predict(call.params, inputs)),
                                call.put(call.x[np.resize(np.arange(count), call.batch_size)]),
                                clean_logits) if count else []
    result = {"examples": count, "eps": call.eps, "norm": call.norm, "clean_flags": robust.copy(),
              "clean_accuracy": _fraction(robust), "flags_after": {}, "accuracy_after": {},
              "seconds": {}, "warnings": warnings,
              "randomised": any(w.startswith(RANDOMISED) for w in warnings)}
    return result, robust


def _predict_fn(call: _Call) -> Callable:
    """The jitted logits of one batch: the one function every verdict comes from."""
    return call.cache.setdefault("predict", jax.jit(call.apply))


def _logits_of(call: _Call, images: np.ndarray) -> np.ndarray:
    """The logits of all `images`, in batches of `batch_size` (the last one padded)."""
    predict = _predict_fn(call)
    parts = [call.fetch(predict(call.params, call.put(images[padded])))[:len(chosen)]
             for chosen, padded in _batches(np.arange(len(images)), call.batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _run_component(call: _Call, name: str, entry: Attack, robust: np.ndarray,
                   x_adv: np.ndarray) -> int:
    """All stages of one component, each on the points still robust: updates robust and x_adv
    in place; returns the number of points with zero gradient at APGD-T's first stage."""
    stage_fn = functools.partial(entry.stage, eps=call.eps, n_iter=call.n_iter,
                                 n_queries=call.n_queries, norm=call.norm)
    run = call.cache.setdefault((name, call.eps, call.norm, call.n_iter, call.n_queries),
                                jax.jit(functools.partial(_run_stage, call.apply, stage_fn)))
    ranks = list(target_ranks(call.n_target_classes)) if entry.targeted else [0]
    zero_grad_points = 0
    component_key = jax.random.fold_in(call.key, COMPONENTS.index(name))
    for stage, target_rank in enumerate(ranks):
        stage_key = jax.random.fold_in(component_key, stage)
        zero = _run_stage_batches(call, run, (name, stage, len(ranks)), stage_key, target_rank,
                                  robust, x_adv)
        zero_grad_points += zero if name == "apgd-t" and stage == 0 else 0
    return zero_grad_points


def _run_stage_batches(call: _Call, run: Callable, where: Tuple[str, int, int],
                       stage_key: jax.Array, target_rank: int, robust: np.ndarray,
                       x_adv: np.ndarray) -> int:
    """One stage over the points still robust, batch by batch: updates robust and x_adv in
    place; returns how many attacked points had zero gradient. where = (component, stage,
    stages) heads each on_batch report."""
    attacked = np.flatnonzero(robust)
    if call.on_batch is not None:  # the stage starts (its first batch also compiles it)
        call.on_batch(*where, 0, len(attacked), int(robust.sum()))
    zero_grad_points, nonfinite = 0, {}  # what -> indices of points not finite
    for chosen, padded in _batches(attacked, call.batch_size, call.fitted_batches):
        adv_batch, _, zero = run(call.params, call.put(call.x[padded]), call.put(call.y[padded]),
                                 call.put(padded.astype(np.int32)),
                                 np.asarray(jax.random.key_data(stage_key)),
                                 np.int32(target_rank))
        # As the reference: the returned examples are classified again, and only that decides
        # (never the flags the attack computed inside its loop).
        adv = call.fetch(adv_batch)[:len(chosen)]
        logits = call.fetch(_predict_fn(call)(call.params, adv_batch))[:len(chosen)]
        finite = _note_nonfinite(nonfinite, chosen, adv, logits)
        misclassified = (logits.argmax(1) != call.y[chosen]) & finite
        fooled = chosen[misclassified]
        x_adv[fooled] = adv[misclassified]
        robust[fooled] = False
        zero_grad_points += int(call.fetch(zero)[:len(chosen)].sum())
        if call.on_batch is not None:
            done = int(np.searchsorted(attacked, chosen[-1])) + 1
            call.on_batch(*where, done, len(attacked), int(robust.sum()))
    for what, points in nonfinite.items():
        raise nonfinite_error(f"AutoAttack's {where[0]}", what, len(points), int(min(points)))
    return zero_grad_points


def _note_nonfinite(nonfinite: Dict[str, List[int]], chosen: np.ndarray, adv: np.ndarray,
                    logits: np.ndarray) -> np.ndarray:
    """Record the points of a batch whose example or logits are not finite (by what); the
    flags of the finite ones."""
    finite = np.ones(len(chosen), bool)
    for what, values in (("adversarial examples", adv),
                         ("logits at its adversarial examples", logits)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            nonfinite.setdefault(what, []).extend(chosen[bad].tolist())
        finite &= ~bad
    return finite


def _finish(result: Dict[str, Any], call: _Call, robust: np.ndarray, x_adv: np.ndarray,
            zero_grad_points: int) -> None:
    """The final robust flags, x_adv and the warnings that need every component."""
    if zero_grad_points:
        result["warnings"].append(
            f"{zero_grad_points} points have zero gradient at the start of APGD-T: "
            f"gradient-based attacks may be unreliable for this model (gradient masking?).")
    _square_warning(result)
    result["robust_flags"] = robust
    result["robust_accuracy"] = _fraction(robust)
    result["x_adv"] = x_adv
    result["max_perturbation"] = (float(np.max(norms(x_adv - call.x, call.norm)))
                                  if len(call.x) else 0.0)
    result["consistency"] = check_consistency(call, result)


class ConsistencyError(ValueError):
    """AutoAttack's flags, x_adv and the model disagree: no figure of the run can be trusted."""


def check_consistency(call: _Call, result: Dict[str, Any]) -> Dict[str, Any]:
    """Classify every returned example once more and check what the result claims: a robust
    point is classified correctly clean and at its x_adv (which is then x itself); a point
    counted fooled is misclassified at its x_adv; a point misclassified clean is not robust;
    every x_adv lies in the eps-ball around x and in [0, 1]. Returns what was checked; a
    `ConsistencyError` names the first disagreement. For a model whose output varies between
    identical passes (result["randomised"]) a second classification may differ: those
    disagreements are counted in the returned dict instead; the ball and the box still raise."""
    clean, robust, x_adv = result["clean_flags"], result["robust_flags"], result["x_adv"]
    logits_at_adv = _logits_of(call, x_adv)
    check_finite("AutoAttack's final re-classification", "logits", logits_at_adv)
    correct_at_adv = logits_at_adv.argmax(1) == call.y
    verdicts = [(robust & ~clean, "counted robust but misclassified clean"),
                (robust & ~correct_at_adv, "counted robust but misclassified at its x_adv"),
                (clean & ~robust & correct_at_adv,
                 "counted fooled but classified correctly at its x_adv")]
    distances = np.asarray(norms(x_adv - call.x, call.norm)) if len(x_adv) else np.zeros(0)
    # Written so that NaN fails: a NaN distance or pixel is never inside the ball or the box.
    geometry = [(~(distances <= ball_limit(call.eps)),
                 f"x_adv outside the {call.norm} ball of radius {call.eps:.6g}"),
                (~((x_adv >= 0) & (x_adv <= 1)).reshape(len(x_adv), -1).all(1),
                 "x_adv outside [0, 1]")]
    randomised = result.get("randomised", False)
    for flags, what in geometry + ([] if randomised else verdicts):
        if np.any(flags):
            points = np.flatnonzero(flags)
            raise ConsistencyError(
                f"AutoAttack's result is inconsistent: {len(points)} point(s) {what} (first: "
                f"index {points[0]}); its robust accuracy cannot be trusted. This is a bug in "
                f"the attack or a model whose output changes between identical calls.")
    checked = {"reclassified": int(len(x_adv)), "robust_at_x_adv": int(np.sum(robust)),
               "fooled_at_x_adv": int(np.sum(clean & ~robust)), "inside_ball_and_box": True}
    if randomised:
        checked["randomised_model_disagreements"] = int(np.sum(
            verdicts[0][0] | verdicts[1][0] | verdicts[2][0]))
    return checked


# Compiled stages per logits_fn(params, x): the weights are arguments, so a second evaluation
# with the same function compiles nothing; entries go when the function does.
_STAGE_CACHES: "weakref.WeakKeyDictionary[Callable, Dict[Any, Callable]]" = (
    weakref.WeakKeyDictionary())


def _stage_cache(logits_fn: Optional[Callable]) -> Dict[Any, Callable]:
    """The cache of compiled stages for logits_fn, or a fresh one (logits_fn None: its weights
    would be constants baked into the executables, so they are not kept past the call)."""
    if logits_fn is None:
        return {}
    try:
        return _STAGE_CACHES.setdefault(logits_fn, {})
    except TypeError:  # not weak-referenceable
        return {}


def _run_stage(apply, stage, params, x, y, indices, shared_key_data, target_rank):
    # The key comes as numpy data: host values are accepted as replicated on any mesh.
    shared_key = jax.random.wrap_key_data(shared_key_data)
    keys = jax.vmap(lambda i: jax.random.fold_in(shared_key, i))(indices)  # one per point
    return stage(lambda inputs: apply(params, inputs), x, y, keys, shared_key, target_rank)


RANDOMISED = "The model's output varies between identical passes"


def _output_warnings(predict, x_batch, clean_logits) -> List[str]:
    """The reference sanity checks on the model's outputs (predict(x) -> numpy logits)."""
    warnings = []
    passes = [predict(x_batch) for _ in range(5)]
    unit = [p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-10) for p in passes]
    differs = any(np.any(p.argmax(1) != passes[0].argmax(1)) for p in passes)
    max_diff = max(float(np.linalg.norm(a - b, axis=1).max()) for a in unit for b in unit)
    if differs or max_diff > 1e-4:
        warnings.append(RANDOMISED + ": it looks "
                        "randomised, and AutoAttack's standard version does not evaluate "
                        "randomised defences reliably (use expectation over transformation).")
    if (clean_logits.max() < 1 + 1e-5 and clean_logits.min() > -1e-5 and
            np.all(np.abs(clean_logits.sum(1) - 1) < 1e-5)):
        warnings.append("The outputs look like probabilities: pass logits to the attacks "
                        "(softmax outputs weaken the gradients of the CE and DLR losses).")
    return warnings


def _square_warning(result: Dict[str, Any]) -> None:
    accuracy = result["accuracy_after"]
    if "square" in accuracy and len(accuracy) > 1:
        white_box = min(v for k, v in accuracy.items() if k != "square")
        if accuracy["square"] < white_box - 0.002:
            result["warnings"].append(
                f"Square Attack lowered the robust accuracy by "
                f"{100 * (white_box - accuracy['square']):.2f} points below the white-box "
                f"attacks: the gradient-based evaluation may be unreliable (gradient masking).")
