"""Test setup: 4 fake CPU devices (set before JAX starts) and shared helpers.

On a GPU (`JAX_PLATFORMS=cuda python -m pytest`) the tests that need 4 devices are skipped
(`needs_four_devices`); the multi-process tests and the learning checks run their
subprocesses on CPU devices (`cpu_env`).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda runs the suite on a GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU shared with subprocesses

import atexit  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One compilation cache for this test session, shared with the processes the tests start
# (`main.py` runs inherit it through the environment): many tests build the same tiny steps as
# new jitted closures or run the same command again, which XLA would compile again; the cache
# finds them by their HLO. Measured on tests/test_frameworks.py and tests/test_selection.py:
# 199 -> 132 s of CPU time. Same executables, so the same numbers.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="fpcm-jax-tests-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_COMPILE_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from fpcm_jax.runs.checkpoint import path_name  # noqa: E402
from official_weights import synthetic_state_dict  # noqa: E402


# Files in decreasing order of their measured time (2-core CPU, 2026-12-03; seconds per file
# with two workers: multiprocess ~560, train ~250, learning ~230, frameworks ~165, then
# 90-140 each, then under 60), so that the longest start first and the short ones fill in
# around them instead of one long file running alone at the end. pytest.ini turns off
# xdist's own reordering (by number of tests per file), which would undo this order.
LONGEST_FILES = ("test_multiprocess.py", "test_train.py", "test_learning.py",
                 "test_frameworks.py", "test_convert.py", "test_own_model.py",
                 "test_integrity.py", "test_analysis.py", "test_models.py", "test_evaluate.py",
                 "test_cli.py", "test_l2_runs.py", "test_train_rules.py",
                 "test_counting_rules.py", "test_own_data.py", "test_nonfinite.py",
                 "test_report.py", "test_run_record.py",
                 "test_autoattack_checks.py", "test_docs.py", "test_data.py")


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(os.path.basename(str(item.fspath)), len(first)))


needs_four_devices = pytest.mark.skipif(
    jax.device_count() < 4, reason="needs 4 devices (the fake CPU devices of conftest.py)")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def load_official_fixture(name):
    """(fixture arrays, synthetic official state_dict) for 'resnet18' or 'wrn16_2'."""
    arrays = dict(np.load(os.path.join(FIXTURES, f"official_{name}_fpcm.npz")))
    shapes = {key: tuple(shape) for key, shape in json.loads(str(arrays["keys_json"])).items()}
    return arrays, synthetic_state_dict(shapes)


@pytest.fixture(scope="session")
def official_resnet18():
    return load_official_fixture("resnet18")


@pytest.fixture(scope="session")
def official_wrn16_2():
    return load_official_fixture("wrn16_2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(devices: int):
    """This process's environment for a subprocess on `devices` fake CPU devices, outside any
    distributed run (the XLA compilation cache and the other flags kept)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = [flag for flag in env.get("XLA_FLAGS", "").split() if "device_count" not in flag]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


def tiny_config(**changes):
    """configs/tiny.py with widths 8, PGD-2, 2 epochs; changes as section__name=value."""
    from configs import tiny

    config = tiny.get_config()
    config.model.widths = (8, 8, 8, 8)
    config.attack.steps = 2
    config.train.epochs = 2
    config.eval.attack_steps = 1
    config.train.final_test_attack_steps = 1
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def train_tiny_run(workdir):
    """A one-epoch PGD-AT run of a very small tiny-config model; returns its config."""
    from fpcm_jax.training import train

    config = tiny_config(attack__steps=1, train__epochs=1, train__final_test_attack_steps=0)
    train.train_and_evaluate(config, str(workdir))
    return config


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """(workdir, config) of one `train_tiny_run`, trained once for the whole session: read only
    (tests that write into a run take `tiny_run`, a copy)."""
    workdir = tmp_path_factory.mktemp("shared") / "tiny_run"
    return workdir, train_tiny_run(workdir)


@pytest.fixture
def tiny_run(trained_tiny_run, tmp_path):
    """(workdir, config): this test's own copy of the session's tiny trained run."""
    source, config = trained_tiny_run
    workdir = tmp_path / source.name
    shutil.copytree(source, workdir)
    return workdir, config.copy_and_resolve_references()


def read_train_state(workdir, config):
    """The latest training state saved in a run directory, as host arrays."""
    import jax

    from fpcm_jax import experiment
    from fpcm_jax.runs import run_dir
    from fpcm_jax.training import train_step

    model, spec = experiment.build(config)
    tx, _ = train_step.make_optimizer(config.train, 10)
    template = train_step.create_state(model, tx, jax.random.key(0), spec.image_size,
                                       ema=config.train.ema_decay > 0)
    run = run_dir.RunDirectory(workdir, experiment.describe(config))
    state, _ = run.checkpoints.restore_latest(template)
    return jax.device_get(state)


def leaf_differences(found, expected):
    """{leaf name: max |found - expected| / max |expected|} over two trees of arrays."""
    found = {path_name(path): np.asarray(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(found)}
    expected = {path_name(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    assert sorted(found) == sorted(expected)
    return {name: float(np.max(np.abs(found[name] - expected[name])) /
                        max(float(np.max(np.abs(expected[name]))), 1e-30)) for name in expected}


def assert_leaves_close(found, expected, largest, median=1.0):
    """Every leaf's `leaf_differences` at most `largest`, their median at most `median`."""
    differences = leaf_differences(found, expected)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= largest, (f"{worst} differs by {differences[worst]:.3g} of its "
                                           f"largest value (bound {largest})")
    middle = float(np.median(list(differences.values())))
    assert middle <= median, f"the leaves differ by {middle:.3g} (median; bound {median})"
