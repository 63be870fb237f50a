"""ResNet-18 + FPCM (ImageNet stem off: 64 px keeps the CIFAR stem, as is usual for Tiny-ImageNet)
trained with PGD-AT on Tiny-ImageNet (200 classes, 64x64), from an image folder.

    python main.py --config configs/tiny_imagenet_resnet18.py --workdir runs/tin_r18 \
        --config.data.name=folder:data/tiny-imagenet-200

Data: the tiny-imagenet-200 archive (cs231n.stanford.edu) holds train/<wnid>/images/*.JPEG,
found as is, and val/images/ with val_annotations.txt, which must first be sorted into
val/<wnid>/ (docs/data.md has the five lines that do it). 100,000 training images of 64x64
hold 1.2 GB in memory (under data.max_in_memory_gb), so they are read once and kept.
Cost: not measured here (no GPU lent); counted instead. A ResNet-18 + FPCM forward at 64 px
is 4.49 GFLOP (benchmarks/flops.py; 1.11 at 32 px), so with 2x CIFAR-10's images an epoch
costs about 8x a CIFAR-10 epoch of the same model and attack, and these 100 epochs about 7x
the official 120-epoch CIFAR-10 ResNet-18 run.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "folder:data/tiny-imagenet-200"
    config.data.image_size = 64
    config.data.validation_size = 2000
    config.data.crop_padding = 8          # pad-and-crop at 64 px, as CIFAR's 4 at 32
    config.model.name = "resnet18"
    config.model.normalization = "dataset"  # ImageNet's statistics for your own data
    config.train.epochs = 100
    config.train.lr = 0.1
    config.train.weight_decay = 5e-4
    config.train.schedule = "cosine"
    return config
