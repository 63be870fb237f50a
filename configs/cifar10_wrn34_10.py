"""WRN-34-10 + FPCM, PGD-AT on CIFAR-10: the official recipe (lr 0.1, wd 5e-4, 60 epochs).

    python main.py --config configs/cifar10_wrn34_10.py --workdir runs/cifar10_wrn34_10

The official WRN uses a fixed cutoff D0 = P/8 and normalises inputs with CIFAR-10 statistics.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "wrn-34-10"
    config.model.cutoff_start = 0.125
    config.model.cutoff_end = 0.125
    config.model.normalization = "cifar10"
    config.train.epochs = 60
    config.train.lr = 0.1
    config.train.weight_decay = 5e-4
    return config
