"""Detection transfer's parts: COCO AP against hand-worked boxes, the JSON checks, the horses boxes, the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stratavit.evaluation.detection_ap import coco_box_ap
from stratavit.evaluation.detection_data import DetectionFolder, read_coco
from stratavit.evaluation.detection_model import (
    SimpleFeaturePyramid,
    build_detector,
    pyramid_strides,
    required_multiple,
)
from stratavit.evaluation.detection_train import FineTune, fine_tune, hflip
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.horses_boxes import build_horses_boxes, mask_boxes


# --------------------------------------------------------------------------- AP
def _interpolated_ap(tp: list[bool], num_truths: int) -> float:
    """COCO's 101-point interpolated AP of detections in score order (independent reference)."""
    hits = np.cumsum(tp)
    recall = hits / num_truths
    precision = hits / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at any higher recall
    points = []
    for r in np.linspace(0, 1, 101):
        reached = np.nonzero(recall >= r - 1e-12)[0]
        points.append(precision[reached[0]] if len(reached) else 0.0)
    return float(np.mean(points))


def test_ap_of_hand_worked_boxes() -> None:
    # two true boxes; three detections: p1 exact on A (IoU 1), p3 on A again (IoU 0.8, A is taken: a false
    # positive), p2 on B with IoU 10 * 6.2 / (10 * 10) = 0.62 (a hit for IoU thresholds 0.50, 0.55, 0.60 only)
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
          "categories": [{"id": 7, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
                          {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 10, 10]}]}
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 8], "score": 0.8},
            {"image_id": 1, "category_id": 7, "bbox": [50, 50, 10, 6.2], "score": 0.7}]
    loose = _interpolated_ap([True, False, True], 2)  # IoU thresholds 0.50 .. 0.60
    strict = _interpolated_ap([True, False, False], 2)  # 0.65 .. 0.95
    assert loose == pytest.approx((51 + 50 * 2 / 3) / 101) and strict == pytest.approx(51 / 101)
    got = coco_box_ap(gt, dets)
    assert got["ap50"] == pytest.approx(100 * loose, abs=1e-3)
    assert got["ap75"] == pytest.approx(100 * strict, abs=1e-3)
    assert got["ap"] == pytest.approx(100 * (3 * loose + 7 * strict) / 10, abs=1e-3)  # = 61000 / 1010 %


def test_ap_without_detections_is_zero_and_without_truth_undefined() -> None:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
          "categories": [{"id": 1, "name": "x"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}]}
    assert coco_box_ap(gt, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with pytest.raises(ValueError, match="no annotations"):
        coco_box_ap({**gt, "annotations": []}, [])


# --------------------------------------------------------------------------- horses boxes
def test_mask_boxes_of_a_hand_made_mask() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[1:4, 2:6] = 1  # rows 1..3, columns 2..5 -> [x=2, y=1, w=4, h=3]
    mask[5, 7] = mask[6, 8] = mask[7, 8:11] = mask[8, 9] = 1  # diagonal neighbours: one 8-connected component
    mask[9, 0] = 1  # a speck of 1 px (< 2 % of 120 px): dropped
    mask[0, 11] = 255  # ignore id: not foreground
    assert mask_boxes(mask, min_fraction=0.02) == [[2, 1, 4, 3], [7, 5, 4, 4]]
    assert mask_boxes(mask, min_fraction=0.0) == [[2, 1, 4, 3], [7, 5, 4, 4], [0, 9, 1, 1]]


def test_horses_boxes_sample_is_built_once_and_valid() -> None:
    folder = build_horses_boxes("horses-boxes:val")
    coco = read_coco(folder / "annotations.json")
    assert len(coco["images"]) == 128 and len(coco["annotations"]) >= 128
    assert [c["name"] for c in coco["categories"]] == ["horse"]
    again = (folder / "annotations.json").read_text()
    assert build_horses_boxes("horses-boxes:val") == folder and (folder / "annotations.json").read_text() == again
    with pytest.raises(EvaluationError, match="horses-boxes:train or horses-boxes:val"):
        build_horses_boxes("horses-boxes:test")


# --------------------------------------------------------------------------- the JSON reader
def _dataset(tmp_path: Path, **change) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "images" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 3, 20, 15]}],
            "categories": [{"id": 3, "name": "box"}]}
    coco.update(change)
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path


