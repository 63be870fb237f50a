"""Progress output: bars on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, which fill log files with clutter, so bars are
shown only when stdout is a terminal; callers print a plain line at the end of each unit of
work instead (`interactive()` says which). Lines printed while a bar is shown go through
`say`, which writes them above the bar instead of onto it.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm


def interactive() -> bool:
    return sys.stdout.isatty()


def bar(total: Optional[int], desc: str, enabled: bool = True, initial: int = 0,
        **options) -> tqdm:
    """A progress bar on stdout, silent unless enabled and stdout is a terminal (options go to
    tqdm, e.g. unit="B")."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not (enabled and interactive()),
                dynamic_ncols=True, file=sys.stdout, **options)


def say(message: str) -> None:
    """Print a line (above any progress bar being shown)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
