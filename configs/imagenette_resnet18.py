"""ResNet-18 + FPCM, PGD-AT on Imagenette (tfds imagenette/160px, center-cropped to 160x160).

    python main.py --config configs/imagenette_resnet18.py --workdir runs/imagenette_resnet18

Same recipe as CIFAR (crop with 4-pixel padding + flip); FPCM's first stage then has
P = 25,600 tokens. Normalisation with ImageNet statistics.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "imagenette"
    config.data.validation_size = 500
    config.model.normalization = "dataset"
    config.eval.batch_size = 64
    return config
