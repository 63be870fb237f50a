"""fpcm-jax command line: train, or describe the model a config builds.

    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18          # train
    python main.py --config configs/tiny.py --workdir runs/tiny --config.train.epochs=2
    python main.py --config configs/cifar10_resnet18.py --mode info                 # model only
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "info"], "What to do.")
flags.mark_flags_as_required(["config"])


def describe(config) -> None:
    import jax

    from fpcm_jax import convert, train
    model, spec = train.build_model(config)
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
        raise app.UsageError("--workdir is required for --mode train.")
    from fpcm_jax import data, train
    try:
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
    try:
        sys.exit(main(parse_flags(sys.argv)))
    except app.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
