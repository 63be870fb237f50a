"""Files written whole or not at all: the one way fpcm-jax writes a file that others read.

Content goes to `<path>.<pid>-<random>.partial`, a name no other writer uses, is flushed to
disk, then takes its name with one rename, so a reader (or a run resumed after a crash) sees the
old file or the new one, never half of one, and several processes writing one path at once each
write whole (the last rename wins). A failure removes the partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any, Iterator

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def written_whole(path: str, mode: str = "w") -> Iterator[Any]:
    """`with written_whole(path, "wb") as handle:` writes `path` atomically."""
    partial = f"{path}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    try:
        with open(partial, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_json(path: str, content: Any, indent: int = 2) -> None:
    """A JSON file, written whole or not at all."""
    with written_whole(path) as handle:
        json.dump(content, handle, indent=indent)


def append_json_line(path: str, record: Any) -> None:
    """One more line of a JSON-lines history (metrics.jsonl, evaluations.jsonl)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
