"""Convolutions in the kernel layout XLA:CPU runs fast, also inside loops.

    grad_fn = input_gradient(loss_fn, has_aux=True)   # jax.grad(loss_fn, has_aux=True), faster

The input gradient of a convolution is a convolution of the output gradient with the reversed
kernel, its input and output feature axes swapped (JAX's transpose rule writes it with the
kernel spec `01oi`). XLA:CPU runs convolutions through its fast Eigen kernels only in the
canonical layout (`b01f` input, `01io` kernel); a pass rewrites the others with a transposed
kernel, but it visits only the program's top level. Inside a `lax.fori_loop` (APGD, FAB, PGD in
loop form) the backward convolutions stay `01oi` and run on a generic loop, which made one
APGD iteration of a WRN-16-2 + FPCM at batch 32 cost 790 ms against 168 ms with the kernel
transposed (benchmarks/README.md, issue 30).

`canonical_convs(fn)` traces fn and transposes every convolution's kernel into the canonical
layout itself (a transpose of a small kernel, then the same convolution), so the loop body needs
no rewrite. The values are the same function's: only the layout the kernel is read in changes,
as XLA's own pass does at the top level. `input_gradient` applies it on CPU only (GPU and TPU
compilers choose their own convolution layouts); `canonical=True/False` forces it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence

import jax
from jax import lax
from jax.extend import core

# Call primitives whose body is inlined, so the convolutions inside are rewritten too.
_INLINED_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


def input_gradient(fun: Callable, has_aux: bool = False,
                   canonical: Optional[bool] = None) -> Callable:
    """jax.grad(fun, has_aux=has_aux) whose convolutions read their kernels in the canonical
    layout (`canonical_convs`); canonical None: only on CPU."""
    grad_fn = jax.grad(fun, has_aux=has_aux)
    if canonical is None:
        canonical = jax.default_backend() == "cpu"
    return canonical_convs(grad_fn) if canonical else grad_fn


def canonical_convs(fn: Callable) -> Callable:
    """fn(*args) with every convolution's kernel transposed into the `01io` layout (spatial
    axes, input features, output features) before the convolution: the same values."""

    @functools.wraps(fn)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outputs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)

    return rewritten


def _evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> List[Any]:
    """The jaxpr's outputs, each convolution bound in the canonical kernel layout."""
    env = {}

    def read(var):
        return var.val if isinstance(var, core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        body = eqn.params.get(_INLINED_CALLS.get(eqn.primitive.name, ""))
        if eqn.primitive is lax.conv_general_dilated_p:
            outputs = [_canonical_conv(*inputs, **eqn.params)]
        elif isinstance(body, core.ClosedJaxpr):
            outputs = _evaluate(body.jaxpr, body.consts, inputs)
        else:
            with eqn.ctx.manager:
                outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(var) for var in jaxpr.outvars]


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """The convolution with its kernel transposed to (spatial..., in, out) first."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    rank = len(rhs_spec)
    # rhs_spec = (output feature axis, input feature axis, spatial axes...) of the kernel.
    order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    canonical_spec = (rank - 1, rank - 2, *range(rank - 2))
    if tuple(rhs_spec) != canonical_spec:
        rhs = lax.transpose(rhs, order)
        dimension_numbers = lax.ConvDimensionNumbers(lhs_spec, canonical_spec, out_spec)
    return lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers,
                                           **params)
