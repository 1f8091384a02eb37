"""The progress bar every evaluation step shows on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(iterable: Iterable, desc: str, total: int) -> Iterator:
    """tqdm wrapper that is quiet-ish (rare refreshes) when stderr is not a terminal."""
    stream = sys.stderr
    try:
        is_tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced / closed streams
        is_tty = False
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            file=stream,
            dynamic_ncols=is_tty,
            mininterval=0.5 if is_tty else 30.0,
            leave=True,
        )
    )
