"""The Frequency Preference Control Module (FPCM) of Bu, Huang and Cui (ICCV 2023).

The math lives in pure functions of arrays (`cutoff_fraction`, `token_lowpass`,
`spatial_lowpass`, `frequency_alpha`, `mix_frequencies`); `FPCM` (Flax Linen) and `NNXFPCM`
(Flax NNX) are thin modules over them, so both compute exactly the same thing.

For a feature map x of shape (B, H, W, C), with P = H*W tokens in raster order:

    L     = low-pass of x with a Gaussian of cutoff D0 = fraction * P along the token axis
    Hf    = x - L
    alpha = 0.5 + 0.5 * sigmoid(proj(mean over tokens of x))       # (B, C), in (0.5, 1)
    y     = alpha * L + (1 - alpha) * Hf

The official code transforms along the channel axis as well, but its filter is constant along
channels, so that transform cancels exactly and is not computed here. The filter is real and
even, so a real FFT gives the same L at about half the work; it runs over the flattened
token-channel axis (no transposes), or on small maps as a dense circulant matrix.

The cutoff fraction follows training progress in [0, 1] (a traced value: changing it never
recompiles): fraction = start + (end - start) * clip(progress, 0, 1). The official ResNet-18
uses start 1/2, end 1/8 with progress = epoch / 120; the official WRN a fixed 1/8.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx, traverse_util

FILTER_VARIANTS = ("tokens", "spatial")
WEIGHT_GENERATORS = ("depthwise", "dense")


def cutoff_fraction(progress, start: float = 0.5, end: float = 0.125) -> jax.Array:
    """Cutoff D0 as a fraction of P, linear in training progress (clamped to [0, 1]).
    A progress known outside jit must be finite (a traced one cannot be checked here)."""
    if not isinstance(progress, jax.core.Tracer) and not np.all(np.isfinite(progress)):
        raise ValueError(f"FPCM progress={progress} must be a finite number in [0, 1] "
                         f"(training progress; 1.0 for the final cutoff).")
    progress = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return start + (end - start) * progress


def token_gaussian_filter(num_tokens: int, fraction) -> jax.Array:
    """Half spectrum G[k] = exp(-k^2 / (2 D0^2)), k = 0..P//2, with D0 = fraction * P.

    This is the official filter exp(-min(k, P-k)^2 / (2 D0^2)) restricted to the frequencies a
    real FFT keeps.
    """
    k = jnp.arange(num_tokens // 2 + 1, dtype=jnp.float32)
    d0 = jnp.asarray(fraction, jnp.float32) * num_tokens
    return jnp.exp(-0.5 * jnp.square(k / d0))


LOWPASS_IMPLS = ("auto", "fft", "matmul")
MATMUL_MAX_TOKENS = 64  # 'auto' uses the circulant matmul up to this P on CPU (measured there)


def token_kernel(num_tokens: int, fraction) -> jax.Array:
    """The filter in token space, g = irfft(G): real and even, g[n] = g[P - n]."""
    return jnp.fft.irfft(token_gaussian_filter(num_tokens, fraction), n=num_tokens)


def circulant(kernel: jax.Array) -> jax.Array:
    """The P x P matrix of circular convolution with `kernel`: M[p, q] = kernel[(p - q) mod P]."""
    num_tokens = kernel.shape[0]
    index = jnp.arange(num_tokens)
    return kernel[(index[:, None] - index[None, :]) % num_tokens]


def check_lowpass_impl(impl: str) -> None:
    if impl not in LOWPASS_IMPLS:
        raise ValueError(f"Unknown FPCM lowpass implementation {impl!r}; use one of "
                         f"{LOWPASS_IMPLS}.")


def pick_lowpass_impl(impl: str, num_tokens: int) -> str:
    """'fft' or 'matmul' for the token low-pass; 'auto' picks by measurement on the backend."""
    check_lowpass_impl(impl)
    if impl != "auto":
        return impl
    small = num_tokens <= MATMUL_MAX_TOKENS
    return "matmul" if small and jax.default_backend() == "cpu" else "fft"


def _token_filter(tokens: jax.Array, fraction, impl: str) -> jax.Array:
    """Circular convolution of (B, P, C) float32 tokens with the Gaussian kernel, along P."""
    batch, num_tokens, channels = tokens.shape
    if impl == "matmul":  # exact dense form: no FFT and no transposes around it
        matrix = circulant(token_kernel(num_tokens, fraction))
        return jnp.einsum("pq,bqc->bpc", matrix, tokens,
                          precision=jax.lax.Precision.HIGHEST)
    # One real FFT over the flattened (P*C) axis, the minor one, so nothing is transposed:
    # a circular convolution along P of every channel is a circular convolution along P*C
    # with the kernel spread C apart, whose spectrum is G repeated, G'[k] = G[k mod P].
    length = num_tokens * channels
    half = token_gaussian_filter(num_tokens, fraction)        # G[0 .. P//2]
    full = jnp.concatenate([half, half[1:(num_tokens + 1) // 2][::-1]])  # G[0 .. P-1]
    gain = jnp.tile(full, channels)[:length // 2 + 1]
    spectrum = jnp.fft.rfft(tokens.reshape(batch, length), axis=-1)
    return jnp.fft.irfft(spectrum * gain, n=length, axis=-1).reshape(tokens.shape)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _symmetric_token_filter(tokens: jax.Array, fraction, impl: str) -> jax.Array:
    return _token_filter(tokens, fraction, impl)


def _symmetric_token_filter_fwd(tokens, fraction, impl):
    return _token_filter(tokens, fraction, impl), fraction


def _symmetric_token_filter_bwd(impl, fraction, cotangent):
    # The filter is a circulant matrix with a real even kernel, hence symmetric: its transpose
    # is itself. Autodiff through rfft/irfft would add padding, slicing and masks around it.
    return _token_filter(cotangent, fraction, impl), jnp.zeros_like(fraction)


_symmetric_token_filter.defvjp(_symmetric_token_filter_fwd, _symmetric_token_filter_bwd)


def token_lowpass(x: jax.Array, fraction, impl: str = "auto") -> jax.Array:
    """Gaussian low-pass of an NHWC map along its raster-ordered token axis (official FPCM).

    `impl` 'fft' (one real FFT over the flattened token-channel axis) and 'matmul' (the same
    filter as a dense circulant matrix) compute the same L up to float32 rounding; 'auto'
    picks the faster for the size and backend (`pick_lowpass_impl`). Reverse-mode gradients
    use the filter's symmetry; no gradient flows to `fraction`, and forward-mode (jax.jvp) is
    not supported (a custom VJP).
    """
    batch, height, width, channels = x.shape
    num_tokens = height * width
    tokens = x.reshape(batch, num_tokens, channels).astype(jnp.float32)
    fraction = jnp.asarray(fraction, jnp.float32)
    low = _symmetric_token_filter(tokens, fraction, pick_lowpass_impl(impl, num_tokens))
    return low.reshape(x.shape).astype(x.dtype)


def spatial_gaussian_filter(height: int, width: int, fraction) -> jax.Array:
    """Radial Gaussian exp(-r^2 / (2 fraction^2)) on the rfft2 grid, r in cycles per pixel.

    Same relative cutoff as the token filter: there D0 / P = fraction with k / P in cycles per
    token, so both filters give exp(-8) at the Nyquist frequency 0.5 when fraction = 1/8.
    """
    fy = jnp.fft.fftfreq(height)[:, None]
    fx = jnp.fft.rfftfreq(width)[None, :]
    radius_sq = jnp.square(fy) + jnp.square(fx)
    fraction = jnp.asarray(fraction, jnp.float32)
    return jnp.exp(-0.5 * radius_sq / jnp.square(fraction)).astype(jnp.float32)


def spatial_lowpass(x: jax.Array, fraction) -> jax.Array:
    """Radial Gaussian low-pass of an NHWC map over its two spatial axes (not in the paper)."""
    _, height, width, _ = x.shape
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2))
    gain = spatial_gaussian_filter(height, width, fraction)[None, :, :, None]
    low = jnp.fft.irfft2(spectrum * gain, s=(height, width), axes=(1, 2))
    return low.astype(x.dtype)


def lowpass(x: jax.Array, fraction, variant: str = "tokens", impl: str = "auto") -> jax.Array:
    """Low-pass part of an NHWC feature map with the chosen filter variant (and token impl)."""
    if variant == "tokens":
        return token_lowpass(x, fraction, impl)
    if variant == "spatial":
        return spatial_lowpass(x, fraction)
    raise ValueError(f"Unknown FPCM filter variant {variant!r}; use one of {FILTER_VARIANTS}.")


def frequency_alpha(projected: jax.Array) -> jax.Array:
    """alpha = 0.5 + 0.5 * sigmoid(s): the weight of the low-pass part, always in (0.5, 1)."""
    return 0.5 + 0.5 * jax.nn.sigmoid(projected)


def mix_frequencies(x: jax.Array, low: jax.Array, alpha: jax.Array) -> jax.Array:
    """y = alpha * L + (1 - alpha) * (x - L), alpha of shape (B, C) broadcast over H, W."""
    alpha = alpha[:, None, None, :].astype(x.dtype)
    return alpha * low + (1 - alpha) * (x - low)


def check_feature_map(x: jax.Array, name: str = "FPCM") -> None:
    """Raise a clear error unless x is an NHWC feature map."""
    if getattr(x, "ndim", None) != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"{name} expects an NHWC feature map of shape (batch, height, width, channels); "
            f"got shape {shape}. Reshape token sequences (B, P, C) to (B, H, W, C) first.")


def check_options(variant: str, weight_generator: str, start: float, end: float,
                  lowpass_impl: str = "auto", fixed_alpha: Optional[float] = None) -> None:
    """Raise a clear error for an invalid FPCM option."""
    if fixed_alpha is not None and not 0.0 <= fixed_alpha <= 1.0:
        raise ValueError(f"FPCM fixed_alpha={fixed_alpha} must lie in [0, 1] (the weight of "
                         f"the low-pass part; None: learned, in (0.5, 1)).")
    if variant not in FILTER_VARIANTS:
        raise ValueError(f"Unknown FPCM filter variant {variant!r}; use one of {FILTER_VARIANTS}.")
    if weight_generator not in WEIGHT_GENERATORS:
        raise ValueError(f"Unknown FPCM weight generator {weight_generator!r}; "
                         f"use one of {WEIGHT_GENERATORS}.")
    check_lowpass_impl(lowpass_impl)
    if not (start > 0 and end > 0):
        raise ValueError(f"FPCM cutoff fractions must be > 0 (a zero cutoff makes the filter "
                         f"NaN, as the official code does after epoch 160); got start={start}, "
                         f"end={end}.")


def torch_uniform_init(fan_in: int):
    """PyTorch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class FPCM(nn.Module):
    """Frequency Preference Control Module (Flax Linen), for NHWC feature maps.

    Attributes:
      weight_generator: 'depthwise' (per-channel scale and bias, official ResNet-18) or
        'dense' (a CxC projection with bias, official WRN-34-10).
      variant: 'tokens' (official: Gaussian along raster-ordered tokens) or 'spatial'
        (radial Gaussian over H and W with the same relative cutoff).
      cutoff_start, cutoff_end: cutoff D0 as a fraction of P at progress 0 and at progress 1.
      lowpass_impl: how the token filter is computed: 'fft', 'matmul' (dense circulant) or
        'auto' (the faster one measured for the size and backend); the same L either way.
      fixed_alpha: None (default: alpha learned per sample and channel, as the paper) or a
        constant alpha in [0, 1] for every sample and channel (the paper's fixed-alpha
        ablation; no projection parameters then): y = alpha L + (1 - alpha)(x - L).

    Call with `progress` in [0, 1] (training progress; 1.0 = the final cutoff used for
    evaluation). It is traced, so a new value does not recompile. The per-sample alpha is
    sown into the 'intermediates' collection as 'alpha' for analysis.
    """

    weight_generator: str = "depthwise"
    variant: str = "tokens"
    cutoff_start: float = 0.5
    cutoff_end: float = 0.125
    lowpass_impl: str = "auto"
    fixed_alpha: Optional[float] = None

    @nn.compact
    def __call__(self, x: jax.Array, progress: Any = 1.0) -> jax.Array:
        check_feature_map(x)
        check_options(self.variant, self.weight_generator, self.cutoff_start, self.cutoff_end,
                      self.lowpass_impl, self.fixed_alpha)
        channels = x.shape[-1]
        fraction = cutoff_fraction(progress, self.cutoff_start, self.cutoff_end)
        low = lowpass(x, fraction, self.variant, self.lowpass_impl)
        if self.fixed_alpha is not None:
            alpha = jnp.full((x.shape[0], channels), self.fixed_alpha, jnp.float32)
        else:
            pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            alpha = frequency_alpha(self._project(pooled, channels))
        self.sow("intermediates", "alpha", alpha)
        return mix_frequencies(x, low, alpha)

    def _project(self, pooled: jax.Array, channels: int) -> jax.Array:
        if self.weight_generator == "dense":
            init = torch_uniform_init(channels)
            return nn.Dense(channels, kernel_init=init, bias_init=init, name="projection")(pooled)
        return DepthwiseProjection(name="projection")(pooled)


