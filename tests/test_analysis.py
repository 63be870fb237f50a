"""Frequency-bias analyses: noise bands, filters, heat map, alpha statistics, end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fpcm_jax import models
from fpcm_jax.data import datasets
from fpcm_jax.evaluation import analysis
from fpcm_jax.layers import FPCM


def test_band_limited_noise_lies_in_its_band_with_the_requested_norm():
    masks = analysis.band_masks(16, 16, 4)
    np.testing.assert_array_equal(masks.sum(0), np.ones((16, 16)))  # the rings tile the plane
    for band, mask in enumerate(masks):
        noise = analysis.band_limited_noise(jax.random.key(band), (3, 16, 16, 2),
                                            jnp.asarray(mask), 2.5)
        norms = np.sqrt(np.sum(np.asarray(noise) ** 2, axis=(1, 2, 3)))
        np.testing.assert_allclose(norms, 2.5, rtol=1e-5)
        energy = np.abs(np.fft.fft2(np.asarray(noise), axes=(1, 2))) ** 2
        outside = energy * (1 - mask)[None, :, :, None]
        assert outside.sum() < 1e-8 * energy.sum()


def test_lowpass_plus_highpass_is_the_image():
    x = jax.random.uniform(jax.random.key(0), (2, 12, 10, 3))
    for radius in (0.05, 0.2, 0.6):
        total = analysis.ideal_lowpass(x, radius) + analysis.ideal_highpass(x, radius)
        np.testing.assert_allclose(total, x, atol=1e-5)
    np.testing.assert_allclose(analysis.ideal_lowpass(x, 1.0), x, atol=1e-5)
    # The widest radius the analyses use is the spectrum's corner: it keeps every coefficient.
    np.testing.assert_allclose(analysis.ideal_lowpass(x, analysis.MAX_RADIUS), x, atol=1e-5)


class LowFrequencyNet(nn.Module):
    """Sees only frequencies up to 0.13 cycles/pixel."""

    @nn.compact
    def __call__(self, x, train=False, progress=1.0):
        low = analysis.ideal_lowpass(x, 0.13)
        return nn.Dense(10)(low.reshape(x.shape[0], -1) * 20.0)


def test_heat_map_of_a_low_frequency_model_is_zero_at_high_frequencies():
    x = np.asarray(0.4 + 0.2 * jax.random.uniform(jax.random.key(1), (16, 16, 16, 3)))
    model = LowFrequencyNet()
    variables = model.init(jax.random.key(2), jnp.asarray(x))
    y = np.asarray(model.apply(variables, jnp.asarray(x)).argmax(-1))
    heat = analysis.Analyzer(model, variables).fourier_heat_map(x, y, jax.random.key(3), 6.0)
    radius = np.fft.fftshift(analysis.radius_grid(16, 16))
    assert np.all(heat[radius > 0.2] == 0.0)
    assert heat[(radius > 0) & (radius <= 0.13)].max() > 0.0


def test_alpha_statistics_equal_a_direct_computation_from_the_fpcm_module():
    model = models.create("resnet18", widths=(4, 4, 8, 8), stage_sizes=(1, 1, 1, 1))
    x = np.asarray(jax.random.uniform(jax.random.key(0), (10, 16, 16, 3)))
    variables = model.init(jax.random.key(1), jnp.asarray(x))
    analyzer = analysis.Analyzer(model, variables, batch_size=4)  # several batches
    alphas = analyzer.alphas(x)
    assert list(alphas) == ["attn1", "attn2", "attn3", "attn4"]
    _, state = model.apply(variables, jnp.asarray(x), capture_intermediates=True,
                           mutable=["intermediates"])
    stage_input = state["intermediates"]["layer2_0"]["__call__"][0]
    fpcm = FPCM("depthwise")
    _, sown = fpcm.apply({"params": variables["params"]["attn2"]}, stage_input, progress=1.0,
                         mutable=["intermediates"])
    direct = np.asarray(sown["intermediates"]["alpha"][0])
    np.testing.assert_allclose(alphas["attn2"], direct, rtol=1e-5)
    stats = analysis.alpha_statistics(alphas)["attn2"]
    np.testing.assert_allclose(stats["channel_variance"], direct.var(0), rtol=1e-4, atol=1e-9)
    assert stats["min"] == float(direct.min()) and 0.5 < stats["min"] <= stats["max"] < 1.0


def test_high_frequency_share():
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    checker = ((-1.0) ** (rows + cols))[None, :, :, None]
    smooth = np.cos(2 * np.pi * rows / 8)[None, :, :, None]
    assert analysis.high_frequency_share(jnp.asarray(checker)) > 0.999
    assert analysis.high_frequency_share(jnp.asarray(smooth)) < 1e-6


class LowFrequencyDetailNet(nn.Module):
    """Sees only frequencies up to 0.13 cycles/pixel of the image minus 0.5 (so its
    predictions vary with the images' low-frequency detail, not with their mean)."""

    @nn.compact
    def __call__(self, x, train=False, progress=1.0):
        low = analysis.ideal_lowpass(x - 0.5, 0.13)
        return nn.Dense(10)(low.reshape(x.shape[0], -1) * 20.0)


def test_band_noise_and_filters_of_a_low_frequency_model():
    """Noise in the bands above 0.236 and a low-pass above 0.13 change none of the model's
    predictions; low-band noise and a narrower low-pass change many (accuracy 0.22 and 0.19
    here, all of it deterministic); at noise norm 0 every band gives the clean accuracy. The
    images lie in [0.45, 0.55] and noise of L2 norm 1 over 768 values has a standard deviation
    of 0.036, so clipping to [0, 1] never adds frequencies the model sees."""
    x = np.asarray(0.45 + 0.1 * jax.random.uniform(jax.random.key(1), (32, 16, 16, 3)))
    model = LowFrequencyDetailNet()
    variables = model.init(jax.random.key(2), jnp.asarray(x))
    predict = lambda images: np.asarray(model.apply(variables, jnp.asarray(images))).argmax(-1)
    y = predict(x)  # clean accuracy 1
    assert len(set(y)) >= 5
    analyzer = analysis.Analyzer(model, variables, batch_size=8)
    assert analyzer.band_noise(x, y, jax.random.key(3), 3, 0.0) == [1.0, 1.0, 1.0]
    noisy = analyzer.band_noise(x, y, jax.random.key(3), 3, 1.0)
    assert noisy[0] < 0.5 and noisy[1:] == [1.0, 1.0]
    filtered = analyzer.filtered(x, y, [0.05, 0.2, analysis.MAX_RADIUS])
    assert filtered["lowpass"][0] < 0.5 and filtered["lowpass"][1:] == [1.0, 1.0]
    assert filtered["highpass"][-1] == float(np.mean(predict(np.zeros_like(x)) == y)) < 0.5
    assert not analyzer.fourier_heat_map(x, y, jax.random.key(4), 0.0).any()
    # One entry of the heat map from its definition: error under x + s * v * U(1, 1) / sqrt(3).
    heat = np.fft.ifftshift(analyzer.fourier_heat_map(x, y, jax.random.key(4), 1.5))
    signs = np.asarray(jax.random.rademacher(jax.random.key(4), (32, 1, 1, 1)))
    basis = analysis.fourier_basis(16, 16, 1, 1)[None, :, :, None] / np.sqrt(3)
    direct = np.mean(predict(np.clip(x + 1.5 * signs * basis, 0, 1)) != y)
    assert heat[1, 1] == np.float32(direct) and 0 < direct < 1


class ConstantNet(nn.Module):
    """Logits that do not depend on the input."""

    @nn.compact
    def __call__(self, x, train=False, progress=1.0):
        bias = self.param("bias", lambda key: jnp.arange(10.0) % 3)  # always predicts class 2
        return jnp.broadcast_to(bias, (x.shape[0], 10)) + 0.0 * x.sum()


def test_heat_map_of_a_constant_model_is_flat_at_its_error_rate():
    x = np.asarray(jax.random.uniform(jax.random.key(4), (12, 8, 8, 3)))
    y = np.arange(12) % 4  # three of twelve are class 2
    model = ConstantNet()
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    heat = analysis.Analyzer(model, variables).fourier_heat_map(x, y, jax.random.key(1), 6.0)
    np.testing.assert_array_equal(heat, np.full((8, 8), 0.75, np.float32))


@pytest.mark.slow
def test_analyze_end_to_end_without_noise_gives_the_clean_accuracy(trained_tiny_run, tmp_path):
    """At noise norm 0 every band and every heat-map entry is the clean figure; the widest
    low-pass keeps the whole spectrum (clean accuracy) and its high-pass leaves a zero image.
    (The one-epoch tiny model predicts almost one class: the analyses' values are checked on a
    model with a known frequency response above.)"""
    run, config = trained_tiny_run
    config = config.copy_and_resolve_references()
    config.analysis.num_examples = 40
    config.analysis.heatmap_examples = 8
    config.analysis.filter_steps = 3
    config.analysis.bands = 3
    config.analysis.feature_examples = 8
    config.analysis.noise_l2_norm = 0.0
    config.analysis.heatmap_l2_norm = 0.0
    result = analysis.run_analysis(config, [str(run)], str(tmp_path / "out"))
    assert result["labels"] == ["tiny_run"]
    with open(tmp_path / "out" / "analysis.json") as handle:
        saved = json.load(handle)
    figures = saved["models"]["tiny_run"]
    model, variables, _ = analysis.load_checkpoint_model(str(run), config)
    predict = lambda images: np.asarray(model.apply(variables, jnp.asarray(images), train=False,
                                                    progress=1.0)).argmax(-1)
    _, _, test_split = datasets.load_for(config)
    x, y = datasets.to_float(test_split.images[:40]), test_split.labels[:40]
    clean = float(np.mean(predict(x) == y))
    assert figures["clean_accuracy"] == clean
    assert figures["band_noise_accuracy"] == [clean] * 3
    assert figures["filtered_accuracy"]["lowpass"][-1] == clean
    assert figures["filtered_accuracy"]["highpass"][-1] == float(
        np.mean(predict(np.zeros_like(x)) == y))
    clean_error_heat = float(np.mean(predict(x[:8]) != y[:8]))
    np.testing.assert_allclose(figures["fourier_heat_map"], clean_error_heat, rtol=0, atol=1e-7)
    assert set(figures["alpha"]) == {"attn1", "attn2", "attn3", "attn4"}
    assert set(figures["feature_high_frequency_share"]["stage1"]) == {"before", "after"}
    for name in ("alpha_distribution", "band_noise", "filtered_accuracy", "fourier_heat_map",
                 "feature_spectrum"):
        assert os.path.getsize(tmp_path / "out" / f"{name}.png") > 1000


def test_every_plot_axis_is_labelled_and_colours_have_legends():
    from fpcm_jax.reports import plots

    rng = np.random.default_rng(0)
    model = {"_alpha_samples": {"attn1": rng.uniform(0.5, 1, (4, 8)),
                                "attn2": rng.uniform(0.5, 1, (4, 8))},
             "band_noise_accuracy": [0.9, 0.8, 0.5],
             "filtered_accuracy": {"lowpass": [0.2, 0.6, 0.9], "highpass": [0.9, 0.4, 0.1]},
             "fourier_heat_map": rng.uniform(0, 1, (8, 8)).tolist(),
             "feature_high_frequency_share": {"stage1": {"before": 0.3, "after": 0.2}}}
    results = {"models": {"a": model, "b": model}, "filter_radii": [0.1, 0.3, 0.7],
               "settings": {"bands": 3, "noise_l2_norm": 4.0, "heatmap_l2_norm": 4.0}}
    for writer in (plots.alpha_distribution, plots.band_noise, plots.filtered_accuracy,
                   plots.fourier_heat_maps, plots.feature_spectrum):
        figure, name = writer(results)
        for axis in figure.axes:
            if axis.get_label() == "<colorbar>":
                assert axis.get_ylabel(), name
                continue
            assert axis.get_xlabel(), name
            shares_y = [other for other in axis.get_shared_y_axes().get_siblings(axis)
                        if other.get_ylabel()]
            assert axis.get_ylabel() or shares_y, name
        if name in ("band_noise.png", "filtered_accuracy.png", "feature_spectrum.png"):
            assert any(axis.get_legend() for axis in figure.axes), name
