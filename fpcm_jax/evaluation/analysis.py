"""Frequency-bias analyses of trained models (the paper's section on frequency bias), with plots.

    python main.py --config configs/tiny.py --mode analyze --checkpoints runs/std,runs/pgdat \
        --workdir runs/analysis

For each checkpoint (a run directory, whose best_robust/ is used, or a model checkpoint):
1. FPCM preference: alpha per stage and channel over the test images (mean, min, max and the
   per-channel variance across samples).
2. Band-limited noise: accuracy under Gaussian noise restricted to a ring of the 2-D image
   spectrum, rescaled to a fixed L2 norm per image, for rings from low to high frequency.
3. Filtered inputs: accuracy on ideally low-pass and high-pass filtered images (radius r in
   cycles per pixel; low + high = the image).
4. Fourier heat map (Yin et al., 2019): error rate under x + s * v * U(u, v), a single real
   Fourier basis image of L2 norm v (the same in each channel), s a random sign per image.
5. Feature spectrum: share of the (non-DC) 2-D spectral energy of each stage's output above
   half the Nyquist radius, before and after FPCM.
Every number behind the plots goes into analysis.json. Images are clipped to [0, 1] after
adding noise or a basis image, so what the model sees is slightly out of band at the edges.
Non-finite logits (or alphas, or features) stop the analysis with an `attacks.NonFiniteError`
naming the analysis, the count of points and the first one.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from fpcm_jax import attacks, layers, models, parallel
from fpcm_jax.data import datasets
from fpcm_jax.reports import plots
from fpcm_jax.runs import loading
from fpcm_jax.evaluation.spectra import MAX_RADIUS, radius_grid
from fpcm_jax.files import write_json

def band_masks(height: int, width: int, num_bands: int) -> np.ndarray:
    """(num_bands, H, W) indicator masks of equal-width rings from 0 to the corner radius."""
    radius = radius_grid(height, width)
    edges = np.linspace(0.0, MAX_RADIUS + 1e-9, num_bands + 1)
    return np.stack([(radius >= lo) & (radius < hi) for lo, hi in zip(edges[:-1], edges[1:])]
                    ).astype(np.float32)


def band_limited_noise(key: jax.Array, shape: Sequence[int], mask: jax.Array,
                       l2_norm: float) -> jax.Array:
    """Gaussian noise (NHWC) keeping only the fft2 coefficients in `mask`, L2 norm per image."""
    noise = jax.random.normal(key, shape)
    spectrum = jnp.fft.fft2(noise, axes=(1, 2)) * mask[None, :, :, None]
    filtered = jnp.real(jnp.fft.ifft2(spectrum, axes=(1, 2)))
    norms = jnp.sqrt(jnp.sum(filtered ** 2, axis=(1, 2, 3), keepdims=True)) + 1e-12
    return filtered / norms * l2_norm


def ideal_lowpass(x: jax.Array, radius: float) -> jax.Array:
    """Keep the fft2 coefficients of each channel with radial frequency <= radius."""
    mask = jnp.asarray(radius_grid(x.shape[1], x.shape[2]) <= radius, jnp.float32)
    spectrum = jnp.fft.fft2(x, axes=(1, 2)) * mask[None, :, :, None]
    return jnp.real(jnp.fft.ifft2(spectrum, axes=(1, 2)))


def ideal_highpass(x: jax.Array, radius: float) -> jax.Array:
    """The rest: x - ideal_lowpass(x, radius)."""
    return x - ideal_lowpass(x, radius)


def fourier_basis(height: int, width: int, u: int, v: int) -> np.ndarray:
    """The real Fourier basis image for frequency (u, v) (fft2 indices), unit L2 norm."""
    spectrum = np.zeros((height, width), np.complex64)
    spectrum[u % height, v % width] = 1.0
    spectrum[-u % height, -v % width] = 1.0
    image = np.real(np.fft.ifft2(spectrum))
    return (image / (np.linalg.norm(image) + 1e-12)).astype(np.float32)


def alpha_statistics(alphas: Dict[str, np.ndarray]) -> Dict[str, Dict[str, Any]]:
    """Per stage: per-channel mean/min/max/variance across samples and their summaries."""
    stats = {}
    for stage, values in alphas.items():  # values: (samples, channels)
        mean, var = values.mean(0), values.var(0)
        stats[stage] = {"mean": float(values.mean()), "min": float(values.min()),
                        "max": float(values.max()), "mean_channel_variance": float(var.mean()),
                        "channel_mean": mean.tolist(), "channel_min": values.min(0).tolist(),
                        "channel_max": values.max(0).tolist(), "channel_variance": var.tolist()}
    return stats


def high_frequency_share(features: jax.Array, cutoff: float = 0.25) -> float:
    """Share of non-DC spectral energy above `cutoff` cycles/pixel, over a batch of NHWC maps."""
    energy = jnp.abs(jnp.fft.fft2(features.astype(jnp.float32), axes=(1, 2))) ** 2
    radius = radius_grid(features.shape[1], features.shape[2])
    high = jnp.asarray(radius > cutoff, jnp.float32)[None, :, :, None]
    not_dc = jnp.asarray(radius > 0, jnp.float32)[None, :, :, None]
    return float(jnp.sum(energy * high) / (jnp.sum(energy * not_dc) + 1e-12))


class Analyzer:
    """The analyses for one model, batched and jitted."""

    def __init__(self, model, variables, batch_size: int = 256):
        self.model, self.variables, self.batch_size = model, variables, batch_size
        self.predict = jax.jit(lambda v, x: _classes_and_nonfinite(
            model.apply(v, x, train=False, progress=1.0)))

    def accuracy(self, x: np.ndarray, y: np.ndarray, what: str = "the clean images") -> float:
        """Accuracy on x; a NonFiniteError names `what` if any logit is not finite."""
        correct, nonfinite = 0, []
        for start in range(0, len(y), self.batch_size):
            chunk = jnp.asarray(x[start:start + self.batch_size])
            classes, bad = self.predict(self.variables, chunk)
            correct += int(jnp.sum(classes == y[start:start + self.batch_size]))
            nonfinite.extend((start + np.flatnonzero(np.asarray(bad))).tolist())
        if nonfinite:
            raise attacks.nonfinite_error(f"analysis on {what}", "logits", len(nonfinite),
                                          nonfinite[0])
        return correct / len(y)

    def alphas(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        apply = jax.jit(lambda v, inputs: self.model.apply(
            v, inputs, train=False, progress=1.0, mutable=["intermediates"])[1])
        collected: Dict[str, List[np.ndarray]] = {}
        for start in range(0, len(x), self.batch_size):
            state = apply(self.variables, jnp.asarray(x[start:start + self.batch_size]))
            for stage, alpha in layers.alphas_in(state).items():
                collected.setdefault(stage, []).append(alpha)
        alphas = {stage: np.concatenate(parts) for stage, parts in sorted(collected.items())}
        for stage, values in alphas.items():
            attacks.check_finite(f"analysis of FPCM's alphas ({stage})", "alphas", values)
        return alphas

    def stage_features(self, x: np.ndarray) -> Dict[str, Dict[str, float]]:
        """High-frequency share at the end of each stage, before and after its FPCM (the
        registry's models, also without FPCM); for any other model, at the input and output
        of each FPCM module wherever it sits, named by its path."""
        if not isinstance(self.model, models.CifarClassifier):
            return {name: {"before": _checked_share(name, "before", before),
                           "after": _checked_share(name, "after", after)}
                    for name, (before, after) in fpcm_inputs_and_outputs(
                        self.model, self.variables, jnp.asarray(x)).items()}
        _, state = self.model.apply(self.variables, jnp.asarray(x), train=False, progress=1.0,
                                    capture_intermediates=True, mutable=["intermediates"])
        outputs = {path[0]: value[0] for path, value in
                   traverse_util.flatten_dict(state["intermediates"]).items()
                   if len(path) == 2 and path[1] == "__call__"}
        stages = _stage_ends(outputs)
        return {name: {kind: _checked_share(name, kind, outputs[module])
                       for kind, module in modules.items()} for name, modules in stages.items()}

    def band_noise(self, x, y, key, num_bands: int, l2_norm: float) -> List[float]:
        masks = band_masks(x.shape[1], x.shape[2], num_bands)
        noisy = jax.jit(lambda k, images, mask: jnp.clip(
            images + band_limited_noise(k, images.shape, mask, l2_norm), 0.0, 1.0))
        return [self.accuracy(np.asarray(noisy(jax.random.fold_in(key, band), jnp.asarray(x),
                                               jnp.asarray(mask))), y,
                              f"band-limited noise (band {band})")
                for band, mask in enumerate(masks)]

    def filtered(self, x, y, radii: Sequence[float]) -> Dict[str, List[float]]:
        images = jnp.asarray(x)
        low = [self.accuracy(np.asarray(jnp.clip(ideal_lowpass(images, r), 0, 1)), y,
                             f"low-pass filtered images (radius {r:.3f})") for r in radii]
        high = [self.accuracy(np.asarray(jnp.clip(ideal_highpass(images, r), 0, 1)), y,
                              f"high-pass filtered images (radius {r:.3f})") for r in radii]
        return {"lowpass": low, "highpass": high}

    def fourier_heat_map(self, x, y, key, l2_norm: float) -> np.ndarray:
        """Error rate for each (u, v), fftshift-ed (zero frequency in the middle)."""
        height, width = x.shape[1], x.shape[2]
        signs = np.asarray(jax.random.rademacher(key, (len(y), 1, 1, 1))).astype(np.float32)
        images = jnp.asarray(x)

        @jax.jit
        def errors(v, basis):
            perturbed = jnp.clip(images + l2_norm * signs * basis[None, :, :, None], 0.0, 1.0)
            classes, bad = _classes_and_nonfinite(
                self.model.apply(v, perturbed, train=False, progress=1.0))
            return jnp.mean(classes != y), bad.sum(), jnp.argmax(bad)

        heat = np.zeros((height, width), np.float32)
        for u in range(height):
            for w in range(width):
                basis = fourier_basis(height, width, u, w) / np.sqrt(x.shape[3])
                error, bad, first = errors(self.variables, jnp.asarray(basis))
                if bad:
                    raise attacks.nonfinite_error(
                        f"analysis on the Fourier heat map's basis image ({u}, {w})", "logits",
                        int(bad), int(first))
                heat[u, w] = float(error)
        return np.fft.fftshift(heat)


def _checked_share(name: str, kind: str, features: jax.Array) -> float:
    """high_frequency_share of finite features; a NonFiniteError otherwise."""
    attacks.check_finite(f"analysis of the feature spectrum ({name}, {kind} FPCM)", "features",
                         features)
    return high_frequency_share(features)


def _classes_and_nonfinite(logits: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(predicted classes, whether each point's logits hold NaN or infinity)."""
    return jnp.argmax(logits, -1), attacks.nonfinite_points(logits)


def fpcm_inputs_and_outputs(model, variables, x: jax.Array) -> Dict[str, Tuple[Any, Any]]:
    """{module path: (input, output)} of every FPCM (Linen) module in one eval-mode forward,
    found by what it is, wherever it sits in the model."""
    seen: Dict[str, Tuple[Any, Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if isinstance(context.module, layers.FPCM) and context.method_name == "__call__":
            seen["/".join(context.module.path) or "fpcm"] = (args[0], output)
        return output

    with nn.intercept_methods(interceptor):
        model.apply(variables, x, train=False, progress=1.0)
    return seen


def _stage_ends(outputs: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    """{stage: {'before': last block, 'after': its FPCM}} from captured module names."""
    stages: Dict[str, Dict[str, str]] = {}
    for name in outputs:
        if name.startswith("layer") or name.startswith("block"):
            stage = name.split("_")[0].replace("layer", "stage").replace("block", "stage")
            current = stages.setdefault(stage, {})
            if "before" not in current or name > current["before"]:
                current["before"] = name
    for name in outputs:
        if name.startswith("attn"):
            stages.setdefault(name.replace("attn", "stage"), {})["after"] = name
    return dict(sorted(stages.items()))


def load_checkpoint_model(path: str, config, overrides=None, allow_fallback: bool = False
                          ) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """(model, variables as host arrays, info) for a run directory (its best_robust/) or a
    model checkpoint; the analyses then run on each process's own first device."""
    model, variables, info, _ = loading.load_model(
        path, overrides=overrides, dtype=config.model.dtype,
        fpcm_lowpass=config.model.fpcm_lowpass, allow_fallback=allow_fallback,
        flag="--checkpoints")
    return model, jax.device_get(variables), info


def run_analysis(config, checkpoint_paths: Sequence[str], workdir: str,
                 labels: Optional[Sequence[str]] = None,
                 model_overrides: Optional[Dict[str, Any]] = None,
                 allow_fallback: bool = False) -> Dict[str, Any]:
    """All analyses for each checkpoint; writes analysis.json and the PNG plots to workdir
    (process 0 only, when several processes run it)."""
    settings = config.analysis
    labels = list(labels) if labels else [_label(p) for p in checkpoint_paths]
    _, _, test_split = datasets.load_for(config, validation=False)
    count = min(settings.num_examples, len(test_split))
    x = np.asarray(datasets.to_float(test_split.images[:count]))
    y = test_split.labels[:count]
    heat_count = min(settings.heatmap_examples, count)
    radii = list(np.linspace(0.05, MAX_RADIUS, settings.filter_steps))
    key = jax.random.key(config.seed)
    results: Dict[str, Any] = {"labels": labels, "checkpoints": list(checkpoint_paths),
                               "examples": count, "heatmap_examples": heat_count,
                               "settings": settings.to_dict(), "filter_radii": radii,
                               "models": {}}
    for label, path in zip(labels, checkpoint_paths):
        model, variables, _ = load_checkpoint_model(path, config, model_overrides, allow_fallback)
        analyzer = Analyzer(model, variables, config.eval.batch_size)
        alphas = analyzer.alphas(x)
        results["models"][label] = {
            "clean_accuracy": analyzer.accuracy(x, y),
            "alpha": alpha_statistics(alphas),
            "band_noise_accuracy": analyzer.band_noise(x, y, key, settings.bands,
                                                       settings.noise_l2_norm),
            "filtered_accuracy": analyzer.filtered(x, y, radii),
            "fourier_heat_map": analyzer.fourier_heat_map(
                x[:heat_count], y[:heat_count], key, settings.heatmap_l2_norm).tolist(),
            "feature_high_frequency_share": analyzer.stage_features(x[:settings.feature_examples]),
        }
        results["models"][label]["_alpha_samples"] = {k: v for k, v in alphas.items()}
    path = os.path.join(workdir, "analysis.json")
    main = parallel.is_main_process()
    if main:
        os.makedirs(workdir, exist_ok=True)
        results["figures"] = plots.write_all(results, workdir)
    for model_result in results["models"].values():
        model_result.pop("_alpha_samples")
    if main:
        write_json(path, results, indent=1)
    results["path"] = path
    return results


def _label(path: str) -> str:
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base.startswith("best_") else base
