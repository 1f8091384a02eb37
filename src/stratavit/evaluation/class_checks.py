"""The labels of the classification probes: matched by class name, and checked for what makes a score meaningless.

An ImageFolder numbers its classes by their sorted folder names, each folder on its own: a test
set holding only ``dog/`` and ``horse/`` of a train set's ``cat/ dog/ horse/`` labels ``dog`` 0,
which the train set calls ``cat``, and every kNN / linear score would be computed against the
wrong classes without a sound. :func:`align_test_labels` matches the test labels to the train
labels by class name instead (a test class the train set lacks gets a label of its own, which no
probe can predict). :func:`class_warnings` then says when a classification score means nothing:
one class in the train set (every prediction is that class: 100 %), fewer than two test classes
that the train set knows, or test images of classes the train set lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stratavit.data.datasets import ImageFolderDataset

__all__ = ["Relabelled", "align_test_labels", "class_names", "class_warnings"]


def class_names(ds: Dataset) -> list[str] | None:
    """The class names of a (possibly wrapped) labelled data set, if it has them."""
    while not hasattr(ds, "classes") and hasattr(ds, "dataset"):
        ds = ds.dataset  # type: ignore[attr-defined]
    names = getattr(ds, "classes", None)
    return [str(c) for c in names] if names else None


def _is_flat_folder(ds: Dataset) -> bool:
    """A flat folder of images (no class folders): one pseudo-class named after the folder."""
    while not isinstance(ds, ImageFolderDataset) and hasattr(ds, "dataset"):
        ds = ds.dataset  # type: ignore[attr-defined]
    return isinstance(ds, ImageFolderDataset) and all(Path(p).parent == ds.root for p, _ in ds.samples[:1])


class Relabelled(Dataset):
    """``base`` with its labels mapped through ``mapping`` (old label -> new label); ``classes``
    lists the new labels' names."""

    def __init__(self, base: Dataset, mapping: Sequence[int], classes: Sequence[str]) -> None:
        self.dataset = base
        self.mapping = list(mapping)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, y = self.dataset[index]
        return x, self.mapping[int(y)]


def align_test_labels(train_ds: Dataset, test_ds: Dataset) -> tuple[Dataset, list[int] | None]:
    """``test_ds`` with its labels numbered as the train set numbers the same class names.

    Returns ``(test set, mapping)``: ``mapping`` (test label -> train label, a class the train
    set lacks numbered after the train classes) when the class lists differ, else ``None`` and
    ``test_ds`` itself (also when either set has no class names or is a flat folder).
    """
    train_names, test_names = class_names(train_ds), class_names(test_ds)
    if not train_names or not test_names or train_names == test_names:
        return test_ds, None
    if _is_flat_folder(train_ds) or _is_flat_folder(test_ds):
        return test_ds, None
    index = {name: i for i, name in enumerate(train_names)}
    extra = [n for n in test_names if n not in index]
    for j, name in enumerate(extra):
        index[name] = len(train_names) + j
    mapping = [index[n] for n in test_names]
    return Relabelled(test_ds, mapping, [*train_names, *extra]), mapping


def _names(ids: Sequence[int], names: Sequence[str] | None) -> str:
    shown = [names[i] if names is not None and i < len(names) else str(i) for i in ids[:5]]
    return ", ".join(shown) + (" ..." if len(ids) > 5 else "")


def class_warnings(train_labels: Tensor, test_labels: Tensor, names: Sequence[str] | None = None) -> list[str]:
    """One-line warnings when the classification scores are meaningless or biased by the classes.

    ``train_labels`` ``(N,)``, ``test_labels`` ``(M,)``: int labels (the test set's aligned to the
    train set's); ``names``: class names by label.
    """
    train_ids = sorted(int(c) for c in torch.unique(train_labels))
    test_ids = sorted(int(c) for c in torch.unique(test_labels))
    shared = [c for c in test_ids if c in set(train_ids)]
    out = []
    if len(train_ids) < 2:
        out.append(
            f"the train set has a single class ({_names(train_ids, names)}): kNN and linear top-1 are meaningless "
            "(every prediction is that class); evaluate on a set with two or more class folders"
        )
    elif len(shared) < 2:
        out.append(
            f"the test set has {len(shared)} class(es) that the train set has ({_names(shared, names) or 'none'}): "
            "kNN and linear top-1 are meaningless with fewer than two; test on a set with two or more of the "
            "train set's classes"
        )
    missing = [c for c in test_ids if c not in set(train_ids)]
    if missing and len(train_ids) >= 2:
        count = int(sum(int((test_labels == c).sum()) for c in missing))
        out.append(
            f"{count} test image(s) belong to {len(missing)} class(es) the train set lacks ({_names(missing, names)}); "
            "no probe can predict them, so they count as errors"
        )
    return out
