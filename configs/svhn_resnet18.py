"""ResNet-18 + FPCM, PGD-AT on SVHN (tfds svhn_cropped; no horizontal flip).

    python main.py --config configs/svhn_resnet18.py --workdir runs/svhn_resnet18

The official code has no SVHN recipe; this keeps its CIFAR settings except the flip.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "svhn"
    config.data.flip = False
    return config
