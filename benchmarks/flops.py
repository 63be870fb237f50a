"""FLOPs of a JAX function counted from its jaxpr: the same figure on every backend.

XLA's cost analysis counts a loop body once and returned 0 on GPU (JAX 0.11.2), so the
benchmarks count from the program itself: 2 x multiply-adds of every convolution and matrix
product (what tensor cores run; zeros inserted by a strided convolution's gradient are not
counted; checked: 1.11 GFLOP per 32x32 image for a ResNet-18 forward, the textbook figure), plus 2.5 N log2 N per real FFT of length N (the usual
estimate, half the complex FFT's 5 N log2 N). `scan` bodies (also `lax.fori_loop` with fixed
bounds) count `length` times; a `while_loop` body, whose trip count is unknown, counts once and
is reported. Elementwise work is not counted.

    flops = count_flops(jax.jit(step), state, batch, key)   # {'matmul': ..., 'fft': ..., ...}
"""

from __future__ import annotations

import math
from typing import Any, Dict

import jax
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr has no public home
from jax.extend import core


def count_flops(fn, *args, **kwargs) -> Dict[str, Any]:
    """{'matmul': FLOPs of convolutions and dot products, 'fft': FFT estimate, 'total',
    'while_loops': how many while loops were counted once}."""
    totals = {"matmul": 0.0, "fft": 0.0, "while_loops": 0}
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))  # what XLA would drop
    _count(jaxpr, 1.0, totals)
    totals["total"] = totals["matmul"] + totals["fft"]
    return totals


def _size(aval) -> float:
    return float(math.prod(aval.shape))


def _count(jaxpr: core.Jaxpr, times: float, totals: Dict[str, Any]) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            per_output = _size(rhs) / rhs.shape[out_feature_dim]  # in-features x window
            # A strided conv's input gradient dilates its input with zeros: count real taps.
            per_output /= math.prod(eqn.params.get("lhs_dilation") or (1,))
            totals["matmul"] += times * 2.0 * _size(out) * per_output
        elif name == "dot_general":
            lhs = eqn.invars[0].aval
            (contracting, _), _ = eqn.params["dimension_numbers"]
            depth = math.prod(lhs.shape[d] for d in contracting)
            totals["matmul"] += times * 2.0 * _size(out) * depth
        elif name == "fft":
            lengths = eqn.params["fft_lengths"]
            n = float(math.prod(lengths))
            transforms = _size(eqn.invars[0].aval) / max(
                math.prod(eqn.invars[0].aval.shape[-len(lengths):]), 1)
            totals["fft"] += times * transforms * 2.5 * n * math.log2(max(n, 2.0))
        multiplier = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        if name == "while":
            totals["while_loops"] += 1
        subs = [value for value in eqn.params.values()
                if isinstance(value, (core.Jaxpr, core.ClosedJaxpr))]
        subs += [item for value in eqn.params.values() if isinstance(value, (tuple, list))
                 for item in value if isinstance(item, (core.Jaxpr, core.ClosedJaxpr))]
        if name == "cond":  # one branch runs: count the most expensive
            best = None
            for branch in subs:
                trial = {"matmul": 0.0, "fft": 0.0, "while_loops": 0}
                _count(_open(branch), times, trial)
                if best is None or trial["matmul"] + trial["fft"] > best["matmul"] + best["fft"]:
                    best = trial
            for key in best or {}:
                totals[key] += best[key]
            continue
        for sub in subs:
            _count(_open(sub), times * multiplier, totals)


def _open(jaxpr) -> core.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
