"""WRN-28-10 (Swish) + FPCM, TRADES + 1M generated images: the authors' strongest model
(63.63% AutoAttack, their README), trained with the settings they give.

    python main.py --config configs/cifar10_wrn28_10_swish_edm.py --workdir runs/wrn28_edm \\
        --config.data.extra_path=data/1m.npz

Extra data: the 1M EDM-generated CIFAR-10 images with class labels of Wang et al. (2023),
"Better Diffusion Models Further Improve Adversarial Training", published by them as `1m.npz`
(keys `image`, uint8 1,000,000x32x32x3, and `label`; about 3 GB) at
https://huggingface.co/datasets/P2333/DM-Improves-AT. Every batch of 512 draws 70% (358) of its
images from it and 154 from CIFAR-10's training split; an epoch covers the training split once
(318 steps). The extra images are held in memory and on every device (3.1 GB each).

Settings: TRADES beta 5 (with the TRADES KL attack, 10 steps of 2/255), label smoothing 0.1,
SGD with Nesterov momentum 0.9, lr 0.2, weight decay 5e-4, cosine schedule after 10 warm-up
epochs, 400 epochs, EMA of the weights with decay 0.995 (validation, best models and the final
test use it), the official WRN's fixed cutoff P/8 and CIFAR-10 input normalisation.

Cost: not measured (this needs a multi-GPU machine: 400 epochs x 318 steps of a 512-image
TRADES-10 batch through WRN-28-10, about 65M images through 12 forward and backward passes each;
`benchmarks/train_step.py --model wrn-28-10 --loss trades` times one step on your hardware).
Add AWP with --config.train.awp_gamma=0.005 --config.train.awp_warmup_epochs=10 (the official
TRADES-AWP setting).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "wrn-28-10"
    config.model.activation = "swish"
    config.model.cutoff_start = 0.125
    config.model.cutoff_end = 0.125
    config.model.normalization = "cifar10"
    config.data.extra_fraction = 0.7  # with --config.data.extra_path (see above)
    config.train.epochs = 400
    config.train.batch_size = 512
    config.train.lr = 0.2
    config.train.weight_decay = 5e-4
    config.train.schedule = "cosine"
    config.train.warmup_epochs = 10
    config.train.nesterov = True
    config.train.label_smoothing = 0.1
    config.train.loss = "trades"
    config.train.beta = 5.0
    config.train.trades_attack = "kl"
    config.train.ema_decay = 0.995
    return config
