"""Classification probes: kNN and linear probe on the CLS and mean-patch features of every block.

``results.json``: ``knn`` / ``linear`` (the last block's CLS), ``layers`` (one row per block:
``knn_top1``, ``linear_top1`` and, for a ViT, ``knn_top1_patch`` / ``linear_top1_patch``); the
random-init baseline's ``knn_top1`` / ``linear_top1`` / ``layers``, and the ``raw_pixels`` baseline.
A CNN's "CLS" is the global average pool of each stage (no separate mean-patch entries).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.evaluation.block_plots import plot_block_curve
from stratavit.evaluation.class_checks import class_names, class_warnings
from stratavit.evaluation.comparability import knn_basis, linear_basis
from stratavit.evaluation.embedding import plot_embedding_2d
from stratavit.evaluation.features import BlockFeatures, raw_pixel_features
from stratavit.evaluation.knn import knn_per_block, knn_top1
from stratavit.evaluation.linear import linear_probe_top1, linear_probes_top1
from stratavit.evaluation.plotting import block_series
from stratavit.evaluation.protocol import (
    Column,
    ComparePlot,
    Context,
    Evaluation,
    Figure,
    HeadlineColumn,
    Panel,
    Result,
    cache_name,
)
from stratavit.evaluation.tables import dig, fmt, integer, md_table, number
from stratavit.evaluation.tokens import is_cnn
from stratavit.evaluation.visuals import plot_confusion

__all__ = ["Classification", "ClassificationResult", "KnnOptions", "LinearOptions", "classification_probes"]

LAYER_PNG = "layer_curve.png"
BASELINE_NAMES = {"random_init": "random init", "raw_pixels": "raw pixels"}


@dataclass
class KnnOptions:
    """``knn.*``: the weighted kNN classifier (DINO protocol)."""

    k: int = field(default=20, metadata={"min": 1})
    temperature: float = field(default=0.07, metadata={"min": 1e-6})
    concat_last: list[int] = field(default_factory=lambda: [2, 4], metadata={"min": 2})
    """Also kNN on the CLS of the last ``n`` blocks, each l2-normalised, concatenated, for every ``n``
    here (numbers above the depth are clipped to it, and dropped when it is below 2; ``[]``: none).
    ``results.json``: ``knn_concat`` (one row per ``n``) and ``knn_concat_best``."""


@dataclass
class LinearOptions:
    """``linear.*``: the linear probes (one per block and pooling)."""

    epochs: int = field(default=100, metadata={"min": 1})


def baseline_label(name: str) -> str:
    """Readable name of a baseline (``random_init`` -> ``random init``)."""
    return BASELINE_NAMES.get(name, name.replace("_", " "))


def num_classes(*label_sets: Tensor) -> int:
    """Largest label of the sets + 1."""
    return int(max(int(ls.max()) for ls in label_sets)) + 1


def classification_probes(
    train: BlockFeatures,
    test: BlockFeatures,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    linear_epochs: int,
    poolings: Sequence[str] = ("cls", "mean_patch"),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """kNN and linear probe on CLS and mean-patch features of every block.

    ``poolings``: which of the two to probe (a CNN: ``("cls",)``, which holds its global average
    pool; the mean patch would repeat it). Returns ``(layers, last)``: per-block rows and the
    last block's CLS linear-probe result (with its test predictions, for the confusion matrix).
    """
    depth = len(train.cls)
    layers: list[dict[str, Any]] = [{"block": i + 1} for i in range(depth)]
    last: dict[str, Any] = {}
    probes: list[tuple[str, int]] = []  # (suffix, block index) of every linear probe, trained together
    ftrs: list[Tensor] = []
    ftes: list[Tensor] = []
    for pooling, suffix in (("cls", ""), ("mean_patch", "_patch")):
        if pooling not in poolings:
            continue
        ftr, fte = train.pooled(pooling), test.pooled(pooling)
        knn = knn_per_block(ftr, train.labels, fte, test.labels, k=k, temperature=temperature, num_classes=num_classes)
        for i in range(depth):
            layers[i][f"knn_top1{suffix}"] = knn[i]
            probes.append((suffix, i))
            ftrs.append(ftr[i])
            ftes.append(fte[i])
    lins = linear_probes_top1(ftrs, train.labels, ftes, test.labels, num_classes=num_classes, epochs=linear_epochs)
    for (suffix, i), lin in zip(probes, lins):
        layers[i][f"linear_top1{suffix}"] = round(lin["top1"], 2)
        if suffix == "" and i == depth - 1:
            last = lin
    return layers, last


def concat_blocks(depth: int, concat_last: Sequence[int]) -> list[list[int]]:
    """The 1-based block lists of the multi-block kNN rows: the last ``n`` blocks, ``n`` clipped to ``depth``,
    duplicates and lists of fewer than 2 blocks dropped (``depth=4, [2, 4, 8]`` -> ``[[3, 4], [1, 2, 3, 4]]``)."""
    sizes = sorted({min(int(n), depth) for n in concat_last if min(int(n), depth) >= 2})
    return [list(range(depth - n + 1, depth + 1)) for n in sizes]


def knn_concat(
    train: BlockFeatures, test: BlockFeatures, *, concat_last: Sequence[int], num_classes: int, k: int,
    temperature: float,
) -> list[dict[str, Any]]:
    """kNN top-1 (%) on concatenated CLS features of the last blocks.

    Each block's CLS ``(N, C)`` is l2-normalised before the concatenation ``(N, n * C)``, so every block
    weighs the same in the cosine similarity. Returns ``[{"blocks": [3, 4], "top1": 41.2}, ...]``.
    """
    rows = []
    for blocks in concat_blocks(len(train.cls), concat_last):
        ftr = torch.cat([F.normalize(train.cls[b - 1].float(), dim=1) for b in blocks], dim=1)
        fte = torch.cat([F.normalize(test.cls[b - 1].float(), dim=1) for b in blocks], dim=1)
        top1 = knn_top1(ftr, train.labels, fte, test.labels, k=k, temperature=temperature, num_classes=num_classes)
        rows.append({"blocks": blocks, "top1": top1})
    return rows


def best_concat(rows: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """The row of ``knn_concat`` with the highest top-1 (the first of ties), or ``None``."""
    best = None
    for row in rows or ():
        if best is None or row["top1"] > best["top1"]:
            best = dict(row)
    return best


@dataclass
class ClassificationResult(Result):
    """Per-block kNN / linear top-1 (%), the settings, and what the pictures need (not in JSON)."""

    k: int
    temperature: float
    epochs: int
    layers: list[dict[str, Any]]
    linear_top1: float
    linear_train_top1: float
    concat: list[dict[str, Any]] = field(default_factory=list)
    predictions: Tensor | None = field(default=None, repr=False)
    test_features: BlockFeatures | None = field(default=None, repr=False)

    def _concat_entries(self) -> dict[str, Any]:
        if not self.concat:
            return {}
        return {"knn_concat": self.concat, "knn_concat_best": best_concat(self.concat)}

    def entries(self) -> dict[str, Any]:
        return {
            "knn": {"top1": self.layers[-1]["knn_top1"], "k": self.k, "temperature": self.temperature},
            "linear": {"top1": round(self.linear_top1, 2), "train_top1": round(self.linear_train_top1, 2),
                       "epochs": self.epochs},
            "layers": self.layers,
            **self._concat_entries(),
        }

    def baseline_entries(self) -> dict[str, Any]:
        return {"knn_top1": self.layers[-1]["knn_top1"], "linear_top1": round(self.linear_top1, 2),
                "layers": self.layers, **self._concat_entries()}


@dataclass
class RawPixels:
    """The raw-pixel baseline: kNN and linear probe on the flattened input images."""

    knn_top1: float
    linear_top1: float


def _raw_pixels(ctx: Context) -> RawPixels:
    o = ctx.options
    feats = [
        raw_pixel_features(ds, batch_size=o.batch_size, desc=f"raw pixels ({split})",
                           cache_path=ctx.out.cache / (cache_name("pixels", split, *ctx.data_key) + ".pt"))
        for ds, split in ((ctx.train_ds, "train"), (ctx.test_ds, "test"))
    ]
    (ptr, ytr), (pte, yte) = feats
    n_cls = num_classes(ytr, yte)
    knn = knn_top1(ptr, ytr, pte, yte, k=o.knn.k, temperature=o.knn.temperature, num_classes=n_cls)
    lin = linear_probe_top1(ptr, ytr, pte, yte, num_classes=n_cls, epochs=o.linear.epochs)["top1"]
    return RawPixels(knn, round(lin, 2))


def _best_block(results: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """The block with the highest kNN top-1 (the first of ties) and that value."""
    best: tuple[int | None, float | None] = (None, None)
    for block, value in zip(*block_series(results.get("layers"), "knn_top1")):
        if best[1] is None or value > best[1]:
            best = (block, value)
    return best


def _block_table(results: Mapping[str, Any]) -> str | None:
    layers = results.get("layers") or []
    if not layers:
        return None
    keys: list[str] = []
    for row in layers:
        for k in row:
            if k != "block" and k not in keys:
                keys.append(k)
    header = ["block", *keys]
    ref_cols: list[tuple[str, dict[int, Mapping[str, Any]]]] = []
    for name, base in (dig(results, "baselines") or {}).items():
        base_layers = dig(base, "layers")
        if base_layers:
            by_block = {int(r["block"]): r for r in base_layers if "block" in r}
            for k in keys:
                if any(k in r for r in by_block.values()):
                    header.append(f"{baseline_label(name)} {k}")
                    ref_cols.append((k, by_block))
    rows = []
    for row in sorted(layers, key=lambda r: int(r.get("block", 0))):
        block = int(row.get("block", 0))
        cells: list[Any] = [block, *(row.get(k) for k in keys)]
        cells += [by_block.get(block, {}).get(k) for k, by_block in ref_cols]
        rows.append(cells)
    return md_table(header, rows)


def _blocks_label(blocks: Sequence[int]) -> str:
    """``[3, 4]`` -> ``"blocks 3-4"``."""
    return f"blocks {blocks[0]}-{blocks[-1]}"


def _concat_sentence(results: Mapping[str, Any]) -> str:
    """One paragraph on the multi-block kNN rows (empty when there are none)."""
    rows = results.get("knn_concat") or []
    if not rows:
        return ""
    base = {tuple(r["blocks"]): r["top1"] for r in dig(results, "baselines", "random_init", "knn_concat") or []}
    parts = []
    for row in rows:
        ref = base.get(tuple(row["blocks"]))
        parts.append(f"{_blocks_label(row['blocks'])}: {fmt(row['top1'])} %"
                     + (f" (random init {fmt(ref)} %)" if ref is not None else ""))
    return ("kNN top-1 on the CLS of the last blocks, each l2-normalised, concatenated (`knn.concat_last`): "
            + "; ".join(parts) + ".\n\n")


class Classification(Evaluation):
    """kNN and linear probes of every block (CLS and mean patch), plus the raw-pixel baseline."""

    name = "classification"
    sections = {"knn": KnnOptions, "linear": LinearOptions}
    panels = (
        Panel("kNN top-1", "top-1 (%)", ((None, None, "knn_top1"), ("mean patch", None, "knn_top1_patch")), 10),
        Panel("linear top-1", "top-1 (%)", ((None, None, "linear_top1"), ("mean patch", None, "linear_top1_patch")),
              20),
    )
    compare_plots = (
        ComparePlot("knn_layers", "compare_knn_layers.png", "kNN top-1 per block", "kNN top-1 per transformer block",
                    "kNN top-1 (%)", (("", ("layers",), "knn_top1"), (" (patch tokens)", ("layers",), "knn_top1_patch")),
                    10, column="knn_top1"),
        ComparePlot("linear_layers", "compare_linear_layers.png", "Linear probe top-1 per block",
                    "linear probe top-1 per transformer block", "linear top-1 (%)",
                    (("", ("layers",), "linear_top1"), (" (patch tokens)", ("layers",), "linear_top1_patch")), 20,
                    column="linear_top1"),
    )

    def run(self, model: nn.Module, ctx: Context, plan: Any) -> ClassificationResult:
        o = ctx.options
        ftr, fte = ctx.features(model)
        for text in class_warnings(ftr.labels, fte.labels, class_names(ctx.test_ds)):
            ctx.warn(text)
        n_cls = num_classes(ftr.labels, fte.labels)
        with ctx.timed("probes"):
            layers, last = classification_probes(
                ftr, fte, num_classes=n_cls, k=o.knn.k, temperature=o.knn.temperature,
                linear_epochs=o.linear.epochs, poolings=("cls",) if is_cnn(model) else ("cls", "mean_patch"),
            )
            concat = knn_concat(ftr, fte, concat_last=o.knn.concat_last, num_classes=n_cls, k=o.knn.k,
                                temperature=o.knn.temperature)
        return ClassificationResult(o.knn.k, o.knn.temperature, o.linear.epochs, layers, last["top1"],
                                    last["train_top1"], concat, last.get("predictions"), fte)

    def extra_baselines(self, ctx: Context) -> dict[str, Any]:
        return {"raw_pixels": asdict(_raw_pixels(ctx))}

    def figures(self, model: nn.Module, ctx: Context, result: Result, out_dir: Path) -> list[Figure]:
        assert isinstance(result, ClassificationResult) and result.test_features is not None
        cnn, feats, names = is_cnn(model), result.test_features, class_names(ctx.test_ds)
        figures = []
        if result.predictions is not None:
            labels, preds = feats.labels, result.predictions
            k = max(int(labels.max()), int(preds.max()), len(names or []) - 1) + 1
            conf = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
            where = "last stage, global average pool" if cnn else "last block, CLS"
            figures.append(Figure(f"Confusion matrix of the linear probe ({where}), rows normalised",
                                  plot_confusion(conf, names, out_dir / "confusion.png"), 50))
        png, method = plot_embedding_2d(feats.cls[-1].float(), feats.labels, names, out_dir / "embedding.png",
                                        seed=ctx.options.seed)
        what = "global-average-pool features of the last stage" if cnn else "CLS features of the last block"
        figures.append(Figure(f"Test {what} in 2-D ({method})", png, 60))
        return figures

    def headline(self) -> list[HeadlineColumn]:
        return [
            HeadlineColumn("kNN top-1 (%)", lambda r: dig(r, "knn", "top1"),
                           lambda b: b.get("knn_top1", dig(b, "knn", "top1")), always=True),
            HeadlineColumn("linear top-1 (%)", lambda r: dig(r, "linear", "top1"),
                           lambda b: b.get("linear_top1", dig(b, "linear", "top1")), always=True),
        ]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        table = _block_table(results)
        if table is None:
            return None
        lines: dict[str, float] = {}
        curves: dict[str, list[dict]] = {}
        for name, base in (results.get("baselines") or {}).items():
            value, label = dig(base, "knn_top1"), baseline_label(name)
            if value is not None:
                lines[label + (" (last block)" if name == "random_init" else "")] = float(value)
            if dig(base, "layers"):
                curves[f"{label} (per block)"] = list(base["layers"])
        png = plot_block_curve(
            list(results["layers"]), out_dir / LAYER_PNG, key="knn_top1", baselines=lines or None,
            title="kNN top-1 per transformer block", extra_curves=curves or None,
        )
        concat = _concat_sentence(results)
        return (f"## Per-block evaluation\n\n{table}\n\n{concat}"
                f"![kNN top-1 per block]({os.path.relpath(png, out_dir)})")

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        return {"knn_top1": results["knn"]["top1"], "linear_top1": results["linear"]["top1"]}

    def columns(self) -> list[Column]:
        def best_cell(row: Mapping[str, Any]) -> str | None:
            if row["best_block_knn"] is None:
                return None
            return f"block {row['best_block_knn']} ({fmt(row['best_block_knn_top1'])})"

        def baseline_basis(r: Mapping[str, Any]) -> Mapping[str, Any]:
            return knn_basis(r, model=False)

        return [
            Column("knn_top1", lambda r: number(dig(r, "knn", "top1")), header="kNN top-1 (%)",
                   best=("kNN top-1", True), bar="kNN top-1 (%)", basis=knn_basis),
            Column("linear_top1", lambda r: number(dig(r, "linear", "top1")), header="linear top-1 (%)",
                   best=("linear top-1", True), bar="linear top-1 (%)", basis=linear_basis),
            Column("best_block_knn", lambda r: _best_block(r)[0], header="best block kNN (%)", cell=best_cell,
                   basis=knn_basis),
            Column("best_block_knn_top1", lambda r: _best_block(r)[1], best=("best-block kNN top-1", True),
                   basis=knn_basis),
            Column("best_concat_knn_top1", lambda r: number(dig(r, "knn_concat_best", "top1")),
                   header="best multi-block kNN (%)", best=("multi-block kNN top-1", True), basis=knn_basis),
            Column("random_init_knn_top1", lambda r: number(dig(r, "baselines", "random_init", "knn_top1")),
                   group="baseline", basis=baseline_basis),
            Column("raw_pixels_knn_top1", lambda r: number(dig(r, "baselines", "raw_pixels", "knn_top1")),
                   group="baseline", basis=baseline_basis),
            Column("knn_k", lambda r: integer(dig(r, "knn", "k")), group="setting",
                   must_agree=("the kNN numbers use different k", "k")),
        ]
