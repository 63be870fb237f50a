"""Reading a checkpoint that may be damaged, with the damage reported once, in our own words.

Besides raising, orbax and TensorStore log a failed read through absl and asyncio, and reads
still in flight print tracebacks from other threads after the failure (onto an event loop
already closed). `reading_quietly()` silences exactly those reports while a read runs, and
after a failed read waits briefly for the Python threads the read started; then every hook and
logger level is put back as it was. TensorStore's own threads can still report after that;
a program that owns its process (main.py) drops those with `drop_late_read_reports()`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
import warnings
from typing import Iterator

STRAY_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array")
STRAGGLER_WAIT_SECONDS = 2.0  # at most, after a failed read only
QUIET_LOGGERS = ("absl", "asyncio")


def first_line(error: BaseException) -> str:
    """The gist of a library's error: its first line, without TensorStore's spec dump."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    return f"{type(error).__name__}: {text[:160]}".rstrip(": ")


def _is_stray(value: object) -> bool:
    return any(text in str(value) for text in STRAY_READ_ERRORS)


def _install_filters() -> tuple:
    """Filter the late reports of failed reads out of the interpreter's exception hooks
    (everything else still reaches the hooks there were); returns those hooks."""
    saved = sys.excepthook, sys.unraisablehook, threading.excepthook

    def excepthook(kind, value, traceback):
        if not _is_stray(value):
            saved[0](kind, value, traceback)

    def unraisablehook(report):
        if not _is_stray(report.exc_value):
            saved[1](report)

    def threading_excepthook(arguments):
        if not _is_stray(arguments.exc_value):
            saved[2](arguments)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    threading.excepthook = threading_excepthook
    return saved


def drop_late_read_reports() -> None:
    """For the rest of this process: drop the reports that reads which failed earlier make
    late, from TensorStore's threads, and the asyncio logger's copies of them. For a program
    that owns its process (main.py calls it at start-up); the library never calls it."""
    _install_filters()
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)


@contextlib.contextmanager
def _stray_reports_dropped() -> Iterator[None]:
    """The interpreter's exception hooks, minus the late reports of a failed read."""
    saved = _install_filters()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                    category=RuntimeWarning)
            yield
    finally:
        sys.excepthook, sys.unraisablehook, threading.excepthook = saved


def _wait_for_stragglers(threads_before: set) -> None:
    """Let the threads a failed read started finish their reports (bounded), and collect the
    coroutines it left, while the filters are still in place."""
    deadline = time.time() + STRAGGLER_WAIT_SECONDS
    for thread in threading.enumerate():
        if thread not in threads_before and thread is not threading.current_thread():
            thread.join(max(deadline - time.time(), 0.0))
    gc.collect()


@contextlib.contextmanager
def reading_quietly() -> Iterator[None]:
    """Around one checkpoint read: its own failure reports silenced, everything else as is."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    threads_before = set(threading.enumerate())
    with _stray_reports_dropped():
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        except Exception:
            _wait_for_stragglers(threads_before)
            raise
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
