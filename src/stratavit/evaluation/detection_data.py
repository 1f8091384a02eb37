"""Detection data: COCO-format annotations + an image folder, checked, read at the detection size.

Accepted layouts of ``--detection-train D`` / ``--detection-val D``::

    D/annotations.json + D/images/<file_name>      a folder
    path/to/any.json  + path/to/images/<file_name>  a COCO JSON file (images in its folder's images/)
    horses-boxes:train | horses-boxes:val           the shipped sample (boxes from the horse masks)

The JSON is COCO's detection format: ``images`` (``id``, ``file_name``, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels; optional
``iscrowd``, ``area``, ``id``), ``categories`` (``id``, ``name``). Every fault (missing file, bad
JSON, missing keys, a box outside its image or of no area, an unknown image or category id, no
annotations, a missing or mis-sized image) is one :class:`~stratavit.evaluation.errors.EvaluationError`
line naming the file and what to do.

Resize policy: each image is stretched to ``S x S`` (bilinear, antialiased; nothing cropped) and
its boxes scaled by ``S / width``, ``S / height``; predictions are scaled back and scored against
the original boxes (:meth:`DetectionFolder.coco`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.horses_boxes import HORSES_BOXES, build_horses_boxes

__all__ = ["ANNOTATIONS_NAME", "DetectionFolder", "collate_detection", "detection_source", "read_coco"]

ANNOTATIONS_NAME = "annotations.json"
BOX_TOLERANCE = 1.0
"""Pixels a box may reach beyond its image's border (rounding of annotation tools) before it is refused."""
LAYOUT = f"a folder with {ANNOTATIONS_NAME} + images/, a COCO .json with images/ beside it, or {HORSES_BOXES}:train|val"


def _id_order(value: Any) -> tuple[str, Any]:
    """Sort key of COCO ids: numbers in numeric order (ids of one type compare)."""
    return type(value).__name__, value


def detection_source(spec: str | Path) -> tuple[Path, Path]:
    """``(annotation JSON, images folder)`` of a ``--detection-train`` / ``--detection-val`` value."""
    text = str(spec)
    if text.startswith(f"{HORSES_BOXES}:") and not Path(text).exists():
        folder = build_horses_boxes(text)
        return folder / ANNOTATIONS_NAME, folder / "images"
    path = Path(text).expanduser()
    if path.is_dir():
        json_path, images = path / ANNOTATIONS_NAME, path / "images"
    elif path.suffix.lower() == ".json":
        json_path, images = path, path.parent / "images"
    else:
        raise EvaluationError(f"detection data {text} does not exist or is not a folder or a .json; pass {LAYOUT}")
    if not json_path.is_file():
        raise EvaluationError(f"detection annotations {json_path} do not exist; pass {LAYOUT}")
    if not images.is_dir():
        raise EvaluationError(f"detection images folder {images} does not exist; the JSON's file_names are read from there")
    return json_path, images


def _need(entry: Any, keys: Sequence[str], what: str, path: Path) -> None:
    if not isinstance(entry, Mapping):
        raise EvaluationError(f"{path}: {what} is not an object; see the COCO detection format")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise EvaluationError(f"{path}: {what} has no '{missing[0]}' (needs {', '.join(keys)}); see the COCO detection format")


def _box(ann: Mapping[str, Any], image: Mapping[str, Any], path: Path) -> list[float]:
    bbox = ann["bbox"]
    where = f"{path}: annotation {ann.get('id', '?')} (image {image['id']}, {image['file_name']})"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise EvaluationError(f"{where} has bbox {bbox!r}; a bbox is [x, y, width, height] in pixels")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise EvaluationError(f"{where} has a box of no area ({w} x {h}); remove it or fix its size")
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > image["width"] + t or y + h > image["height"] + t:
        raise EvaluationError(
            f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {image['width']}x{image['height']} image; "
            "boxes are [x, y, width, height] in the image's pixels"
        )
    return [x, y, w, h]