def test_a_good_folder_reads_with_scaled_boxes(tmp_path: Path) -> None:
    ds = DetectionFolder(_dataset(tmp_path), 20)
    image, target, i = ds[0]
    assert image.shape == (3, 20, 20) and 0 <= float(image.min()) and float(image.max()) <= 1 and i == 0
    assert torch.allclose(target["boxes"], torch.tensor([[2.0, 2.0, 12.0, 12.0]]))  # x * 20/40, y * 20/30
    assert target["labels"].tolist() == [1]
    rows = ds.to_coco(0, target["boxes"], torch.tensor([0.5]), target["labels"])
    assert rows[0]["category_id"] == 3 and rows[0]["bbox"] == pytest.approx([4, 3, 20, 15])
    assert DetectionFolder(tmp_path / "annotations.json", 20).identity() == ds.identity()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"annotations": []}, "has no annotations"),
        ({"categories": [{"id": 3}]}, "a category has no 'name'"),
        ({"annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}, "has no 'category_id'"),
        ({"annotations": [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}, "category id 9, which is not in"),
        ({"annotations": [{"image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}]}, "image id 2, which is not in"),
        ({"annotations": [{"image_id": 1, "category_id": 3, "bbox": [30, 0, 20, 10]}]}, "lies outside the 40x30 image"),
        ({"annotations": [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 0, 10]}]}, "a box of no area"),
        ({"annotations": [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 10]}]}, "a bbox is \\[x, y, width, height\\]"),
        ({"images": [{"id": 1, "file_name": "gone.png", "width": 40, "height": 30}]}, "gone.png .* does not exist"),
    ],
)
def test_bad_annotations_give_one_line(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(EvaluationError, match=message) as info:
        DetectionFolder(_dataset(tmp_path, **change), 32)
    assert "\n" not in str(info.value)


def test_missing_and_corrupt_files_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="does not exist or is not a folder or a .json"):
        DetectionFolder(tmp_path / "nothing", 32)
    (tmp_path / "images").mkdir()
    with pytest.raises(EvaluationError, match="annotations.json do not exist"):
        DetectionFolder(tmp_path, 32)
    (tmp_path / "annotations.json").write_text('{"images": [')
    with pytest.raises(EvaluationError, match="is not valid JSON"):
        DetectionFolder(tmp_path, 32)
    (tmp_path / "annotations.json").write_text('{"images": []}')
    with pytest.raises(EvaluationError, match="the file has no 'annotations'"):
        DetectionFolder(tmp_path, 32)
    _dataset(tmp_path, images=[{"id": 1, "file_name": "a.png", "width": 50, "height": 30}])
    with pytest.raises(EvaluationError, match="is 40x30 but .* says 50x30"):
        DetectionFolder(tmp_path, 32)[0]


# --------------------------------------------------------------------------- the model
def _vit(patch: int, size: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=patch, embed_dim=32, depth=2,
                             num_heads=2, num_classes=0)


def test_simple_feature_pyramid_levels_follow_vitdet() -> None:
    vit16 = _vit(16, 64)
    assert pyramid_strides(vit16) == [4, 8, 16, 32] and required_multiple(vit16) == 32
    assert pyramid_strides(_vit(4, 32)) == [4, 8] and required_multiple(_vit(4, 32)) == 8
    sfp = SimpleFeaturePyramid(32, 16, [4, 8, 16, 32], 24)
    maps = sfp(torch.randn(2, 32, 4, 4))  # a 64 px image's 4 x 4 grid at stride 16
    assert [tuple(m.shape) for m in maps.values()] == [(2, 24, 16, 16), (2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]


def test_hflip_moves_boxes_with_the_image() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    targets = [{"boxes": torch.tensor([[0.0, 1.0, 1.0, 3.0]]), "labels": torch.tensor([1])}] * 2
    out, t = hflip(images, targets, torch.tensor([True, False]))
    assert torch.equal(out[0], images[0].flip(-1)) and torch.equal(out[1], images[1])
    assert t[0]["boxes"].tolist() == [[3.0, 1.0, 4.0, 3.0]] and t[1]["boxes"].tolist() == [[0.0, 1.0, 1.0, 3.0]]


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_fine_tune_trains_the_heads_and_the_backbone_only_in_finetune_mode(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    body = _vit(4, 32)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    ds = DetectionFolder(_dataset(tmp_path), 32)
    det = build_detector(body, 1, 32, 16, mode == "frozen", (0.5,) * 3, (0.25,) * 3)
    heads = det.roi_heads.box_predictor.cls_score.weight.clone()
    losses = fine_tune(det, ds, FineTune(3, 2, 1e-3, 1, mode, 0.5), "test")  # type: ignore[arg-type]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not torch.equal(heads, det.roi_heads.box_predictor.cls_score.weight)
    moved = any(not torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert moved == (mode == "finetune")
    with torch.no_grad():
        out = det([ds[0][0]])[0]
    assert out["boxes"].shape[1] == 4 and out["boxes"].shape[0] == out["scores"].shape[0]


def test_a_cnn_body_gets_its_stages_and_an_fpn(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body = timm.create_model("resnet18", num_classes=0)  # what `export` writes for mcl-resnet's body
    assert pyramid_strides(body) == [4, 8, 16, 32] and required_multiple(body) == 32
    det = build_detector(body, 1, 64, 16, True, (0.5,) * 3, (0.25,) * 3)
    maps = det.backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps.values()] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    ds = DetectionFolder(_dataset(tmp_path), 64)
    losses = fine_tune(det, ds, FineTune(1, 1, 1e-3, 0, "frozen", 0.1), "test")  # type: ignore[arg-type]
    assert np.isfinite(losses[0]) and not det.backbone.body.training  # batch-norm statistics stay as they were
