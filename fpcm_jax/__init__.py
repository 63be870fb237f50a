"""fpcm-jax: frequency-biased adversarial training (FPCM, ICCV 2023) in JAX/Flax."""

__version__ = "0.3.0"
