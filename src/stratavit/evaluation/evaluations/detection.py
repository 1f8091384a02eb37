"""Detection transfer as an evaluation: a Faster R-CNN fine-tuned on the backbone, scored by COCO box AP.

Options ``detection.*`` (CLI: ``--detection-train``, ``--detection-val``); off unless both are
given. Data: a folder with ``annotations.json`` (COCO detection format) + ``images/``, a COCO
``.json`` with ``images/`` beside it, or the shipped ``horses-boxes:train`` / ``horses-boxes:val``
(see :mod:`stratavit.evaluation.detection_data`). The detector: ViTDet's simple feature pyramid on
the last block (a CNN's stages + FPN) and torchvision's Faster R-CNN heads
(:mod:`stratavit.evaluation.detection_model`), fine-tuned for ``detection.steps`` steps in
``detection.mode`` ``finetune`` (the backbone learns at ``lr * backbone_lr``) or ``frozen``
(:mod:`stratavit.evaluation.detection_train`). ``results.json``: ``detection`` (``ap``, ``ap50``,
``ap75`` in %, the settings, the data's fingerprints), and the same under ``baselines.random_init``
(one fine-tune per model).

Size: ``detection.size``, by default the evaluation size but at least :data:`MIN_DEFAULT_SIZE`
(64) px -- a run trained on 32 px images would give the detector an 8 x 8 grid of patch-4 cells --
rounded up to a multiple of the coarsest pyramid stride; when it differs from the training
resolution, the one-line size warning says so.

Cost and scale, measured on 2 heavily shared CPU cores (load 4-8; the demo's ViT: patch 4, 128 wide,
4 blocks, 64 px, strides 4 and 8, width 128, batch 8, horses-boxes 200 / 128 images): 100 steps
took 117-205 s frozen and 690-1250 s fine-tuned, plus 5-40 s to predict the val images. AP / AP50
after a 24-step pre-training: 50.7 / 94.1 frozen, 50.6 / 92.8 fine-tuned; random init: 50.3 / 93.3
frozen, 51.3 / 93.8 fine-tuned -- one large
horse per image makes AP50 easy, and a barely trained backbone is no better than random. So
detection is not part of ``stratavit demo`` (its budget is ~30 s for this part).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from stratavit.config import Config
from stratavit.evaluation.comparability import detection_basis
from stratavit.evaluation.detection import detection_transfer
from stratavit.evaluation.detection_data import DetectionFolder
from stratavit.evaluation.detection_model import required_multiple
from stratavit.evaluation.detection_train import FineTune
from stratavit.evaluation.detection_visuals import plot_detections
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.options import Options
from stratavit.evaluation.protocol import Column, Context, Evaluation, Figure, HeadlineColumn, Result
from stratavit.evaluation.resolution import size_note, sized
from stratavit.evaluation.tables import dig, fmt, images_used, md_table, number
from stratavit.evaluation.tokens import model_at_size

__all__ = ["Detection", "DetectionOptions", "DetectionPlan", "DetectionResult", "MIN_DEFAULT_SIZE", "detection_size"]

MIN_DEFAULT_SIZE = 64
"""The default detection size is the evaluation size, but at least this."""


@dataclass
class DetectionOptions:
    """``detection.*``: the data (see the module docstring), the input size and the bounded fine-tune."""

    train: str | None = None
    val: str | None = None
    size: int | None = field(default=None, metadata={"min": 1})
    """Input side (px); null: the evaluation size, at least 64, rounded up to the coarsest stride."""
    mode: Literal["finetune", "frozen"] = "finetune"
    steps: int = field(default=300, metadata={"min": 1})
    batch_size: int = field(default=8, metadata={"min": 1})
    lr: float = 3e-4
    """AdamW learning rate of the pyramid and heads (warm-up, then cosine to 0)."""
    backbone_lr: float = 0.1
    """finetune: the backbone's learning rate as a fraction of ``lr``."""
    warmup: int = field(default=30, metadata={"min": 0})
    width: int = field(default=128, metadata={"min": 8})
    """Channels of every pyramid level."""
    max_images: int | None = field(default=1000, metadata={"min": 1})
    """At most this many images of each split (a fixed random subset beyond); null: all."""
    score_threshold: float = 0.5
    """The report's picture draws predictions scoring at least this."""

    def __post_init__(self) -> None:
        if (self.train is None) != (self.val is None):
            raise EvaluationError("detection transfer needs both --detection-train and --detection-val "
                                  "(COCO annotations.json + images/, or horses-boxes:train / horses-boxes:val)")
        if not self.lr > 0 or not self.backbone_lr >= 0:
            raise EvaluationError(f"detection.lr must be positive and detection.backbone_lr >= 0, not {self.lr} / "
                                  f"{self.backbone_lr}")


