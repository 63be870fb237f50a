"""ResNet-18 + FPCM, PGD-AT on CIFAR-10: the official recipe (lr 0.01, wd 3.5e-3, 120 epochs).

    python main.py --config configs/cifar10_resnet18.py --workdir runs/cifar10_resnet18

Baseline without FPCM: add --config.model.fpcm=False. Cost: 120 epochs x 49,000 images x 11
forward-backward passes (PGD-10 + update).
"""

from configs import default


def get_config():
    return default.get_config()
