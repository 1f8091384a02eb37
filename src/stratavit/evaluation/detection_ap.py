"""COCO box AP of detections, by pycocotools' ``COCOeval`` (not a home-made AP).

:func:`coco_box_ap` takes the ground truth as a COCO dictionary (``images``, ``annotations``,
``categories``; boxes ``[x, y, w, h]`` in pixels of the original images) and the detections as
COCO result rows (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``) and returns
AP (IoU 0.50:0.95), AP50 and AP75 in percent, over every category and object size, at most 100
detections per image -- COCO's standard box metric (101-point interpolated precision).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["coco_box_ap"]


def _ground_truth(coco: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``coco`` with the fields ``COCOeval`` reads filled in (``area``, ``iscrowd``, ``id``)."""
    gt = {k: copy.deepcopy(v) for k, v in coco.items() if k in ("images", "annotations", "categories")}
    for i, ann in enumerate(gt["annotations"], start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return gt


def coco_box_ap(coco: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{"ap", "ap50", "ap75"}`` (%) of ``detections`` against the ground truth ``coco``.

    No detection at all scores 0 (pycocotools cannot load an empty result list). A ground truth
    without any annotation has no AP: :class:`ValueError`.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not coco.get("annotations"):
        raise ValueError("the ground truth has no annotations: AP is undefined")
    if not detections:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        gt = COCO()
        gt.dataset = _ground_truth(coco)
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(v) for v in ev.stats[:3])
    return {k: round(max(v, 0.0) * 100.0, 4) for k, v in (("ap", ap), ("ap50", ap50), ("ap75", ap75))}
