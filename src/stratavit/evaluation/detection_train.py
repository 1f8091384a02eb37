"""The bounded detection fine-tune and the detector's predictions.

:func:`fine_tune` trains a torchvision detector (:func:`~stratavit.evaluation.detection_model.build_detector`)
for exactly ``steps`` optimiser steps of ``batch_size`` images, drawn epoch by epoch in a seeded
order, each image flipped horizontally with probability 1/2 (its boxes with it). AdamW
(weight decay 0.05), linear warm-up over ``warmup`` steps then cosine decay to 0, gradients
clipped at norm :data:`CLIP_NORM`. Mode ``frozen``: only the pyramid and the heads learn; mode
``finetune``: the backbone too, at ``lr * backbone_lr`` (ViTDet-style lower backbone rate).

:func:`predict` runs the detector on a :class:`~stratavit.evaluation.detection_data.DetectionFolder`
and returns COCO result rows in the original images' pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from stratavit.evaluation.detection_data import DetectionFolder, collate_detection
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.progress import progress

__all__ = ["CLIP_NORM", "FineTune", "fine_tune", "hflip", "predict"]

CLIP_NORM = 5.0
WEIGHT_DECAY = 0.05


@dataclass(frozen=True)
class FineTune:
    """The fine-tune's settings (see the module docstring)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    mode: Literal["frozen", "finetune"]
    backbone_lr: float
    seed: int = 0
    num_workers: int = 0


def hflip(images: Tensor, targets: list[dict[str, Tensor]], flip: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Flip the images ``(B, 3, S, S)`` where ``flip`` ``(B,)`` is true, and their boxes (x0, y0, x1, y1) with them."""
    width = images.shape[-1]
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    out = []
    for t, f in zip(targets, flip.tolist()):
        boxes = t["boxes"]
        if f:
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        out.append({**t, "boxes": boxes})
    return images, out


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def fine_tune(detector: Any, train: DetectionFolder, settings: FineTune, desc: str) -> list[float]:
    """Train ``detector`` in place for ``settings.steps`` steps on ``train``; returns the total loss of every step.

    Raises:
        EvaluationError: the loss became non-finite (naming the step and the lr to lower).
    """
    g = torch.Generator().manual_seed(settings.seed)
    body = list(detector.backbone.body.parameters())
    body_ids = {id(p) for p in body}
    heads = [p for p in detector.parameters() if id(p) not in body_ids and p.requires_grad]
    groups = [{"params": heads, "lr": settings.lr}]
    if settings.mode == "finetune":
        groups.append({"params": body, "lr": settings.lr * settings.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    base = [grp["lr"] for grp in opt.param_groups]
    sampler = RandomSampler(train, generator=g)
    loader = DataLoader(train, batch_size=settings.batch_size, sampler=sampler, drop_last=len(train) >= settings.batch_size,
                        collate_fn=collate_detection, num_workers=settings.num_workers)
    detector.train()
    losses: list[float] = []
    batches = iter(())
    for step in progress(range(settings.steps), desc, total=settings.steps):
        try:
            images, targets, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets, _ = next(batches)
        images, targets = hflip(images, targets, torch.rand(len(images), generator=g) < 0.5)
        for grp, lr in zip(opt.param_groups, base):
            grp["lr"] = lr * _schedule(step, settings.steps, settings.warmup)
        loss = sum(detector(list(images), targets).values())
        if not torch.isfinite(loss.detach()):
            raise EvaluationError(f"the detection fine-tune's loss became {float(loss)} at step {step + 1}; "
                                  f"lower detection.lr (now {settings.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], CLIP_NORM)
        opt.step()
        losses.append(float(loss.detach()))
    detector.eval()
    return losses


@torch.no_grad()
def predict(detector: Any, ds: DetectionFolder, batch_size: int, desc: str, *, num_workers: int = 0,
            keep: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Tensor]]]:
    """COCO result rows of ``detector`` on every image of ``ds``, and the raw outputs (boxes at ``S x S``,
    scores, labels) of the first ``keep`` images (for pictures)."""
    detector.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_detection, num_workers=num_workers)
    rows: list[dict[str, Any]] = []
    kept: list[dict[str, Tensor]] = []
    for images, _, indices in progress(loader, desc, total=len(loader)):
        for i, out in zip(indices, detector(list(images))):
            rows += ds.to_coco(i, out["boxes"], out["scores"], out["labels"])
            if len(kept) < keep:
                kept.append({k: v.detach().cpu() for k, v in out.items()})
    return rows, kept
