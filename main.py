"""fpcm-jax command line: train, evaluate, analyse, compare runs, or describe a config's model.

    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18          # train
    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18 --mode eval --attack pgd50
    python main.py --config configs/cifar10_resnet18_l2.py --workdir runs/r18_l2    # L2 PGD-AT
    python main.py --config configs/cifar10_resnet18.py --workdir runs/r18 --mode eval --norm l2
    python main.py --config configs/cifar10_resnet18.py --mode eval --attack autoattack
        --checkpoint runs/official_r18 --workdir runs/official_r18    # (one command)
    python main.py --config configs/tiny.py --mode analyze --checkpoints runs/a,runs/b --workdir runs/an
    python main.py --config configs/tiny.py --mode report --checkpoints runs/a,runs/b --workdir runs/table
    python main.py --config configs/cifar10_resnet18.py --mode export --checkpoint runs/r18 --out r18.pt
    python main.py --config configs/cifar10_resnet18.py --mode info                 # model only

Several processes (hosts): the same command on each, with --coordinator_address HOST:PORT
--num_processes K --process_id I (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
$JAX_PROCESS_ID; or --config.multihost=True where JAX detects the cluster: TPU, Slurm).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "analyze", "report", "export", "info"],
                  "train (or resume) in --workdir; eval: attack a trained model; analyze: "
                  "frequency analyses of --checkpoints; report: the comparison table of the "
                  "run directories --checkpoints (seeds as mean ± std) in --workdir; export: "
                  "--checkpoint as the official PyTorch state_dict in --out; info: describe "
                  "the model only.")
flags.DEFINE_string("attack", "pgd20", "eval: attack name or comma list (none, fgsm, fgm, pgdN, "
                    "cwN, apgd-ce, apgd-t, fab-t, square, autoattack), or corruptions (common "
                    "corruptions of CIFAR-10/100: CIFAR-10-C, CIFAR-100-C).")
flags.DEFINE_list("corruptions", None, "eval, --attack corruptions: which (default: all 19; "
                  "the mean is over the 15 standard ones).")
flags.DEFINE_list("severities", None, "eval, --attack corruptions: which of 1-5 (default all).")
flags.DEFINE_string("checkpoint", None, "eval, export: a model checkpoint or a run directory "
                    "(default: the workdir's best_robust/, else best_sum/); eval also takes an "
                    "official PyTorch file (.pt, .pth, .npz) of --config.model.name.")
flags.DEFINE_string("out", None, "export: the file to write, model.pt (PyTorch zip format, written without torch) or model.npz.")
flags.DEFINE_string("norm", None, "eval: threat model, linf or l2 (default: "
                    "config.attack.norm, linf).")
flags.DEFINE_float("eps", None, "eval: radius in --norm (default: config.attack.eps when --norm "
                   "is the config's, else the norm's usual one: linf 8/255, l2 0.5).")
flags.DEFINE_float("step_size", None, "eval: step of pgdN and cwN (default: "
                   "config.attack.step_size when --norm is the config's; else linf 2/255, "
                   "l2 0.1).")
flags.DEFINE_integer("num_examples", None, "eval: the first N examples (default: all).")
flags.DEFINE_integer("batch_size", None, "eval: batch size (default: config.eval.batch_size).")
flags.DEFINE_integer("seed", 0, "eval: random seed of the attacks.")
flags.DEFINE_enum("split", "test", ["test", "validation", "train", "cifar10.1"],
                  "eval: which split (cifar10.1: CIFAR-10.1 v6, a new CIFAR-10 test set).")
flags.DEFINE_bool("allow_fallback", False, "eval/analyze: when a run directory's best_robust/ "
                  "is damaged, load its best_sum/ (with a warning) instead of stopping.")
flags.DEFINE_list("checkpoints", None, "analyze: run directories or checkpoints; report: run "
                  "directories; comma list.")
flags.DEFINE_list("labels", None, "analyze: a label per checkpoint (default: the run names).")
flags.DEFINE_string("coordinator_address", None, "several processes: HOST:PORT of process 0's "
                    "coordinator (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "several processes: how many (default: "
                     "$JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "several processes: this one's index, 0 to K-1 "
                     "(default: $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config"])


def describe(config) -> None:
    import jax

    from fpcm_jax import experiment, models
    model, spec = experiment.build(config)
    params = models.variables_template(model, spec.image_size)["params"]
    count = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    fpcm = "" if ":" in config.model.name else f" (FPCM: {config.model.fpcm})"  # own model
    print(f"{config.model.name}{fpcm} for {config.data.name}: {count:,} parameters; "
          f"{jax.device_count()} device(s): {jax.devices()[0].platform}.")


def model_overrides(argv, config):
    """The model fields given on the command line (--config.model.X=...), with their values."""
    prefix = "--config.model."
    fields = {arg[len(prefix):].split("=")[0] for arg in argv if arg.startswith(prefix)}
    return {field: config.model[field] for field in fields if field in config.model}


def settle_config(argv, config) -> None:
    """What the flags mean beyond their values: `--config.S.F=None` unsets a tuple field
    (ml_collections parses it as (None,)), and an import-path model named on the command line
    drops the registry-model fields that the config file set (one line says which)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("--config.") and value.strip() == "None":
            *sections, field = key[len("--config."):].split(".")
            parent = config
            for section in sections:
                parent = parent[section]
            if isinstance(parent[field], (tuple, list)) and list(parent[field]) == [None]:
                parent[field] = None
    from fpcm_jax import experiment  # no backend starts; imported after the flags
    dropped = experiment.give_way_to_import_path(config, list(model_overrides(argv, config)))
    if dropped:
        fields = ", ".join(f"{field}={value!r}" for field, value in dropped.items())
        print(f"note: {config.model.name} is your own model: the config file's registry-model "
              f"fields {fields} were dropped (its options come from config.model.kwargs).")


