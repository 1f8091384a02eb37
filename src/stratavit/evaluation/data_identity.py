"""A fingerprint of the data an evaluation read, so ``compare`` can tell the same data from other data.

Two runs evaluated on ``/data/cifar/test`` on two machines read the same images; two runs
evaluated on ``data/test`` a week apart may not. :func:`dataset_fingerprint` hashes what decides
the numbers -- the class names, every sample's path relative to the set's root and its label, and
the subset taken (``--test-limit``, seed) -- without reading an image (no ``stat`` either, so it
stays cheap on a network file system with a million files). It is recorded in ``results.json``
(``meta.train_fingerprint`` / ``meta.test_fingerprint``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from stratavit.data.datasets import ImageFolderDataset
from stratavit.evaluation.class_checks import Relabelled

__all__ = ["dataset_fingerprint"]


def _update(h: Any, ds: Dataset) -> None:
    if isinstance(ds, Subset):
        _update(h, ds.dataset)
        h.update(("subset:" + ",".join(str(int(i)) for i in ds.indices)).encode())
        return
    if isinstance(ds, Relabelled):
        _update(h, ds.dataset)
        h.update(("labels:" + ",".join(map(str, ds.mapping))).encode())
        return
    h.update(type(ds).__name__.encode())
    h.update(("classes:" + "\x1f".join(str(c) for c in getattr(ds, "classes", []) or [])).encode())
    if isinstance(ds, ImageFolderDataset):
        for path, label in ds.samples:
            h.update(f"{os.path.relpath(path, ds.root)}\x1f{label}\x1e".encode())
        return
    index = getattr(ds, "index", None)
    if index is not None and hasattr(index, "shards"):  # a shard folder: its index names every shard and count
        h.update(f"shards:{index.shards}:{getattr(index, 'counts', '')}:{index.total}".encode())
    h.update(f"len:{len(ds)}".encode())  # type: ignore[arg-type]
    root = getattr(ds, "root", None)
    if root is not None and not isinstance(ds, ImageFolderDataset):  # a torchvision set: its split is in the class
        h.update(f"train:{getattr(ds, 'train', getattr(ds, 'split', ''))}:{Path(str(root)).name}".encode())


def dataset_fingerprint(ds: Dataset) -> str:
    """A short hex digest of the samples (names relative to the root, labels, classes, subset) of ``ds``."""
    h = hashlib.sha1()
    _update(h, ds)
    return h.hexdigest()[:16]
