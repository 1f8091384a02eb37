"""The one disk-backed array store of evaluation: features and tokens as memory-mapped files.

A store is a folder of raw little-endian array files plus a ``meta.json`` that says what they
hold. It is written into a temporary sibling folder and renamed into place only when complete
(:class:`StoreWriter`), so an interrupted extraction never leaves a partial store behind; readers
memory-map the files (:func:`open_arrays`), so only the rows a probe touches are paged in.

Arrays of different shapes (a CNN's stages: other widths and grids per block) live one after the
other in one flat file; :func:`split_flat` gives the per-block views. Without a folder the writer
keeps the arrays in memory (same interface).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["StoreWriter", "open_arrays", "read_meta", "split_flat", "to_tensors"]

META = "meta.json"


def split_flat(flat: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """A flat array holding one C-order array per shape, one after the other -> those arrays (views)."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start : start + size].reshape(tuple(int(v) for v in shape)))
        start += size
    return out


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The ``meta.json`` of a complete store in ``folder``, or ``None`` (absent or unreadable)."""
    path = Path(folder) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def open_arrays(folder: Path, name: str, dtype: Any, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Read-only memory maps of the arrays ``shapes`` stored one after the other in ``folder/name``."""
    flat = np.memmap(Path(folder) / name, dtype=np.dtype(dtype), mode="r")
    return split_flat(flat, shapes)


def to_tensors(arrays: Sequence[np.ndarray]) -> list[Tensor]:
    """Tensors sharing the memory of ``arrays`` (read-only memory maps included, without torch's warning)."""
    with warnings.catch_warnings():  # read-only memmaps: torch warns about non-writable arrays
        warnings.simplefilter("ignore", UserWarning)
        return [torch.from_numpy(a) for a in arrays]


class StoreWriter:
    """Writes a new store at ``folder`` atomically; ``folder=None`` keeps the arrays in memory.

    Use as a context manager: ``arrays`` / ``array`` allocate (memory-mapped) arrays to fill,
    ``commit(meta)`` flushes them, writes ``meta.json`` and renames the temporary folder into
    place (replacing an old store). Leaving the block without a commit removes the temporary folder.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.tmp: Path | None = None
        self._maps: list[np.ndarray] = []

    def __enter__(self) -> StoreWriter:
        if self.folder is not None:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=self.folder.name + ".", suffix=".tmp", dir=self.folder.parent))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._maps.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def array(self, name: str, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        """A writable array of ``shape``, backed by ``name`` in the store (in memory without a folder)."""
        shape = tuple(int(v) for v in shape)
        if self.tmp is None:
            return np.empty(shape, np.dtype(dtype))
        mm = np.memmap(self.tmp / name, dtype=np.dtype(dtype), mode="w+", shape=shape)
        self._maps.append(mm)
        return mm

    def arrays(self, name: str, dtype: Any, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Writable arrays of ``shapes``, stored one after the other in the flat file ``name``."""
        total = sum(int(np.prod(s)) for s in shapes)
        return split_flat(self.array(name, dtype, (total,)), shapes)

    def commit(self, meta: dict[str, Any]) -> None:
        """Flush, write ``meta.json``, move the store into place."""
        if self.tmp is None or self.folder is None:
            return
        for mm in self._maps:
            mm.flush()  # type: ignore[attr-defined]
        self._maps.clear()
        (self.tmp / META).write_text(json.dumps(meta))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        self.tmp = None
