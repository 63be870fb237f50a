"""FPCM against a direct NumPy evaluation of the SPEC equations, and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fpcm_jax import layers
from fpcm_jax.layers import FPCM, NNXFPCM


def numpy_fpcm(x, fraction, project):
    """SPEC section 1 as the official code computes it: complex FFT over tokens AND channels."""
    batch, height, width, channels = x.shape
    num_tokens = height * width
    tokens = x.reshape(batch, num_tokens, channels).astype(np.float64)
    k = np.arange(num_tokens)
    d0 = fraction * num_tokens
    gain = np.exp(-np.minimum(k, num_tokens - k) ** 2 / (2 * d0 ** 2))
    spectrum = np.fft.fft(np.fft.fft(tokens, axis=2), axis=1)
    low = np.fft.ifft(np.fft.ifft(spectrum * gain[None, :, None], axis=1), axis=2).real
    alpha = 0.5 + 0.5 / (1 + np.exp(-project(tokens.mean(axis=1))))
    out = alpha[:, None, :] * low + (1 - alpha[:, None, :]) * (tokens - low)
    return out.reshape(x.shape), alpha


def random_input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("generator", ["depthwise", "dense"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (3, 4, 6, 5), (2, 5, 3, 4)])
@pytest.mark.parametrize("progress", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("impl", ["fft", "matmul"])
def test_fpcm_matches_numpy_spec(generator, shape, progress, impl):
    x = random_input(shape)
    module = FPCM(weight_generator=generator, lowpass_impl=impl)
    variables = module.init(jax.random.key(1), x)
    with jax.default_matmul_precision("highest"):  # a float64 reference: no TF32 on GPUs
        out, state = module.apply(variables, x, progress=progress, mutable=["intermediates"])
    proj = variables["params"]["projection"]
    if generator == "dense":
        project = lambda pooled: pooled @ np.asarray(proj["kernel"], np.float64) + proj["bias"]
    else:
        project = lambda pooled: pooled * np.asarray(proj["kernel"], np.float64) + proj["bias"]
    fraction = 0.5 + (0.125 - 0.5) * progress
    expected, expected_alpha = numpy_fpcm(x, fraction, project)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state["intermediates"]["alpha"][0], expected_alpha, atol=1e-6)


def autodiff_token_lowpass(x, fraction):
    """The FFT filter without the custom VJP: JAX differentiates rfft/irfft itself."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    gain = layers.token_gaussian_filter(height * width, fraction)[None, :, None]
    low = jnp.fft.irfft(jnp.fft.rfft(tokens, axis=1) * gain, n=height * width, axis=1)
    return low.reshape(x.shape)


@pytest.mark.parametrize("impl", ["fft", "matmul", "auto"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 16, 32, 2), (2, 5, 3, 4)])
def test_lowpass_implementations_agree_in_value_and_gradient(impl, shape):
    x = jnp.asarray(random_input(shape))
    weights = jnp.asarray(random_input(shape, seed=1))
    np.testing.assert_allclose(layers.token_lowpass(x, 0.3, impl),
                               autodiff_token_lowpass(x, 0.3), atol=1e-5)
    loss = lambda fn: (lambda x: jnp.sum(weights * jnp.tanh(fn(x))))
    ours = jax.grad(loss(lambda x: layers.token_lowpass(x, 0.3, impl)))(x)
    reference = jax.grad(loss(lambda x: autodiff_token_lowpass(x, 0.3)))(x)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_auto_lowpass_uses_the_matmul_only_for_small_maps_on_cpu():
    assert layers.pick_lowpass_impl("auto", layers.MATMUL_MAX_TOKENS) == "matmul"
    assert layers.pick_lowpass_impl("auto", layers.MATMUL_MAX_TOKENS + 1) == "fft"
    assert layers.pick_lowpass_impl("fft", 16) == "fft"
    with pytest.raises(ValueError, match="lowpass implementation"):
        layers.token_lowpass(jnp.zeros((1, 4, 4, 2)), 0.5, "fast")


