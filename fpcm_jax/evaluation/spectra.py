"""Where an image's or a perturbation's energy lies in the 2-D Fourier spectrum: the radial
frequency grid, and the summaries of a perturbation's spectrum (pure numpy).

Radii are in cycles per pixel: 0 is the constant (DC) component, 0.5 the Nyquist frequency
along an axis, sqrt(0.5) the corner of the spectrum.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

MAX_RADIUS = float(np.sqrt(0.5))  # the corner of the spectrum, in cycles per pixel
HIGH_FREQUENCY_RADIUS = 0.25  # half the Nyquist frequency


def radius_grid(height: int, width: int) -> np.ndarray:
    """Radial frequency (cycles per pixel) of every fft2 coefficient, shape (H, W)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    return np.sqrt(fy ** 2 + fx ** 2)


def perturbation_energy(delta: np.ndarray) -> np.ndarray:
    """(H, W): the 2-D Fourier energy |FFT2|^2 of a batch of perturbations (NHWC), summed over
    images and channels (add batches up; `spectrum_summary` reads the sum)."""
    energy = np.abs(np.fft.fft2(np.asarray(delta, np.float64), axes=(1, 2))) ** 2
    return energy.sum(axis=(0, 3))


def perturbation_spectrum(delta: np.ndarray, cutoff: float = HIGH_FREQUENCY_RADIUS
                          ) -> Dict[str, float]:
    """Where a batch of perturbations (NHWC, e.g. corrupted minus clean images) puts its
    energy in the 2-D Fourier spectrum of each channel (`spectrum_summary`)."""
    return spectrum_summary(perturbation_energy(delta), cutoff)


def spectrum_summary(per_frequency: np.ndarray, cutoff: float = HIGH_FREQUENCY_RADIUS
                     ) -> Dict[str, float]:
    """From an (H, W) energy spectrum: `mean_radius`, the energy-weighted mean radial
    frequency (cycles per pixel, 0 to sqrt(0.5); a constant shift is 0), and `high_fraction`,
    the share of the energy above `cutoff` (DC included in the total); 0 and 0 without
    energy."""
    radius = radius_grid(*per_frequency.shape)
    total = float(per_frequency.sum())
    if total == 0.0:
        return {"mean_radius": 0.0, "high_fraction": 0.0}
    return {"mean_radius": float((per_frequency * radius).sum() / total),
            "high_fraction": float(per_frequency[radius > cutoff].sum() / total)}
