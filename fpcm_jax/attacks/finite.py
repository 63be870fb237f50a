"""Non-finite values stop an evaluation: NaN or infinity in an adversarial example or in a
model's logits makes every figure from them meaningless (`argmax` of a NaN row is class 0, and
NaN passes every `>` or `<` check), so each evaluation path checks its examples and logits and
raises one `NonFiniteError` that names where, how many points and the first one.

    bad = nonfinite_points(logits)                 # bool per point, inside or outside jit
    check_finite("pgd20", "adversarial examples", x_adv, indices)
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np


class NonFiniteError(ValueError):
    """Adversarial examples or logits hold NaN or infinity: no figure from them is trusted."""


def nonfinite_points(values) -> jnp.ndarray:
    """(N,) bool: whether point i of values (N, ...) holds any NaN or infinity."""
    return ~jnp.isfinite(values).reshape(values.shape[0], -1).all(axis=1)


def nonfinite_error(where: str, what: str, count: int, first: int) -> NonFiniteError:
    """The one-line error for `count` points whose `what` is not finite, the first at index
    `first` of the evaluated examples."""
    return NonFiniteError(
        f"{where}: {count} point(s) with non-finite {what} (NaN or infinity; first: index "
        f"{first}). No figure from them can be trusted, so none was reported: the model is "
        f"numerically unstable there (check it on such inputs), or this is a bug in the attack.")


def check_finite(where: str, what: str, values, indices: Optional[np.ndarray] = None) -> None:
    """Raise `nonfinite_error` if any point of values (N, ...) is not finite; indices (N,) name
    the points in the evaluated set (default 0..N-1)."""
    values = np.asarray(values)
    if not len(values):
        return
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if len(bad):
        first = int(bad[0] if indices is None else np.asarray(indices)[bad[0]])
        raise nonfinite_error(where, what, len(bad), first)