def test_official_filter_and_schedule():
    # The official code builds its filter from two linspaces and D0 = P/2 + (P/8 - P/2) e/120.
    for num_tokens, epoch in [(1024, 0), (256, 45), (16, 120), (64, 77)]:
        d0 = num_tokens // 2 + (num_tokens // 8 - num_tokens // 2) * (epoch / 120)
        left = np.exp(-0.5 * (np.linspace(0, num_tokens // 2 - 1, num_tokens // 2) / d0) ** 2)
        right = np.exp(-0.5 * (np.linspace(1, num_tokens // 2, num_tokens // 2) / d0) ** 2)[::-1]
        official = np.concatenate([left, right])
        fraction = layers.cutoff_fraction(epoch / 120)
        ours = layers.token_gaussian_filter(num_tokens, fraction)
        np.testing.assert_allclose(ours, official[: num_tokens // 2 + 1], rtol=1e-5, atol=1e-7)


def test_cutoff_schedule_is_clamped():
    np.testing.assert_allclose(layers.cutoff_fraction(0.0), 0.5)
    np.testing.assert_allclose(layers.cutoff_fraction(1.0), 0.125)
    np.testing.assert_allclose(layers.cutoff_fraction(0.5), 0.3125)
    np.testing.assert_allclose(layers.cutoff_fraction(1.4), 0.125)  # official: overshoots
    np.testing.assert_allclose(layers.cutoff_fraction(-1.0), 0.5)
    np.testing.assert_allclose(layers.cutoff_fraction(0.3, 0.125, 0.125), 0.125)


@pytest.mark.parametrize("generator", ["depthwise", "dense"])
def test_alpha_lies_strictly_between_half_and_one(generator):
    x = random_input((16, 8, 8, 32), seed=3) * 3.0
    module = FPCM(weight_generator=generator)
    variables = module.init(jax.random.key(0), x)
    _, state = module.apply(variables, x, mutable=["intermediates"])
    alpha = np.asarray(state["intermediates"]["alpha"][0])
    assert alpha.shape == (16, 32)
    assert np.all(alpha > 0.5) and np.all(alpha < 1.0)
    assert alpha.std() > 1e-3  # it really depends on the input and the projection


@pytest.mark.parametrize("generator", ["depthwise", "dense"])
def test_gradients_reach_input_and_projection(generator):
    x = jnp.asarray(random_input((2, 8, 8, 6)))
    weights = jnp.asarray(random_input((2, 8, 8, 6), seed=9))
    module = FPCM(weight_generator=generator)
    params = module.init(jax.random.key(0), x)["params"]
    loss = lambda p, inp: jnp.sum(module.apply({"params": p}, inp, progress=0.4) * weights)
    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    for leaf in jax.tree.leaves(grad_params) + [grad_x]:
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 1e-4


def test_new_progress_value_does_not_retrace():
    x = jnp.asarray(random_input((2, 8, 8, 4)))
    module = FPCM()
    variables = module.init(jax.random.key(0), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x, progress):
        return module.apply(variables, x, progress=progress)

    outputs = [forward(variables, x, jnp.float32(p)) for p in (0.0, 0.25, 0.5, 1.0)]
    assert not np.allclose(outputs[0], outputs[-1])  # the cutoff really changed


def test_spatial_variant_is_a_radial_low_pass():
    fraction = layers.cutoff_fraction(1.0)
    constant = jnp.full((1, 16, 16, 2), 0.7)
    np.testing.assert_allclose(layers.spatial_lowpass(constant, fraction), constant, atol=1e-6)
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    checker = ((-1.0) ** (rows + cols))[None, :, :, None].astype(np.float32)
    kept = layers.spatial_lowpass(jnp.asarray(checker), fraction)
    assert float(jnp.sum(kept ** 2)) < 1e-3 * float(np.sum(checker ** 2))
    # Radial: horizontal and vertical waves of one frequency are damped alike.
    horizontal = np.cos(2 * np.pi * 3 * cols / 16)[None, :, :, None].astype(np.float32)
    vertical = np.cos(2 * np.pi * 3 * rows / 16)[None, :, :, None].astype(np.float32)
    gain_h = float(jnp.sum(layers.spatial_lowpass(jnp.asarray(horizontal), 0.2) * horizontal))
    gain_v = float(jnp.sum(layers.spatial_lowpass(jnp.asarray(vertical), 0.2) * vertical))
    assert 0.05 < gain_h / np.sum(horizontal ** 2) < 0.95
    np.testing.assert_allclose(gain_h, gain_v, rtol=1e-5)


def test_token_variant_blurs_along_raster_order():
    # A vertical stripe pattern (changes along W, i.e. between neighbouring tokens) is damped
    # far more than a horizontal one (changes every W tokens), unlike the radial variant.
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    along_w = np.cos(np.pi * cols)[None, :, :, None].astype(np.float32)
    along_h = np.cos(np.pi * rows)[None, :, :, None].astype(np.float32)
    kept_w = float(jnp.sum(layers.token_lowpass(jnp.asarray(along_w), 0.125) ** 2))
    kept_h = float(jnp.sum(layers.token_lowpass(jnp.asarray(along_h), 0.125) ** 2))
    assert kept_w < 1e-3 * kept_h


def test_spatial_variant_in_module_runs_and_differs():
    x = random_input((2, 8, 8, 4))
    tokens, spatial = FPCM(), FPCM(variant="spatial")
    variables = tokens.init(jax.random.key(0), x)
    out_tokens = tokens.apply(variables, x)
    out_spatial = spatial.apply(variables, x)
    assert out_spatial.shape == x.shape and not np.allclose(out_tokens, out_spatial)


def test_bad_inputs_give_clear_errors():
    module = FPCM()
    with pytest.raises(ValueError, match="NHWC"):
        module.init(jax.random.key(0), jnp.zeros((2, 64, 8)))
    with pytest.raises(ValueError, match="variant"):
        FPCM(variant="wavelet").init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="weight generator"):
        FPCM(weight_generator="mlp").init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="lowpass implementation"):
        FPCM(lowpass_impl="cuda").init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="> 0"):
        FPCM(cutoff_end=0.0).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="built for 4 channels"):
        NNXFPCM(4, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 4, 3)))


@pytest.mark.parametrize("generator", ["depthwise", "dense"])
def test_nnx_module_equals_linen_module(generator):
    x = jnp.asarray(random_input((2, 4, 4, 8)))
    nnx_module = NNXFPCM(8, rngs=nnx.Rngs(0), weight_generator=generator)
    if generator == "dense":
        projection = {"kernel": nnx_module.projection.kernel[...],
                      "bias": nnx_module.projection.bias[...]}
    else:
        projection = {"kernel": nnx_module.kernel[...], "bias": nnx_module.bias[...]}
    linen_out = FPCM(weight_generator=generator).apply(
        {"params": {"projection": projection}}, x, progress=0.6)
    np.testing.assert_allclose(nnx_module(x, progress=0.6), linen_out, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
def test_fixed_alpha_gives_that_mix_of_low_and_high_frequencies(alpha):
    """On 4x4 maps (P = 16, final cutoff D0 = P/8 = 2): a constant map is pure DC, which the
    low-pass keeps whole (G[0] = 1), so y = alpha x; a map alternating +1/-1 along raster order
    sits at frequency P/2, kept by g = G[8] = exp(-8^2 / (2 * 2^2)) = exp(-8), so
    y = (alpha g + (1 - alpha)(1 - g)) x. Both modules, no projection parameters."""
    constant = np.ones((2, 4, 4, 3), np.float32)
    alternating = np.tile(((-1.0) ** np.arange(16)).reshape(1, 4, 4, 1), (2, 1, 1, 3))
    kept = np.exp(-8.0)
    expected = {"constant": alpha * constant,
                "alternating": (alpha * kept + (1 - alpha) * (1 - kept)) * alternating}
    linen = FPCM(fixed_alpha=alpha)
    variables = linen.init(jax.random.key(0), constant)
    assert not jax.tree.leaves(variables.get("params", {}))
    nnx_module = NNXFPCM(3, rngs=nnx.Rngs(0), fixed_alpha=alpha)
    assert not jax.tree.leaves(nnx.state(nnx_module, nnx.Param))
    for name, x in (("constant", constant), ("alternating", alternating)):
        y, state = linen.apply(variables, jnp.asarray(x, jnp.float32), 1.0,
                               mutable=["intermediates"])
        np.testing.assert_allclose(y, expected[name], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(nnx_module(jnp.asarray(x, jnp.float32), 1.0),
                                   expected[name], atol=1e-6, err_msg=name)
        [sown] = layers.alphas_in(state).values()
        np.testing.assert_array_equal(sown, np.full((2, 3), alpha, np.float32))


def test_fixed_alpha_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="fixed_alpha=1.5 must lie in"):
        FPCM(fixed_alpha=1.5).init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_fixed_alpha_as_a_model_option():
    """--config.model.fpcm_alpha: every FPCM of the model mixes at that alpha, without
    projection parameters; the run describes it, and its export is refused."""
    from conftest import tiny_config
    from fpcm_jax import experiment, models
    from fpcm_jax.runs import export

    config = tiny_config(model__fpcm_alpha=0.7)
    description = experiment.describe(config)
    assert description["fpcm_alpha"] == 0.7
    model, _ = experiment.build(config)
    params = models.variables_template(model)["params"]
    assert [name for name in params if name.startswith("attn")] == []  # no projection
    _, state = model.apply(models.init_variables(model, jax.random.key(0)),
                           jnp.ones((2, 32, 32, 3)), mutable=["intermediates"])
    alphas = layers.alphas_in(state)
    assert sorted(alphas) == ["attn1", "attn2", "attn3", "attn4"]
    for value in alphas.values():
        np.testing.assert_array_equal(value, np.float32(0.7))
    with pytest.raises(ValueError, match="fpcm_alpha=1.5 must lie in"):
        experiment.check_options({**description, "fpcm_alpha": 1.5})
    with pytest.raises(ValueError, match="official PyTorch classes always learn alpha"):
        export._check_exportable(description, "runs/fixed")
