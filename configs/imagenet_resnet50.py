"""ResNet-50 + FPCM (ImageNet stem, FPCM after each of its 4 stages) trained with PGD-AT on
ImageNet at 224 px, eps 4/255 (the RobustBench ImageNet L-inf board's radius), from
tensorflow-datasets' imagenet2012 prepared as ArrayRecord.

    tfds build imagenet2012 --file_format=array_record --data_dir=DATA_DIR   # once, manual
    python main.py --config configs/imagenet_resnet50.py --workdir runs/in_r50 \
        --config.data.data_dir=DATA_DIR

Data: 1.28 M training images (193 GB decoded at 224 px) do not fit data.max_in_memory_gb, so
they are streamed with Grain (data.workers decode processes per host, each host its shard);
the 50,000 validation images are the test split, read batch by batch.
Cost: not measured here (no GPU lent); counted instead. A forward of ResNet-50 + FPCM at 224
px is 8.32 GFLOP (benchmarks/flops.py: 8.18 without FPCM); a step runs per image one clean
forward, two attack forward-backward passes and one adversarial forward-backward, about 10
forwards, so an epoch is about 1.28 M x 83 GFLOP = 1.1e17 FLOP and the 30 epochs 3.2e18: at a
sustained 100 TFLOP/s, about 9 hours. Use several GPUs or hosts (docs/multihost.md).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "tfds:imagenet2012"
    config.data.train_split = "train"
    config.data.test_split = "validation"
    config.data.image_size = 224
    config.data.validation_size = 10000
    config.data.augment = "random_resized_crop"
    config.model.name = "resnet50"
    config.model.stem = "imagenet"
    config.model.normalization = "dataset"
    config.model.dtype = "bfloat16"
    config.attack.eps = 4 / 255
    config.attack.step_size = 2 / 255
    config.attack.steps = 2
    config.train.epochs = 30
    config.train.batch_size = 512
    config.train.lr = 0.2
    config.train.weight_decay = 1e-4
    config.train.schedule = "cosine"
    config.train.warmup_epochs = 2
    config.eval.batch_size = 256
    return config