def read_coco(json_path: Path) -> dict[str, Any]:
    """The checked COCO dictionary of ``json_path`` (boxes clipped to their image, ``area`` / ``iscrowd`` filled).

    Raises:
        EvaluationError: unreadable or invalid JSON, missing keys, duplicate ids, unknown image or
            category ids, boxes of no area or outside their image, no annotation.
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"detection annotations {path} do not exist; pass {LAYOUT}") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read {path}: {e}") from None
    _need(data, ("images", "annotations", "categories"), "the file", path)
    categories: dict[Any, str] = {}
    for c in data["categories"]:
        _need(c, ("id", "name"), "a category", path)
        categories[c["id"]] = str(c["name"])
    if not categories:
        raise EvaluationError(f"{path} lists no categories; add at least one {{'id': 1, 'name': ...}}")
    images: dict[Any, dict[str, Any]] = {}
    for im in data["images"]:
        _need(im, ("id", "file_name", "width", "height"), "an image", path)
        if im["id"] in images:
            raise EvaluationError(f"{path}: two images have the id {im['id']}; image ids must be unique")
        images[im["id"]] = im
    annotations = []
    for ann in data["annotations"]:
        _need(ann, ("image_id", "category_id", "bbox"), "an annotation", path)
        if ann["image_id"] not in images:
            raise EvaluationError(f"{path}: annotation {ann.get('id', '?')} refers to image id {ann['image_id']}, "
                                  "which is not in 'images'")
        if ann["category_id"] not in categories:
            raise EvaluationError(
                f"{path}: annotation {ann.get('id', '?')} has category id {ann['category_id']}, which is not in "
                f"'categories' (ids {sorted(categories, key=_id_order)[:10]})"
            )
        image = images[ann["image_id"]]
        x, y, w, h = _box(ann, image, path)
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
        annotations.append({**ann, "id": ann.get("id", len(annotations) + 1), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(ann.get("area", (x1 - x0) * (y1 - y0))), "iscrowd": int(ann.get("iscrowd", 0))})
    if not annotations:
        raise EvaluationError(f"{path} has no annotations: a detection data set needs boxes")
    return {"images": list(images.values()), "annotations": annotations,
            "categories": [{"id": k, "name": v} for k, v in sorted(categories.items(), key=lambda kv: _id_order(kv[0]))]}


def collate_detection(items: list[tuple[Tensor, dict[str, Tensor], int]]) -> tuple[Tensor, list[dict[str, Tensor]], list[int]]:
    """Items -> ``(images (B, 3, S, S), targets, indices)``."""
    return torch.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]


class DetectionFolder(Dataset):
    """The images of a COCO JSON at ``S x S``, with their boxes scaled to it.

    Args:
        spec: ``--detection-train`` / ``--detection-val`` value (see the module docstring).
        size: side ``S`` of the network input.
        max_images: keep a fixed random subset of this many images (seeded by ``seed``, in id
            order); ``None``: all. :attr:`total` counts the images before the cut.
        categories: the category list to label with (the train split's, for a val split), else its own.

    Items: ``(image (3, S, S) float32 in [0, 1], {"boxes": (K, 4) float32 x0 y0 x1 y1 in S-pixels,
    "labels": (K,) int64 in 1..C}, index)``; crowd annotations are not training targets.
    """

    def __init__(self, spec: str | Path, size: int, *, max_images: int | None = None, seed: int = 0,
                 categories: list[dict[str, Any]] | None = None) -> None:
        self.json_path, self.images_dir = detection_source(spec)
        self.size = int(size)
        coco = read_coco(self.json_path)
        self.categories = categories if categories is not None else coco["categories"]
        known = {c["id"] for c in self.categories}
        unknown = sorted({a["category_id"] for a in coco["annotations"]} - known, key=_id_order)
        if unknown:
            raise EvaluationError(
                f"{self.json_path} has category id(s) {unknown[:5]} the detection train set does not have; "
                "use the same categories in both splits"
            )
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        images = sorted(coco["images"], key=lambda im: _id_order(im["id"]))
        self.total = len(images)
        if max_images is not None and max_images < len(images):
            g = torch.Generator().manual_seed(int(seed))
            images = [images[i] for i in torch.randperm(len(images), generator=g)[:max_images].sort().values.tolist()]
        for im in images:
            if not (self.images_dir / im["file_name"]).is_file():
                raise EvaluationError(f"image {self.images_dir / im['file_name']} (listed in {self.json_path}) does "
                                      "not exist; add it or remove it from the JSON")
        self.images = images
        ids = {im["id"] for im in images}
        self.annotations = [a for a in coco["annotations"] if a["image_id"] in ids]
        self._by_image: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in images}
        for a in self.annotations:
            self._by_image[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, i: int) -> Image.Image:
        """Image ``i`` in RGB at its own size (checked against the JSON's width and height)."""
        im = self.images[i]
        path = self.images_dir / im["file_name"]
        try:
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise EvaluationError(f"cannot read image {path}: {e}; replace or remove the file") from None
        if rgb.size != (im["width"], im["height"]):
            raise EvaluationError(f"image {path} is {rgb.size[0]}x{rgb.size[1]} but {self.json_path} says "
                                  f"{im['width']}x{im['height']}; fix the JSON's width and height")
        return rgb

    def target(self, i: int) -> dict[str, Tensor]:
        """Boxes ``(K, 4)`` (x0, y0, x1, y1 at ``S x S``) and labels ``(K,)`` of image ``i``, crowds left out."""
        im = self.images[i]
        sx, sy = self.size / im["width"], self.size / im["height"]
        anns = [a for a in self._by_image[im["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                               (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels}

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor], int]:
        image = self.read_image(i).resize((self.size, self.size), Image.BILINEAR)
        return pil_to_tensor(image).float() / 255.0, self.target(i), i

    def to_coco(self, i: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict[str, Any]]:
        """Detections of image ``i`` at ``S x S`` (boxes ``(D, 4)`` x0 y0 x1 y1, labels 1..C) -> COCO result rows
        in the original image's pixels."""
        im = self.images[i]
        sx, sy = im["width"] / self.size, im["height"] / self.size
        rows = []
        for (x0, y0, x1, y1), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            rows.append({"image_id": im["id"], "category_id": self.categories[int(c) - 1]["id"],
                         "bbox": [x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy], "score": float(s)})
        return rows

    def coco(self) -> dict[str, Any]:
        """The ground truth of the images used, as a COCO dictionary (original pixels)."""
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}

    def identity(self) -> str:
        """Short fingerprint of the images and boxes used (file names, sizes, boxes, categories): the same data
        elsewhere has the same identity (``results.json``, for ``compare``)."""
        h = hashlib.sha1()
        h.update(json.dumps([[im["file_name"], im["width"], im["height"]] for im in self.images]).encode())
        h.update(json.dumps([[a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]] for a in self.annotations],
                            default=str).encode())
        h.update(json.dumps(self.categories, default=str).encode())
        return h.hexdigest()[:16]
