"""Shared defaults: the official ResNet-18 + FPCM PGD-AT recipe on CIFAR-10 (as the authors'
train.py).

Every experiment config starts from `get_config()` here and overrides what differs. Any field
can be overridden on the command line, e.g. `--config.train.epochs=10`; an unknown key stops
with an error naming it.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.multihost = False                # True: join the other processes, the cluster
                                            # found by JAX (TPU pod, Slurm, Open MPI); else give
                                            # main.py --coordinator_address/--num_processes/
                                            # --process_id (or $JAX_COORDINATOR_ADDRESS, ...)

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"          # resnet18 | wrn-<depth>-<width> | your own model,
                                            # package.module:Factory (README "Your own model")
    config.model.kwargs = ml_collections.ConfigDict()  # Factory's keyword arguments (own model)
    config.model.fpcm = True                # False: the baseline without FPCM
    config.model.fpcm_variant = "tokens"    # tokens (official) | spatial (2-D radial, ours)
    config.model.cutoff_start = 0.5         # D0 / P at the start of training
    config.model.cutoff_end = 0.125         # D0 / P at the end of training and in evaluation
    config.model.fpcm_alpha = ml_collections.FieldReference(None, field_type=float)  # None:
                                            # learned alpha (the paper's FPCM); a constant in
                                            # [0, 1]: the paper's fixed-alpha ablation
    config.model.fpcm_lowpass = "auto"      # fft | matmul (dense circulant) | auto: same filter,
                                            # auto = matmul for P <= 64 on CPU, else fft
    config.model.dtype = "float32"          # float32 | bfloat16 (mixed precision: float32
                                            # parameters, BN statistics, FPCM filter and loss)
    config.model.activation = "relu"        # relu (official) | swish (the authors' WRN-28-10 recipe)
    config.model.stem = "cifar"             # ResNets: cifar (3x3 conv) | imagenet (7x7/2 + max-pool)
    config.model.normalization = "none"     # none (official ResNet-18) | cifar10 (official WRN) | dataset
    config.model.widths = ml_collections.FieldReference(None, field_type=tuple)  # tiny variants
    config.model.stage_sizes = ml_collections.FieldReference(None, field_type=tuple)

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"            # cifar10 | cifar100 | svhn | imagenette | digits
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
    config.data.download = True             # download the official archive if not prepared
    config.data.source_url = ""             # a mirror's base URL for the training dataset's
                                            # archives (default: the official one)
    config.data.test_sets_url = ""          # a mirror's base URL for CIFAR-10-C/-100-C and
                                            # CIFAR-10.1 (default: the official ones)
    config.data.source_sha256 = ""          # 'file:sha256,...' of non-official files (a bare
                                            # sha256: the training dataset's one archive)
    config.data.prepare = False             # prepare through tfds instead (needs tensorflow-cpu)
    config.data.validation_size = 1000      # held out of the training split for model selection
    # Your own data (data.name = "tfds:NAME[/CONFIG][:VERSION]" or "folder:PATH"; docs/data.md)
    config.data.train_split = "train"       # tfds: the splits (slicing allowed, e.g. train[:90%])
    config.data.test_split = "test"
    config.data.image_key = "image"         # tfds: the features holding images and labels
    config.data.label_key = "label"
    config.data.image_size = ml_collections.FieldReference(None, field_type=int)  # resize to
    #                                         NxN (default: the dataset's own square size)
    config.data.max_in_memory_gb = 4.0      # a split larger than this is streamed, not held
    config.data.streaming = False           # stream the training split even when it fits
    config.data.workers = 2                 # streaming: decoding worker processes (0: none)
    config.data.prefetch = 2                # streaming: batches read ahead
    config.data.flip = True                 # random horizontal flip (not for SVHN)
    config.data.crop_padding = 4            # random crop with zero padding
    config.data.augment = "pad_crop"        # pad_crop (CIFAR's) | random_resized_crop (larger)
    config.data.extra_path = ""             # extra labelled data: an .npz (uint8 NHWC `image`,
                                            # int `label`) or a folder of them, e.g. 1M EDM images
    config.data.extra_fraction = 0.0        # share of each batch drawn from the extra data

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 120
    config.train.batch_size = 128           # global, over all devices and hosts
    config.train.lr = 0.01
    config.train.momentum = 0.9
    config.train.weight_decay = 3.5e-3
    config.train.schedule = "multistep"     # multistep | cosine (both with warm-up)
    config.train.warmup_epochs = 5
    config.train.schedule_per = "epoch"     # epoch (official) | step: LR and cutoff granularity
    config.train.loss = "ce"                # ce (PGD-AT) | trades | mart
    config.train.beta = 6.0                 # TRADES / MART weight
    config.train.trades_attack = "ce"       # ce (official) | kl (TRADES paper); TRADES only
    config.train.trades_l2_attack = "trades"  # the kl attack in L2: trades (the TRADES code:
                                            # SGD lr 2 eps/steps on the normalised gradient,
                                            # box then ball; attack.step_size unused) | pgd
                                            # (normalised steps of attack.step_size, ball then box)
    config.train.mart_attack_start = "uniform"  # MART's attack start: uniform (the FPCM code's
                                            # PGD, which the paper's MART rows used) | normal
                                            # (the MART code: x + 0.001 N(0, 1))
    config.train.eval_every_epochs = 1      # validation clean + PGD accuracy
    config.train.checkpoint_every_steps = 500  # and at every epoch end; 0: epoch ends only
    config.train.final_test_attack_steps = 20  # test-split PGD-N at the end (0: clean only)
    config.train.stop_after_steps = 0       # >0: save and stop after this many steps (resumable)
    config.train.label_smoothing = 0.0      # on the loss's cross-entropy terms (0.1: authors' WRN)
    config.train.nesterov = False           # Nesterov momentum (PyTorch's SGD(nesterov=True))
    config.train.awp_gamma = 0.0            # AWP (Wu et al. 2020); 0: off. Official: 0.01 with
                                            # PGD-AT, 0.005 with TRADES (csdongxian/AWP)
    config.train.awp_warmup_epochs = 0      # epochs without AWP first. Official: 0 with PGD-AT; 10
                                            # with TRADES (its `epoch >= 10`, epochs counted from
                                            # 1, leaves 9 out: set 9 to match it exactly)
    config.train.ema_decay = 0.0            # weight averaging (EMA) tau; 0: off. As the authors'
                                            # code (DM-Improves-AT): decay 0 for the first
    config.train.ema_warmup_fraction = 0.025  # this share of training, then min(tau, (1+d)/(10+d))
    config.train.ema_batch_stats = "copy"   # copy: the model's own running statistics (authors'
                                            # code) | average: EMA them too

    config.attack = ml_collections.ConfigDict()  # the training attack
    config.attack.norm = "linf"             # linf | l2: the threat model of training, validation
                                            # and --mode eval (configs/cifar10_resnet18_l2.py)
    config.attack.eps = 8 / 255             # L2: 0.5 (RobustBench's and AutoAttack's L2 radius)
    config.attack.step_size = 2 / 255       # also the default step of --mode eval's pgdN, cwN.
                                            # L2: 0.1 = 2 eps / 10 steps, the TRADES code's L2
                                            # step rule (normalised-gradient steps)
    config.attack.steps = 10                # 0: standard (non-adversarial) training
    config.attack.bn_mode = "train"         # train (official) | batch_stats_frozen | eval
    config.attack.loop = "auto"             # unrolled | fori (lax.fori_loop) | auto: unrolled
                                            # on CPU up to 100 steps (3x faster there), else fori

    config.analysis = ml_collections.ConfigDict()  # main.py --mode analyze
    config.analysis.num_examples = 1000     # test images for alpha, noise and filter analyses
    config.analysis.bands = 8               # rings of the 2-D spectrum for band-limited noise
    config.analysis.noise_l2_norm = 4.0     # L2 norm of each noise image (32x32x3: ~0.04/pixel)
    config.analysis.filter_steps = 10       # cutoff radii for filtered-input accuracy
    config.analysis.heatmap_examples = 100  # images per Fourier heat-map cell
    config.analysis.heatmap_l2_norm = 4.0   # L2 norm of the Fourier basis perturbation
    config.analysis.feature_examples = 64   # images for the feature spectra

    config.logging = ml_collections.ConfigDict()  # besides metrics.jsonl
    config.logging.tensorboard = True       # TensorBoard events in <workdir>/tensorboard/
    config.logging.alpha_examples = 256     # validation images for the alpha histograms
    config.logging.curves = True            # curves.png at the end of training

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256
    config.eval.use_ema = True              # with train.ema_decay > 0: validate, select, test
                                            # and save best models with the EMA weights
    config.eval.attack_steps = 10           # validation PGD during training
    config.eval.autoattack_fitted_batches = True  # AutoAttack pads a stage's last batch only to
                                            # a power of two that fits it (False: to batch_size,
                                            # one compiled shape per stage); same results
    return config
