"""fpcm-jax: frequency-biased adversarial training (FPCM, ICCV 2023) in JAX/Flax.

    from fpcm_jax.layers import FPCM                     # the layer, in your own Flax model
    fpcm_jax.train_and_evaluate(config, workdir, model=MyNet(...))   # train it (fpcm_jax.api)
    fpcm_jax.evaluate_model(config, workdir, ["pgd20", "autoattack"])  # evaluate it
"""

from fpcm_jax.version import __version__  # noqa: F401

_ENTRY_POINTS = ("train_and_evaluate", "evaluate_model")


def __getattr__(name):
    """The entry points of `fpcm_jax.api`, imported on first use (`import fpcm_jax.layers`
    stays light)."""
    if name in _ENTRY_POINTS:
        from fpcm_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'fpcm_jax' has no attribute {name!r}")