@dataclass
class DetectionPlan:
    """What the pre-flight check resolved: the two splits (read and checked) at the detection size."""

    train: DetectionFolder
    val: DetectionFolder
    size: int


@dataclass
class DetectionResult(Result):
    """Box AP (%) of the fine-tuned detector on the val split, and what it used."""

    ap: float
    ap50: float
    ap75: float
    mode: str
    steps: int
    batch_size: int
    lr: float
    backbone_lr: float
    warmup: int
    size: int
    width: int
    strides: list[int]
    categories: list[str]
    train: str
    val: str
    train_images: int
    val_images: int
    train_total: int
    val_total: int
    train_boxes: int
    val_boxes: int
    train_fingerprint: str
    val_fingerprint: str
    max_images: int | None
    first_loss: float | None
    final_loss: float | None
    detections: int
    seconds: float
    example: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the picture's images, not in JSON

    def entries(self) -> dict[str, Any]:
        data = asdict(self)
        del data["example"]
        return {"detection": data}


def detection_size(model: nn.Module, eval_size: int, size: int | None) -> int:
    """The detection input side: ``size`` as given (checked by the caller), else ``max(eval_size, 64)`` rounded
    up to a multiple of the coarsest pyramid stride of ``model``."""
    if size:
        return size
    m = required_multiple(model)
    return math.ceil(max(eval_size, MIN_DEFAULT_SIZE) / m) * m


