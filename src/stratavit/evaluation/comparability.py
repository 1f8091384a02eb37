"""What a number of ``results.json`` depends on besides the model: its basis, for ``compare``.

A kNN top-1 is comparable to another only when both were measured on the same train and test
images (and classes), at the same size and resize policy, with the same k and temperature, on
the same weights (teacher / student) and seed. Each built-in ``compare`` column names its basis
(:attr:`~stratavit.evaluation.protocol.Column.basis`), a mapping ``{setting: value}`` read from
``results.json``; ``compare`` flags a column where two runs' bases differ
(:mod:`stratavit.evaluation.compare_flags`). A setting an older ``results.json`` lacks is None:
unknown, never counted as a difference.

Data sets are :class:`DataSet` values: equal when their fingerprints are (a different path to the
same images is the same data), by path when a fingerprint is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stratavit.evaluation.tables import dig

__all__ = [
    "DataSet",
    "correspondence_basis",
    "dense_basis",
    "detection_basis",
    "knn_basis",
    "linear_basis",
    "probe_data_basis",
    "retrieval_basis",
]


@dataclass(frozen=True, eq=False)
class DataSet:
    """A data set as ``results.json`` records it: the path given and the fingerprint (if any)."""

    path: str
    fingerprint: str | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataSet):
            return NotImplemented
        if self.fingerprint is not None and other.fingerprint is not None:
            return self.fingerprint == other.fingerprint
        return self.path == other.path

    __hash__ = None  # type: ignore[assignment]  # equality is not transitive across missing fingerprints

    def __str__(self) -> str:
        return f"`{self.path}`" + (f" ({self.fingerprint[:8]})" if self.fingerprint else "")


def _data(where: Mapping[str, Any] | None, key: str) -> DataSet | None:
    path = dig(where, key)
    if path is None:
        return None
    fp = dig(where, f"{key}_fingerprint")
    return DataSet(str(path), None if fp is None else str(fp))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def probe_data_basis(results: Mapping[str, Any], *, model: bool = True) -> dict[str, Any]:
    """What every classification number depends on: the train / test data, their sizes and classes,
    the evaluation size and resize policy, the seed, and (``model``) which weights were evaluated."""
    meta = results.get("meta") if isinstance(results.get("meta"), Mapping) else {}
    basis: dict[str, Any] = {
        "train set": _data(meta, "train"),
        "test set": _data(meta, "test"),
        "train images": dig(meta, "train_images"),
        "test images": dig(meta, "test_images"),
        "classes": dig(meta, "classes"),
        "evaluation size (px)": dig(meta, "img_size"),
        "resize": dig(meta, "resize"),
        "seed": dig(meta, "seed"),
    }
    if model:
        basis["weights"] = dig(meta, "weights")
    return basis


def knn_basis(results: Mapping[str, Any], *, model: bool = True) -> dict[str, Any]:
    """:func:`probe_data_basis` and the kNN's k and temperature."""
    return {**probe_data_basis(results, model=model), "kNN k": dig(results, "knn", "k"),
            "kNN temperature": dig(results, "knn", "temperature")}


def linear_basis(results: Mapping[str, Any], *, model: bool = True) -> dict[str, Any]:
    """:func:`probe_data_basis` and the linear probe's epochs."""
    return {**probe_data_basis(results, model=model), "linear epochs": dig(results, "linear", "epochs")}


def dense_basis(results: Mapping[str, Any]) -> dict[str, Any]:
    """The dense probe's data, classes, input size, blocks, images and head steps, and the weights."""
    dense = results.get("dense") if isinstance(results.get("dense"), Mapping) else {}
    return {
        "dense train set": _data(dense, "train"),
        "dense val set": _data(dense, "val"),
        "dense classes": dig(dense, "num_classes"),
        "dense size (px)": dig(dense, "size"),
        "dense blocks": _hashable(dig(dense, "blocks")),
        "dense train images": dig(dense, "train_images"),
        "dense val images": dig(dense, "val_images"),
        "dense head steps": dig(dense, "steps"),
        "dense head epochs": dig(dense, "epochs"),
        "dense loss size (px)": dig(dense, "loss_size"),
        "weights": dig(results, "meta", "weights"),
    }


def retrieval_basis(results: Mapping[str, Any]) -> dict[str, Any]:
    """Dense retrieval's data, classes, input size, blocks, images, k, temperature, memory sizes
    (requested and used), sampling seed and the weights."""
    r = results.get("retrieval") if isinstance(results.get("retrieval"), Mapping) else {}
    return {
        "retrieval train set": _data(r, "train"),
        "retrieval val set": _data(r, "val"),
        "retrieval classes": dig(r, "num_classes"),
        "retrieval size (px)": dig(r, "size"),
        "retrieval blocks": _hashable(dig(r, "blocks")),
        "retrieval train images": dig(r, "train_images"),
        "retrieval val images": dig(r, "val_images"),
        "retrieval k": dig(r, "k"),
        "retrieval temperature": dig(r, "temperature"),
        "retrieval memory sizes": _hashable(dig(r, "memory_sizes")),
        "retrieval memory patches": dig(r, "memory_patches"),
        "seed": dig(r, "seed"),
        "weights": dig(results, "meta", "weights"),
    }


def detection_basis(results: Mapping[str, Any]) -> dict[str, Any]:
    """Detection transfer's data, categories, input size, mode and fine-tune settings, and the weights."""
    det = results.get("detection") if isinstance(results.get("detection"), Mapping) else {}
    return {
        "detection train set": _data(det, "train"),
        "detection val set": _data(det, "val"),
        "detection categories": _hashable(dig(det, "categories")),
        "detection size (px)": dig(det, "size"),
        "detection mode": dig(det, "mode"),
        "detection steps": dig(det, "steps"),
        "detection batch size": dig(det, "batch_size"),
        "detection lr": dig(det, "lr"),
        "detection backbone lr": dig(det, "backbone_lr"),
        "detection pyramid width": dig(det, "width"),
        "weights": dig(results, "meta", "weights"),
    }


def correspondence_basis(results: Mapping[str, Any]) -> dict[str, Any]:
    """The correspondence score's test set, image count, size, seed and weights."""
    meta = results.get("meta") if isinstance(results.get("meta"), Mapping) else {}
    return {
        "test set": _data(meta, "test"),
        "correspondence images": dig(results, "correspondence", "pairs"),
        "correspondence size (px)": dig(results, "correspondence", "size"),
        "seed": dig(meta, "seed"),
        "weights": dig(meta, "weights"),
    }
