"""``horses-boxes:train`` / ``horses-boxes:val``: detection boxes derived from the shipped Weizmann Horses masks.

Each foreground connected component (8-connected, mask id > 0 and not the ignore id 255) of a
mask becomes one ``horse`` box, its tight pixel bounding box; components smaller than
:data:`MIN_FRACTION` of the image are dropped (specks of a mask, not horses). The COCO JSON is
written once, deterministically, beside the sample's ``images/`` (``<sample>/<split>/annotations.json``),
so the folder has the detection layout ``D/annotations.json`` + ``D/images/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from stratavit.data.datasets import sample_dir
from stratavit.evaluation.errors import EvaluationError

__all__ = ["HORSES_BOXES", "MIN_FRACTION", "build_horses_boxes", "mask_boxes"]

HORSES_BOXES = "horses-boxes"
"""``--detection-train horses-boxes:train --detection-val horses-boxes:val``."""
MIN_FRACTION = 0.01
"""Components covering less than this fraction of the image's pixels are not boxes."""
IGNORE_ID = 255


def mask_boxes(mask: np.ndarray, min_fraction: float = MIN_FRACTION) -> list[list[int]]:
    """COCO boxes ``[x, y, w, h]`` (pixels, inclusive extents) of the foreground components of ``mask`` ``(H, W)``.

    Foreground: ids other than 0 and 255; 8-connectivity; components of fewer than
    ``min_fraction * H * W`` pixels are dropped. Ordered by the components' first pixel in
    row-major order.
    """
    fg = (mask != 0) & (mask != IGNORE_ID)
    labels, count = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or int((labels[sl] == i).sum()) < min_fraction * mask.size:
            continue
        ys, xs = sl
        boxes.append([int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start)])
    return boxes


def _coco_of(folder: Path) -> dict:
    images, annotations = [], []
    for image_id, path in enumerate(sorted((folder / "images").iterdir()), start=1):
        mask_path = folder / "masks" / f"{path.stem}.png"
        with Image.open(mask_path) as m:
            mask = np.array(m)
        images.append({"id": image_id, "file_name": path.name, "width": int(mask.shape[1]), "height": int(mask.shape[0])})
        for box in mask_boxes(mask):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "horse"}]}


def build_horses_boxes(spec: str) -> Path:
    """The folder of ``horses-boxes:<split>`` (``annotations.json`` + ``images/``), written on first use."""
    _, _, split = spec.partition(":")
    if split not in ("train", "val"):
        raise EvaluationError(f"{spec}: use {HORSES_BOXES}:train or {HORSES_BOXES}:val")
    folder = sample_dir("horses_sample") / split
    target = folder / "annotations.json"
    if not target.exists():
        tmp = target.with_name(f".annotations.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(_coco_of(folder)))
        tmp.replace(target)
    return folder
