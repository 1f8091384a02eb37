"""The dense probe as an evaluation: a linear segmentation head per block, scored by mIoU.

Options ``dense.*`` (CLI: ``--dense-train``, ``--dense-val``, ``--dense-blocks``, ``--dense-size``);
off unless ``train`` and ``val`` are given. ``results.json``: ``dense`` (see
:func:`stratavit.evaluation.dense.dense_probe`), and the same under ``baselines.random_init``.

Limits: the probe reads at most ``dense.max_images`` (default 1000) pairs of each split (a fixed
random subset beyond that) and trains each block's head for ``dense.steps`` (default 400)
optimiser steps, rounded up to whole epochs; the input size defaults to the evaluation's, which
defaults to the run's training resolution. What it used is printed (:meth:`Dense.settings_line`)
and recorded. The heads' loss is computed on masks of at most 4 pixels per token (``dense.loss_size``;
see :func:`~stratavit.evaluation.dense_head.loss_side`). Cost on 2 shared CPU cores (random-init
ViT-S/16 at 224 px, 367 / 101 images of 480x360, 11 classes): ~150 s for the tokens of both
splits, then per block 80 s to train the head (242 s with the loss at 224 px) and ~20 s to score it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from stratavit.config import Config
from stratavit.data.datasets import segmentation_root
from stratavit.evaluation.comparability import dense_basis
from stratavit.evaluation.dense import dense_probe
from stratavit.evaluation.dense_head import DEFAULT_STEPS
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.options import Options
from stratavit.evaluation.protocol import (
    Column,
    ComparePlot,
    Context,
    Evaluation,
    HeadlineColumn,
    Panel,
    Result,
    cache_name,
)
from stratavit.evaluation.resolution import size_note, sized
from stratavit.evaluation.segmentation_data import SegmentationFolder
from stratavit.evaluation.tables import block_section, dig, fmt, images_used, number
from stratavit.evaluation.tokens import depth_of, model_at_size, resolve_blocks

__all__ = ["Dense", "DenseBlock", "DenseOptions", "DensePlan", "DenseResult", "default_dense_blocks"]


@dataclass
class DenseOptions:
    """``dense.*``: the segmentation probe's data (``images/`` + ``masks/`` folders, or
    ``horses-sample:train`` / ``horses-sample:val``), blocks (1-based, -1 = last; default up to 4
    spread) and input size (default the evaluation's)."""

    train: str | None = None
    val: str | None = None
    blocks: list[int] | None = None
    size: int | None = None
    max_images: int | None = 1000
    """At most this many image/mask pairs of each split (a fixed random subset beyond); null: all."""
    steps: int = DEFAULT_STEPS
    """Optimiser steps of each block's head (rounded up to whole epochs of 16 images)."""
    loss_size: int | None = None
    """Side (px) of the masks the heads' loss is computed at; null: the input size, capped at 4 px per token."""

    def __post_init__(self) -> None:
        if (self.train is None) != (self.val is None):
            raise EvaluationError("the dense probe needs both --dense-train and --dense-val (images/ + masks/ folders)")
        if self.max_images is not None and self.max_images < 1:
            raise EvaluationError(f"dense.max_images must be positive (or null for all images), not {self.max_images}")
        if self.steps < 1:
            raise EvaluationError(f"dense.steps must be positive, not {self.steps}")
        if self.loss_size is not None and self.loss_size < 1:
            raise EvaluationError(f"dense.loss_size must be positive (or null for the default), not {self.loss_size}")


@dataclass
class DensePlan:
    """What the pre-flight check resolved: the folders, the 1-based blocks and the input size."""

    train_root: Path
    val_root: Path
    blocks: list[int]
    size: int


@dataclass
class DenseBlock:
    """Scores (%) of one block's head on the validation masks."""

    block: int
    miou: float
    pixel_acc: float
    per_class_iou: list[float | None]
    loss_size: int


@dataclass
class DenseResult(Result):
    """The dense probe: the deepest block's scores, the settings, one :class:`DenseBlock` per block."""

    miou: float
    pixel_acc: float
    num_classes: int
    size: int
    resize_policy: str
    train: str
    val: str
    train_images: int
    val_images: int
    train_total: int
    val_total: int
    train_fingerprint: str
    val_fingerprint: str
    max_images: int | None
    blocks: list[int]
    epochs: int
    steps: int
    lr: float
    loss_size: int
    layers: list[DenseBlock]

    def entries(self) -> dict[str, Any]:
        return {"dense": asdict(self)}


def default_dense_blocks(model: nn.Module, blocks: list[int] | None) -> list[int]:
    """The dense probe's blocks: as given, else up to 4 evenly spaced blocks ending at the last."""
    if blocks:
        return list(blocks)
    depth = depth_of(model)
    count = min(4, depth)
    return sorted({round(depth * (i + 1) / count) for i in range(count)})


class Dense(Evaluation):
    """Linear segmentation probe of the patch tokens of a few blocks (mIoU, pixel accuracy)."""

    name = "dense"
    sections = {"dense": DenseOptions}
    panels = (Panel("dense mIoU", "mIoU (%)", (("mIoU", "dense", "miou"),), 40),)
    compare_plots = (
        ComparePlot("dense", "compare_dense_miou.png", "Dense mIoU per block", "dense mIoU per transformer block",
                    "mIoU (%)", (("", ("dense", "layers"), "miou"),), 40, column="dense_miou"),
    )

    def enabled(self, options: Options) -> bool:
        return options.dense.train is not None

    def check(self, model: nn.Module, size: int, cfg: Config, options: Options) -> DensePlan:
        """Validate the folders (layout, image/mask pairing), blocks and size before any feature is extracted."""
        o = options.dense
        d_size = o.size or size
        roots = (segmentation_root(str(o.train)), segmentation_root(str(o.val)))
        for root in roots:
            SegmentationFolder(root, d_size, cfg.views.mean, cfg.views.std)
        at_size = sized(model, d_size, "--dense-size" if o.size else "--img-size")
        try:
            numbers = resolve_blocks(at_size, default_dense_blocks(at_size, o.blocks))
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        return DensePlan(roots[0], roots[1], numbers, d_size)

    def run(self, model: nn.Module, ctx: Context, plan: DensePlan) -> DenseResult:
        o = ctx.options
        flag = "--dense-size" if o.dense.size else "--img-size"
        note = size_note("the dense probe runs", plan.size, ctx.train_size, flag) if ctx.train_size else None
        if note and plan.size != ctx.size:  # at the evaluation size, the evaluation's own line says it
            ctx.warn(note)
        with ctx.timed("dense"):
            try:
                res = dense_probe(
                    model_at_size(model, plan.size), plan.train_root, plan.val_root, blocks=plan.blocks,
                    size=plan.size, mean=ctx.cfg.views.mean, std=ctx.cfg.views.std, num_workers=o.num_workers,
                    cache_dir=ctx.out.cache / cache_name("dense", ctx.model_tag, o.dense.train, o.dense.val, plan.size),
                    max_images=o.dense.max_images, steps=o.dense.steps, loss_size=o.dense.loss_size, seed=o.seed,
                )
            except ValueError as e:
                raise EvaluationError(str(e)) from None
        return DenseResult(**{**res, "train": str(o.dense.train), "val": str(o.dense.val),
                              "max_images": o.dense.max_images,
                              "layers": [DenseBlock(**row) for row in res["layers"]]})

    def headline(self) -> list[HeadlineColumn]:
        return [HeadlineColumn("dense mIoU (%)", lambda r: dig(r, "dense", "miou"), lambda b: dig(b, "dense", "miou"))]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        used = self.settings_line(results)
        return block_section(
            results, "dense", [("miou", "mIoU (%)"), ("pixel_acc", "pixel acc. (%)")],
            "## Dense probe\n\nA linear segmentation head on frozen patch tokens (upsampled logits, "
            f"cross-entropy), {fmt(dig(results, 'dense', 'num_classes'))} classes, "
            f"input {fmt(dig(results, 'dense', 'size'))} px, evaluated at the masks' own resolution."
            + (f" Used: {used.removeprefix('dense probe: ')}." if used else ""),
        )

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        return {"dense_miou": results["dense"]["miou"]} if "dense" in results else {}

    def settings_line(self, results: Mapping[str, Any]) -> str | None:
        d = results.get("dense")
        if not isinstance(d, Mapping):
            return None

        def images(split: str) -> str:
            return images_used(d, split, "dense")

        blocks = ", ".join(str(b) for b in d.get("blocks") or [])
        loss = d.get("loss_size")
        at = f"{d.get('size')} px" + (f" (loss at {loss} px)" if loss is not None and loss != d.get("size") else "")
        return (f"dense probe: {images('train')} / {images('val')} images at {at}, "
                f"{d.get('steps', '?')} head steps ({d.get('epochs')} epochs) per block, blocks {blocks}")

    def columns(self) -> list[Column]:
        return [
            Column("dense_miou", lambda r: number(dig(r, "dense", "miou")), header="dense mIoU (%)",
                   best=("dense mIoU", True), bar="dense mIoU (%)", basis=dense_basis),
            Column("dense_pixel_acc", lambda r: number(dig(r, "dense", "pixel_acc")), header="dense pixel acc (%)",
                   best=("dense pixel accuracy", True), basis=dense_basis),
        ]