class DepthwiseProjection(nn.Module):
    """s = kernel * x + bias per channel (the official depthwise 1x1 Conv1d, 2C parameters)."""

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        channels = pooled.shape[-1]
        init = torch_uniform_init(1)  # a depthwise 1x1 conv has fan_in 1 in PyTorch
        kernel = self.param("kernel", init, (channels,))
        bias = self.param("bias", init, (channels,))
        return pooled * kernel + bias


class NNXFPCM(nnx.Module):
    """Frequency Preference Control Module for Flax NNX; same math and options as `FPCM`.

    NNX modules are built eagerly, so the number of channels is given up front:
    `NNXFPCM(64, rngs=nnx.Rngs(0))(x, progress=0.3)`.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, weight_generator: str = "depthwise",
                 variant: str = "tokens", cutoff_start: float = 0.5, cutoff_end: float = 0.125,
                 lowpass_impl: str = "auto", fixed_alpha: Optional[float] = None):
        check_options(variant, weight_generator, cutoff_start, cutoff_end, lowpass_impl,
                      fixed_alpha)
        self.channels = channels
        self.weight_generator = weight_generator
        self.variant = variant
        self.cutoff_start = cutoff_start
        self.cutoff_end = cutoff_end
        self.lowpass_impl = lowpass_impl
        self.fixed_alpha = fixed_alpha
        if fixed_alpha is not None:
            pass  # no projection: alpha is the constant
        elif weight_generator == "dense":
            init = torch_uniform_init(channels)
            self.projection = nnx.Linear(channels, channels, kernel_init=init, bias_init=init,
                                         rngs=rngs)
        else:
            init = torch_uniform_init(1)
            self.kernel = nnx.Param(init(rngs.params(), (channels,)))
            self.bias = nnx.Param(init(rngs.params(), (channels,)))

    def __call__(self, x: jax.Array, progress: Any = 1.0) -> jax.Array:
        check_feature_map(x, "NNXFPCM")
        if x.shape[-1] != self.channels:
            raise ValueError(f"NNXFPCM was built for {self.channels} channels; the input has "
                             f"{x.shape[-1]} (shape {x.shape}).")
        fraction = cutoff_fraction(progress, self.cutoff_start, self.cutoff_end)
        low = lowpass(x, fraction, self.variant, self.lowpass_impl)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.fixed_alpha is not None:
            alpha = jnp.full(pooled.shape, self.fixed_alpha, jnp.float32)
        elif self.weight_generator == "dense":
            alpha = frequency_alpha(self.projection(pooled))
        else:
            alpha = frequency_alpha(pooled * self.kernel[...] + self.bias[...])
        # The latest call's alpha only (NNX's default appends every call's, without bound).
        self.sow(nnx.Intermediate, "alpha", alpha, reduce_fn=lambda _, new: new,
                 init_fn=lambda: None)
        return mix_frequencies(x, low, alpha)


def alphas_in(state: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Each FPCM module's alpha, (batch, channels), from a model's mutable 'intermediates',
    named by the module's path in the model ('attn1', 'stage2/FPCM_0'; 'fpcm' for a bare
    module), wherever it sits."""
    return {"/".join(path[:-1]) or "fpcm":  # Linen sows a tuple of values, NNX the latest
            np.asarray(value[0] if isinstance(value, tuple) else value) for path, value in
            traverse_util.flatten_dict(state.get("intermediates", {})).items()
            if path[-1] == "alpha"}