def run_mode(mode: str, config, overrides) -> int:
    """Check the mode's options (training.checks or evaluation.checks, once), then run it;
    the exit code."""
    from fpcm_jax import parallel  # after flags
    from fpcm_jax.training import checks as training_checks
    from fpcm_jax.evaluation import checks as evaluation_checks
    from fpcm_jax.evaluation import analysis, evaluate
    from fpcm_jax.runs import export
    from fpcm_jax.training import train
    if mode == "info":
        describe(config)
    elif mode == "analyze":
        evaluation_checks.check_analysis(config, FLAGS.checkpoints, FLAGS.labels)
        result = analysis.run_analysis(config, FLAGS.checkpoints, FLAGS.workdir, FLAGS.labels,
                                       overrides, FLAGS.allow_fallback)
        if parallel.is_main_process():
            print(f"Wrote {result['path']} and {', '.join(result['figures'])}")
    elif mode == "export":
        info = export.export(FLAGS.checkpoint or FLAGS.workdir, FLAGS.out)
        if parallel.is_main_process():
            print(f"Wrote {FLAGS.out} ({info['name']}, official PyTorch state_dict) and "
                  f"{FLAGS.out}.json (its model).")
    elif mode == "eval":
        severities = _integers(FLAGS.severities, "--severities")
        names = evaluation_checks.check_evaluation(config, FLAGS.attack, FLAGS.num_examples,
                                               FLAGS.batch_size, FLAGS.eps, FLAGS.step_size,
                                               FLAGS.norm, FLAGS.split, FLAGS.corruptions,
                                               severities)
        evaluate.run_evaluation(config, FLAGS.workdir, names, FLAGS.checkpoint,
                                FLAGS.num_examples, FLAGS.batch_size, FLAGS.eps, FLAGS.seed,
                                FLAGS.split, step_size=FLAGS.step_size,
                                model_overrides=overrides, allow_fallback=FLAGS.allow_fallback,
                                norm=FLAGS.norm,
                                corruption_options={"names": FLAGS.corruptions,
                                                    "severities": severities})
    else:
        training_checks.check_training(config)
        result = train.train_and_evaluate(config, FLAGS.workdir)
        return 143 if result.get("reason") == "SIGTERM" else 0  # 128 + SIGTERM, as if killed
    return 0


def _integers(values, flag: str):
    """A flag's list of integers (None when not given); a one-line error otherwise."""
    if values is None:
        return None
    try:
        return [int(value) for value in values]
    except ValueError:
        raise ValueError(f"{flag}={','.join(values)}: give integers, e.g. 1,3,5.") from None


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = FLAGS.config
    if FLAGS.mode not in ("info", "export") and not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for --mode {FLAGS.mode}.")
    if FLAGS.mode == "export" and not (FLAGS.out and (FLAGS.checkpoint or FLAGS.workdir)):
        raise app.UsageError("--mode export needs --out model.pt|model.npz and --checkpoint "
                             "(a checkpoint or run directory).")
    if FLAGS.mode == "report":
        return run_report()
    from fpcm_jax import parallel, quiet_reads  # none of them starts a backend
    from fpcm_jax.data import datasets
    from fpcm_jax.training import train
    quiet_reads.drop_late_read_reports()  # a damaged checkpoint is reported once, as one line
    try:
        parallel.setup(config.multihost, FLAGS.coordinator_address, FLAGS.num_processes,
                       FLAGS.process_id)
        return run_mode(FLAGS.mode, config, overrides)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, datasets.DatasetError,
            train.TrainingError, parallel.SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run_report() -> int:
    """--mode report: it only reads files, so no JAX (nor its start-up) is needed."""
    from fpcm_jax.reports import report
    try:
        result = report.write_report(FLAGS.checkpoints or [], FLAGS.workdir)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {', '.join(result['files'])}")
    return 0


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def print_help(full: bool) -> None:
    """The modes and flags (--helpfull: also every config key with its default)."""
    print(__doc__.strip())
    print(f"\nFlags:\n{FLAGS.module_help(sys.modules[__name__])}")
    if full:
        from configs import default
        print("\nConfig keys (configs/default.py; set one with --config.SECTION.KEY=VALUE, "
              "e.g. --config.train.epochs=10):")
        print(default.get_config())
    else:
        print("\n--helpfull also lists every config key with its default.")


def parse_flags(argv):
    """Parse flags; a bad flag or an unknown config key is one line on stderr, exit code 2."""
    asked = [arg.split("=")[0] for arg in argv[1:] if arg.split("=")[0] in HELP_FLAGS]
    if asked:
        try:
            print_help(full="--helpfull" in asked)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `main.py --help | head`: the reader has had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
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
        remaining = parse_flags(sys.argv)
        settle_config(sys.argv, FLAGS.config)
        sys.exit(main(remaining, model_overrides(sys.argv, FLAGS.config)))
    except app.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
