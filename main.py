"""fpcm-jax command line: train, evaluate, or describe the model a config builds.

    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18          # train
    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18 --mode eval --attack pgd50
    python main.py --config configs/cifar10_resnet18.py --mode eval --attack autoattack \
        --checkpoint runs/official_r18 --workdir runs/official_r18
    python main.py --config configs/tiny.py --mode analyze --checkpoints runs/a,runs/b --workdir runs/an
    python main.py --config configs/cifar10_resnet18.py --mode info                 # model only
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "analyze", "info"], "What to do.")
flags.DEFINE_string("attack", "pgd20", "eval: attack name or comma list (none, fgsm, pgdN, cwN, "
                    "apgd-ce, apgd-t, fab-t, square, autoattack).")
flags.DEFINE_string("checkpoint", None, "eval: checkpoint directory (default: the workdir's "
                    "best_robust/, else best_sum/).")
flags.DEFINE_float("eps", None, "eval: L-inf radius (default: config.attack.eps = 8/255).")
flags.DEFINE_integer("num_examples", None, "eval: the first N examples (default: all).")
flags.DEFINE_integer("batch_size", None, "eval: batch size (default: config.eval.batch_size).")
flags.DEFINE_integer("seed", 0, "eval: random seed of the attacks.")
flags.DEFINE_enum("split", "test", ["test", "validation", "train"], "eval: which split.")
flags.DEFINE_list("checkpoints", None, "analyze: run directories or checkpoints, comma list.")
flags.DEFINE_list("labels", None, "analyze: a label per checkpoint (default: the run names).")
flags.mark_flags_as_required(["config"])


def describe(config) -> None:
    import jax

    from fpcm_jax import convert, models
    model, spec = models.build(config)
    params = convert.variables_template(model, spec.image_size)["params"]
    count = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    print(f"{config.model.name} (FPCM: {config.model.fpcm}) for {config.data.name}: "
          f"{count:,} parameters; {jax.device_count()} device(s): {jax.devices()[0].platform}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = FLAGS.config
    if FLAGS.mode == "info":
        describe(config)
        return 0
    if not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for --mode {FLAGS.mode}.")
    from fpcm_jax import data, evaluate, train
    try:
        if FLAGS.mode == "analyze":
            from fpcm_jax import analysis
            if not FLAGS.checkpoints:
                raise ValueError("--mode analyze needs --checkpoints A,B,...")
            result = analysis.run_analysis(config, FLAGS.checkpoints, FLAGS.workdir, FLAGS.labels)
            print(f"Wrote {result['path']} and {', '.join(result['figures'])}")
            return 0
        if FLAGS.mode == "eval":
            names = evaluate.parse_attack_names(FLAGS.attack)
            evaluate.run_evaluation(config, FLAGS.workdir, names, FLAGS.checkpoint,
                                    FLAGS.num_examples, FLAGS.batch_size, FLAGS.eps, FLAGS.seed,
                                    FLAGS.split)
            return 0
        result = train.train_and_evaluate(config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, data.DatasetError, train.TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 143 if result.get("reason") == "SIGTERM" else 0  # 128 + SIGTERM, as if killed


def parse_flags(argv):
    """Parse flags; a bad flag or an unknown config key is one line on stderr, exit code 2."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # config_flags defers a config file's load errors to first use
        return remaining
    except OSError as error:
        message = str(error).strip().splitlines()[-1].strip()
        message = f"cannot load the --config file: {message}"
    except flags.Error as error:
        message = f"{error}. See --helpfull."
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a missing key
        key = str(error).strip("\"'")
        culprit = [arg for arg in argv if arg.startswith("--config.") and key in arg]
        where = f" in {culprit[0]}" if culprit else ""
        message = (f"unknown config key {key!r}{where}; configs/default.py lists every key "
                   f"with its meaning.")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    from fpcm_jax import parallel
    parallel.set_default_xla_flags()  # before JAX starts its backends
    try:
        sys.exit(main(parse_flags(sys.argv)))
    except app.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
