"""ResNet-18 + FPCM, PGD-AT on CIFAR-100 with the official CIFAR recipe.

    python main.py --config configs/cifar100_resnet18.py --workdir runs/cifar100_resnet18
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar100"
    return config
