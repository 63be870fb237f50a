"""A tiny ResNet + FPCM trained with PGD-AT on scikit-learn's digits (32x32x3): no download.

    python main.py --config configs/tiny.py --workdir runs/tiny

Cost: about 3 minutes on a 2-core CPU (ResNet with widths 16/32/64/128, one block per stage,
15 epochs x 11 steps of 128 images, PGD-10). Standard training for comparison:
--config.attack.steps=0. Digits are 8x8 images upscaled 4x, so eps 8/255 is a small
perturbation relative to their strokes.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.validation_size = 100
    config.data.flip = False  # digits are not mirror-symmetric
    config.model.widths = (16, 32, 64, 128)
    config.model.stage_sizes = (1, 1, 1, 1)
    config.train.epochs = 15
    config.train.warmup_epochs = 2
    config.train.lr = 0.05
    config.train.weight_decay = 5e-4
    config.train.checkpoint_every_steps = 50
    config.eval.batch_size = 100
    config.analysis.num_examples = 297
    config.analysis.heatmap_examples = 32
    config.analysis.noise_l2_norm = 12.0    # digits barely react to the default 4.0
    config.analysis.heatmap_l2_norm = 12.0
    return config
