"""Detection transfer: fine-tune a Faster R-CNN on the backbone for a bounded number of steps, score COCO box AP.

:func:`detection_transfer` is the whole measurement on one backbone: read the train / val COCO
data at the detection size (:mod:`~stratavit.evaluation.detection_data`), build the detector
(:mod:`~stratavit.evaluation.detection_model`) on a copy of the backbone, fine-tune it
(:mod:`~stratavit.evaluation.detection_train`), predict the val images and score AP / AP50 / AP75
with pycocotools (:mod:`~stratavit.evaluation.detection_ap`) against the original boxes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from stratavit.evaluation.detection_ap import coco_box_ap
from stratavit.evaluation.detection_data import DetectionFolder
from stratavit.evaluation.detection_model import build_detector, pyramid_strides
from stratavit.evaluation.detection_train import FineTune, fine_tune, predict

__all__ = ["EXAMPLE_IMAGES", "detection_transfer"]

EXAMPLE_IMAGES = 4
"""Validation images whose predictions the report draws."""


def detection_transfer(
    model: nn.Module, train: DetectionFolder, val: DetectionFolder, settings: FineTune, *, width: int,
    mean: Sequence[float], std: Sequence[float], label: str = "",
) -> dict[str, Any]:
    """AP, AP50, AP75 (%) of a detector fine-tuned on ``train`` from ``model`` (at ``train.size``), on ``val``.

    ``model`` itself is not changed (the detector holds a copy). Returns the scores, the settings,
    the loss curve summary and ``example``: the first :data:`EXAMPLE_IMAGES` val images' raw outputs.
    """
    started = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        body = copy.deepcopy(model)
        detector = build_detector(body, len(train.categories), train.size, width, settings.mode == "frozen", mean, std)
        prefix = f"{label} detection" if label else "detection"
        losses = fine_tune(detector, train, settings, f"{prefix} fine-tune ({settings.mode})")
        rows, kept = predict(detector, val, settings.batch_size, f"{prefix} predict (val)",
                             num_workers=settings.num_workers, keep=EXAMPLE_IMAGES)
    scores = coco_box_ap(val.coco(), rows)
    tail = losses[-max(1, len(losses) // 10):]
    return {
        **scores,
        **{k: v for k, v in asdict(settings).items() if k not in ("seed", "num_workers")},
        "size": train.size,
        "width": width,
        "strides": pyramid_strides(body),
        "categories": [c["name"] for c in train.categories],
        "train_images": len(train),
        "val_images": len(val),
        "train_total": train.total,
        "val_total": val.total,
        "train_boxes": len(train.annotations),
        "val_boxes": len(val.annotations),
        "train_fingerprint": train.identity(),
        "val_fingerprint": val.identity(),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4) if losses else None,
        "detections": len(rows),
        "seconds": round(time.time() - started, 1),
        "example": kept,
    }
