"""Where the test suite's time goes: a pytest plugin that records each test, and its summary.

Record (every worker appends one JSON line per test to SUITE_PROFILE_DIR/<worker>.jsonl; the
default folder is fpcm_jax_suite_profile in the temporary directory; empty it between runs):

    SUITE_PROFILE_DIR=/tmp/suite PYTHONPATH=benchmarks PYTEST_ADDOPTS="-p suite_profile" \
        .venv/bin/python -m pytest

Summarise (per file, then the costliest tests):

    python benchmarks/suite_profile.py /tmp/suite

Per test, setup and teardown included: `wall` seconds, `cpu` (the worker process, all its
threads), `children` (the CPU of the processes the test started and waited for) and `compile`
(XLA backend compile time reported by JAX; a wall time, so an upper bound on its CPU).
"""

import collections
import glob
import json
import os
import resource
import sys
import tempfile
import time

import pytest

DEFAULT_FOLDER = os.path.join(tempfile.gettempdir(), "fpcm_jax_suite_profile")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_seconds = [0.0]
_listening = [False]


def _on_duration(event, duration, **_):
    if event == COMPILE_EVENT:
        _compile_seconds[0] += duration


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _listening[0]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
    start = (time.time(), time.process_time(), _children_cpu(), _compile_seconds[0])
    yield
    record = {"test": item.nodeid, "wall": time.time() - start[0],
              "cpu": time.process_time() - start[1], "children": _children_cpu() - start[2],
              "compile": _compile_seconds[0] - start[3]}
    folder = os.environ.get("SUITE_PROFILE_DIR", DEFAULT_FOLDER)
    os.makedirs(folder, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(folder, f"{worker}.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")


FIGURES = ("wall", "cpu", "children", "compile")


def summarise(folder: str, top: int = 30) -> str:
    records = [json.loads(line) for path in sorted(glob.glob(os.path.join(folder, "*.jsonl")))
               for line in open(path)]
    if not records:
        raise SystemExit(f"{folder} holds no *.jsonl records; run the suite with the plugin.")
    totals = {name: sum(record[name] for record in records) for name in FIGURES}
    lines = [f"{len(records)} tests; seconds: " +
             ", ".join(f"{name} {totals[name]:.0f}" for name in FIGURES), "",
             f"{'file':32s}" + "".join(f"{name:>9s}" for name in FIGURES)]
    files = collections.defaultdict(collections.Counter)
    for record in records:
        files[record["test"].split("::")[0]].update({name: record[name] for name in FIGURES})
    cost = lambda figures: figures["cpu"] + figures["children"]
    for name, figures in sorted(files.items(), key=lambda item: -cost(item[1]))[:top]:
        lines.append(f"{os.path.basename(name):32s}" +
                     "".join(f"{figures[figure]:9.0f}" for figure in FIGURES))
    lines += ["", "".join(f"{name:>9s}" for name in FIGURES) + "  test"]
    for record in sorted(records, key=lambda record: -cost(record))[:top]:
        lines.append("".join(f"{record[name]:9.0f}" for name in FIGURES) + "  " +
                     record["test"])
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_FOLDER))
