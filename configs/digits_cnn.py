"""Your own model through the whole pipeline: examples/digits_cnn.py (a small CNN with FPCM
after two stages) trained with PGD-AT on scikit-learn's digits (no download).

    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn
    python main.py --config configs/digits_cnn.py --workdir runs/digits_cnn_base \
        --config.model.kwargs.fpcm=False                    # the same net without FPCM

Cost: a few minutes each on a 2-core CPU (15 epochs x 11 steps of 128 images, PGD-10). The
model is named by its import path; its keyword arguments are config.model.kwargs (flags can
change the keys given here; new keys go in a config file like this one).
"""

import ml_collections

from configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.name = "examples.digits_cnn:DigitsCNN"
    config.model.kwargs = ml_collections.ConfigDict(
        {"widths": (16, 32, 64, 128), "fpcm": True, "fpcm_after": (2, 3)})
    config.model.widths = None       # the registry ResNet's fields: unused by your own model
    config.model.stage_sizes = None
    return config
