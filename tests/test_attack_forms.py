"""What makes the attacks fast on CPU leaves their results alone (issue 30).

- `conv_layout.canonical_convs`: every convolution reads its kernel in the canonical layout,
  with the same values and gradients as plain JAX, for any dimension numbers, strides,
  dilations and feature groups, also inside a jitted call; compiled, an APGD loop then has no
  convolution left in the slow `01oi` kernel layout (without the rewrite it has).
- AutoAttack's fitted batches: the last batch of a stage is padded only to a power of two that
  fits it, and the flags and examples are the same as with every batch padded to batch_size.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import needs_four_devices
from fpcm_jax import attacks
from fpcm_jax.attacks.conv_layout import canonical_convs, input_gradient

autoattack_module = importlib.import_module("fpcm_jax.attacks.autoattack")
apgd_module = importlib.import_module("fpcm_jax.attacks.apgd")

# (input layout, kernel layout, strides, lhs dilation, rhs dilation, feature groups)
CONVS = [("NHWC", "HWIO", (1, 1), (1, 1), (1, 1), 1),
         ("NHWC", "HWIO", (2, 2), (1, 1), (1, 1), 1),
         ("NCHW", "OIHW", (1, 2), (1, 1), (2, 1), 1),
         ("NHWC", "OHWI", (1, 1), (2, 2), (1, 1), 1),
         ("NHWC", "HWIO", (1, 1), (1, 1), (1, 1), 2)]


def conv_net(spec):
    """logits(params, x) of two convolutions in the given layout, then a dense layer."""
    lhs, rhs, strides, lhs_dilation, rhs_dilation, groups = spec
    numbers = (lhs, rhs, lhs)

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, [(1, 1), (1, 1)], lhs_dilation,
                                        rhs_dilation,
                                        dimension_numbers=numbers, feature_group_count=groups)

    def logits(params, x):
        if lhs == "NCHW":
            x = jnp.transpose(x, (0, 3, 1, 2))
        h = jnp.tanh(conv(x, params["k1"]))
        h = jnp.tanh(conv(h, params["k2"]))
        return h.reshape(h.shape[0], -1) @ params["w"]

    def kernel(key, cin, cout):
        shape = {"H": 3, "W": 3, "I": cin // groups, "O": cout}
        return jax.random.normal(key, tuple(shape[c] for c in rhs)) * 0.3

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.uniform(keys[0], (3, 16, 16, 4))
    params = {"k1": kernel(keys[1], 4, 6), "k2": kernel(keys[2], 6, 4)}
    inputs = jnp.transpose(x, (0, 3, 1, 2)) if lhs == "NCHW" else x
    flat = jax.eval_shape(lambda: conv(conv(inputs, params["k1"]), params["k2"]))
    params["w"] = jax.random.normal(keys[3], (int(np.prod(flat.shape[1:])), 5)) * 0.1
    return logits, params, x


def kernel_specs(jaxpr):
    """The kernel specs (rhs_spec) of every convolution in a jaxpr, nested calls included."""
    specs = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            specs.append(tuple(eqn.params["dimension_numbers"].rhs_spec))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                specs += kernel_specs(inner)
    return specs


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(map(str, s)))
def test_canonical_convs_keep_values_and_gradients(spec):
    logits, params, x = conv_net(spec)
    loss = lambda z: jnp.sum(jnp.sin(logits(params, z)))
    plain = jax.jit(jax.grad(loss))(x)
    rewritten = jax.jit(canonical_convs(jax.grad(loss)))(x)
    np.testing.assert_allclose(rewritten, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(canonical_convs(logits))(params, x),
                               jax.jit(logits)(params, x), rtol=1e-5, atol=1e-6)
    before = kernel_specs(jax.make_jaxpr(jax.grad(loss))(x).jaxpr)
    after = kernel_specs(jax.make_jaxpr(canonical_convs(jax.grad(loss)))(x).jaxpr)
    assert len(after) == len(before) == 4  # two convolutions forward, two input gradients
    assert any(s != (3, 2, 0, 1) for s in before)  # JAX's input gradient: not canonical
    assert all(s == (3, 2, 0, 1) for s in after), after


def test_canonical_convs_reach_into_jitted_calls_and_keep_pytrees():
    logits, params, x = conv_net(CONVS[1])
    inner = jax.jit(logits)
    fn = lambda p, z: {"logits": inner(p, z), "mean": jnp.mean(z)}
    grad = lambda z: jax.grad(lambda u: jnp.sum(fn(params, u)["logits"] ** 2))(z)
    after = kernel_specs(jax.make_jaxpr(canonical_convs(grad))(x).jaxpr)
    assert after and all(s == (3, 2, 0, 1) for s in after)
    np.testing.assert_allclose(jax.jit(canonical_convs(grad))(x), jax.jit(grad)(x),
                               rtol=1e-5, atol=1e-6)
    out = canonical_convs(fn)(params, x)
    assert set(out) == {"logits", "mean"}


def compiled_conv_layouts(canonical):
    """The kernel layouts (dim_labels) of the convolutions XLA compiled for a 3-iteration APGD
    loop (lax.fori_loop) on a small conv net, with or without the rewrite. (With the weights
    baked in as constants XLA rewrites some convolutions into other layouts by itself.)"""
    logits, params, x = conv_net(CONVS[1])
    y = jnp.argmax(logits(params, x), axis=1)
    original = apgd_module.input_gradient
    apgd_module.input_gradient = lambda *a, **k: original(*a, **k, canonical=canonical)
    try:
        run = jax.jit(lambda p, z: apgd_module.apgd_stage(lambda u: logits(p, u), z, y,
                                                          jax.random.key(0), n_iter=3,
                                                          unroll=False))
        text = run.lower(params, x).compile().as_text()  # weights as arguments, as attacked
    finally:
        apgd_module.input_gradient = original
    assert "while" in text
    return re.findall(r"dim_labels=\w+_(\w+)->", text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution layouts")
def test_compiled_apgd_loop_has_only_canonical_kernels():
    with_rewrite, without = compiled_conv_layouts(True), compiled_conv_layouts(False)
    assert with_rewrite and set(with_rewrite) == {"01io"}, with_rewrite
    assert "01oi" in without  # the slow layout the rewrite removes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default on CPU")
def test_the_rewrite_is_on_by_default_on_cpu():
    """input_gradient without `canonical` (as every attack calls it) rewrites the kernels on
    CPU: the default, not only the explicit flag."""
    logits, params, x = conv_net(CONVS[1])
    loss = lambda z: jnp.sum(jnp.sin(logits(params, z)))
    default = kernel_specs(jax.make_jaxpr(input_gradient(loss))(x).jaxpr)
    assert len(default) == 4 and all(s == (3, 2, 0, 1) for s in default), default
    plain = kernel_specs(jax.make_jaxpr(input_gradient(loss, canonical=False))(x).jaxpr)
    assert any(s != (3, 2, 0, 1) for s in plain)


def test_input_gradient_is_jax_grad_elsewhere():
    loss = lambda z: (jnp.sum(z ** 3), z)
    grad, aux = input_gradient(loss, has_aux=True, canonical=False)(jnp.arange(3.0))
    np.testing.assert_allclose(grad, 3 * jnp.arange(3.0) ** 2)
    np.testing.assert_allclose(aux, jnp.arange(3.0))


@needs_four_devices
@pytest.mark.parametrize("counts, batch_size, size", [
    ((1, 2, 7, 8), 256, 8),          # at least FITTED_MIN_BATCH = 8: 4 devices x 2
    ((9, 12, 16), 256, 16),          # 4 x 4
    ((17, 32), 256, 32),
    ((33, 64), 256, 64),
    ((65, 100, 128), 256, 128),
    ((129, 255, 256), 256, 256),
    ((33, 40, 64), 96, 64),
    ((65, 80, 96), 96, 96),          # the batch size caps it (a multiple of 4, not 4 x 2^k)
    ((9, 12), 12, 12),
])
def test_fitted_sizes_are_powers_of_two_of_the_device_count(counts, batch_size, size):
    """The padded size of a stage's last batch of `count` points on the suite's 4 devices,
    written out: 4 times the smallest power of two holding max(count, 8), at most the batch."""
    for count in counts:
        assert autoattack_module.fitted_size(count, batch_size) == size, count


def test_fitted_batches_give_the_same_result_with_smaller_batches():
    """40 points in batches of 32: each stage's last batch is padded only to a fitted size,
    and every flag and example equals the run with every batch padded to 32."""
    rng = np.random.default_rng(5)
    weights = jnp.asarray(rng.normal(size=(6 * 6 * 3, 10)).astype(np.float32)) * 0.5
    shapes = []

    def logits_fn(inputs):
        shapes.append(inputs.shape[0])
        return inputs.reshape(inputs.shape[0], -1) @ weights

    x = rng.random((40, 6, 6, 3), dtype=np.float32)
    y = np.asarray(logits_fn(jnp.asarray(x))).argmax(1)
    y[:5] = (y[:5] + 1) % 10
    options = dict(eps=4 / 255, batch_size=32, n_iter=5, n_queries=30, n_target_classes=2)
    shapes.clear()
    fitted = attacks.autoattack(logits_fn, x, y, jax.random.key(0), **options)
    fitted_shapes = set(shapes)
    full = attacks.autoattack(logits_fn, x, y, jax.random.key(0), fitted_batches=False,
                              **options)
    assert min(fitted_shapes) < 32  # a last batch was padded less than to batch_size
    assert fitted["accuracy_after"]["apgd-ce"] < fitted["clean_accuracy"]  # points fell
    for name in attacks.STANDARD:
        np.testing.assert_array_equal(fitted["flags_after"][name], full["flags_after"][name])
    np.testing.assert_array_equal(fitted["x_adv"], full["x_adv"])