class Detection(Evaluation):
    """Faster R-CNN transfer (ViTDet simple feature pyramid) scored by COCO box AP / AP50 / AP75."""

    name = "detection"
    sections = {"detection": DetectionOptions}

    def enabled(self, options: Options) -> bool:
        return options.detection.train is not None

    def check(self, model: nn.Module, size: int, cfg: Config, options: Options) -> DetectionPlan:
        """Read and check both splits (JSON, image files, categories) and the size before any feature is extracted."""
        o = options.detection
        d_size = detection_size(model, size, o.size)
        m = required_multiple(model)
        if d_size % m:
            raise EvaluationError(f"detection.size {d_size} is not a multiple of {m} (the coarsest pyramid stride); "
                                  f"use e.g. {math.ceil(d_size / m) * m}")
        sized(model, d_size, "detection.size" if o.size else "--img-size")
        train = DetectionFolder(str(o.train), d_size, max_images=o.max_images, seed=options.seed)
        val = DetectionFolder(str(o.val), d_size, max_images=o.max_images, seed=options.seed, categories=train.categories)
        if not train.annotations:
            raise EvaluationError(f"the detection train images chosen from {o.train} hold no boxes; raise detection.max_images")
        if not val.annotations:
            raise EvaluationError(f"the detection val images chosen from {o.val} hold no boxes; raise detection.max_images")
        return DetectionPlan(train, val, d_size)

    def run(self, model: nn.Module, ctx: Context, plan: DetectionPlan) -> DetectionResult:
        o = ctx.options.detection
        note = size_note("detection runs", plan.size, ctx.train_size, "detection.size") if ctx.train_size else None
        if note and plan.size != ctx.size:
            ctx.warn(note)
        settings = FineTune(o.steps, o.batch_size, o.lr, o.warmup, o.mode, o.backbone_lr, seed=ctx.options.seed,
                            num_workers=ctx.options.num_workers)
        with ctx.timed("detection"):
            try:
                res = detection_transfer(model_at_size(model, plan.size), plan.train, plan.val, settings, width=o.width,
                                         mean=ctx.cfg.views.mean, std=ctx.cfg.views.std, label=ctx.model_label)
            except ValueError as e:
                raise EvaluationError(str(e)) from None
        kept = res.pop("example")
        example = []
        for i, out in enumerate(kept):
            image, target, _ = plan.val[i]
            example.append({"image": image, "truth": target["boxes"], "truth_labels": target["labels"], **out})
        return DetectionResult(**res, train=str(o.train), val=str(o.val), max_images=o.max_images, example=example)

    def figures(self, model: nn.Module, ctx: Context, result: Result, out_dir: Path) -> list[Figure]:
        assert isinstance(result, DetectionResult)
        if not result.example:
            return []
        t = ctx.options.detection.score_threshold
        png = plot_detections(result.example, result.categories, out_dir / "detections.png", threshold=t)
        return [Figure(f"Detection on validation images: true boxes (green) and predictions scoring >= {t:g} "
                       f"(red, dashed), {result.mode} mode, AP {result.ap:.1f} %", png, 45)]

    def headline(self) -> list[HeadlineColumn]:
        return [HeadlineColumn("detection AP (%)", lambda r: dig(r, "detection", "ap"), lambda b: dig(b, "detection", "ap"))]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        d = results.get("detection")
        if not isinstance(d, Mapping):
            return None
        base = dig(results, "baselines", "random_init", "detection")
        rows = [["pre-trained", d.get("ap"), d.get("ap50"), d.get("ap75"), d.get("final_loss")]]
        if isinstance(base, Mapping):
            rows.append(["random init", base.get("ap"), base.get("ap50"), base.get("ap75"), base.get("final_loss")])
        cats = d.get("categories") or []
        return (
            "## Detection transfer\n\nA Faster R-CNN (torchvision heads) on a ViTDet simple feature pyramid of the last "
            f"block (strides {', '.join(str(s) for s in d.get('strides') or [])}), {fmt(d.get('mode'))} mode, "
            f"{fmt(len(cats))} categories ({', '.join(str(c) for c in cats[:10])}{' ...' if len(cats) > 10 else ''}), "
            "scored by COCO box AP (IoU 0.50:0.95), AP50 and AP75 (pycocotools) on the validation boxes. "
            f"Used: {(self.settings_line(results) or '').removeprefix('detection: ')}.\n\n"
            + md_table(["model", "AP (%)", "AP50 (%)", "AP75 (%)", "final loss"], rows)
        )

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        d = results.get("detection")
        return {"detection_ap": d["ap"], "detection_ap50": d["ap50"]} if isinstance(d, Mapping) else {}

    def settings_line(self, results: Mapping[str, Any]) -> str | None:
        d = results.get("detection")
        if not isinstance(d, Mapping):
            return None

        def images(split: str) -> str:
            return images_used(d, split, "detection")

        lr = f"lr {d.get('lr')}" + (f" (backbone x{d.get('backbone_lr')})" if d.get("mode") == "finetune" else "")
        return (f"detection: {images('train')} / {images('val')} images ({d.get('train_boxes')} / {d.get('val_boxes')} "
                f"boxes) at {d.get('size')} px, {d.get('mode')}, {d.get('steps')} steps of {d.get('batch_size')}, {lr}")

    def columns(self) -> list[Column]:
        return [
            Column("detection_ap", lambda r: number(dig(r, "detection", "ap")), header="detection AP (%)",
                   best=("detection AP", True), bar="detection AP (%)", basis=detection_basis),
            Column("detection_ap50", lambda r: number(dig(r, "detection", "ap50")), header="detection AP50 (%)",
                   basis=detection_basis),
        ]
