"""Tests for the dense (segmentation) probe (stratavit.evaluation.dense)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from stratavit.evaluation.dense import dense_probe
from stratavit.evaluation.dense_head import (
    auto_epochs,
    confusion_matrix,
    evaluate_dense_head,
    loss_side,
    segmentation_scores,
    train_dense_head,
)
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.segmentation_data import SegmentationFolder


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
        num_classes=0,
    ).eval()


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def test_confusion_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])  # the prediction under the 255 pixel is not counted
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(conf)
    # IoU: class 0: 2 / (3 + 3 - 2), class 1: 2 / (3 + 3 - 2), class 2: 1 / 1, class 3 absent from both
    assert s["per_class_iou"][:3] == pytest.approx([50.0, 50.0, 100.0])
    assert s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx(200.0 / 3)  # class 3 is excluded from the mean
    assert s["pixel_acc"] == pytest.approx(100.0 * 5 / 7)


def test_class_only_predicted_counts_as_zero_iou():
    target = torch.zeros(2, 3, dtype=torch.int64)
    pred = torch.tensor([[0, 0, 1], [0, 0, 0]])
    s = segmentation_scores(confusion_matrix(pred, target, num_classes=3))
    assert s["per_class_iou"] == [pytest.approx(500.0 / 6), 0.0, None]
    assert s["miou"] == pytest.approx(500.0 / 12)
    empty = segmentation_scores(confusion_matrix(pred, torch.full_like(target, 255), num_classes=3))
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_acc"])


def test_confusion_rejects_bad_ids_and_shapes():
    with pytest.raises(EvaluationError, match="class id 3 but num_classes is 3"):
        confusion_matrix(torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 3, 255]), num_classes=3)
    with pytest.raises(EvaluationError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), num_classes=2)


# --------------------------------------------------------------------------- #
# the head on synthetic features
# --------------------------------------------------------------------------- #
def _separable(n: int, seed: int, gh: int = 8, c: int = 16, k: int = 3, p: int = 4):
    """Random features whose first ``k`` channels decide the patch class (argmax), in quadrant blobs."""
    g = torch.Generator().manual_seed(seed)
    quads = torch.randint(0, k, (n, 2, 2), generator=g)
    cls = quads.repeat_interleave(gh // 2, 1).repeat_interleave(gh // 2, 2)  # (n, gh, gh)
    x = torch.randn(n, gh, gh, c, generator=g)
    x[..., :k] = 4.0 * F.one_hot(cls, k) + 0.3 * torch.randn(n, gh, gh, k, generator=g)
    assert torch.equal(x[..., :k].argmax(-1), cls)  # the mask is a function of the feature
    masks = cls.repeat_interleave(p, 1).repeat_interleave(p, 2)  # nearest-upsampled to S = gh * p
    return 3.0 * x - 1.0, masks, cls  # offset / scale: exercises the standardisation


def test_separable_features_reach_99_miou(tmp_path):
    xtr, ytr, _ = _separable(48, seed=0)
    xva, yva, cva = _separable(24, seed=1)
    ytr[:, :2] = 255  # ignored pixels do not hurt
    head = train_dense_head(xtr, ytr, 3, seed=0)
    scores = evaluate_dense_head(head, xva, list(yva), 3)
    assert scores["miou"] >= 99.0 and scores["pixel_acc"] >= 99.0
    # masks at another (original) resolution: logits are upsampled to each mask's own size
    other = [F.interpolate(c[None, None].float(), size=(40, 56), mode="nearest")[0, 0].long() for c in cva]
    assert evaluate_dense_head(head, xva, other, 3)["miou"] >= 98.0
    # float16 memmap features (the dense_probe store) give the same head; training is deterministic
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(xtr.shape))
    mm[:] = xtr.numpy().astype(np.float16)
    a = train_dense_head(mm, ytr.numpy().astype(np.uint8), 3, seed=0)
    b = train_dense_head(mm, ytr.numpy().astype(np.uint8), 3, seed=0)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert evaluate_dense_head(a, xva, list(yva), 3)["miou"] >= 99.0


def test_random_masks_give_chance():
    g = torch.Generator().manual_seed(0)
    xtr, xva = torch.randn(48, 8, 8, 16, generator=g), torch.randn(48, 8, 8, 16, generator=g)
    ytr = torch.randint(0, 2, (48, 8, 8), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    yva = torch.randint(0, 2, (48, 8, 8), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    head = train_dense_head(xtr, ytr, 2, seed=0)
    scores = evaluate_dense_head(head, xva, list(yva), 2)
    assert 42.0 <= scores["pixel_acc"] <= 58.0  # chance: 50 %
    assert scores["miou"] <= 45.0  # chance: ~33 % (random guesses) down to 25 % (one class)


def test_train_dense_head_rejects_bad_input():
    x = torch.randn(4, 2, 2, 8)
    with pytest.raises(EvaluationError, match="class id 5 but num_classes is 3"):
        train_dense_head(x, torch.full((4, 8, 8), 5), 3, epochs=1)
    with pytest.raises(EvaluationError, match=r"\(N, S, S\) with N = 4"):
        train_dense_head(x, torch.zeros(3, 8, 8, dtype=torch.int64), 3, epochs=1)
    with pytest.raises(EvaluationError, match="every training mask pixel is 255"):
        train_dense_head(x, torch.full((4, 8, 8), 255), 3, epochs=1)
    with pytest.raises(EvaluationError, match=r"\(N, gh, gw, C\)"):
        train_dense_head(torch.randn(4, 8), torch.zeros(4, 8, 8), 3, epochs=1)
    assert auto_epochs(200, 16) == 31 and auto_epochs(100_000, 16) == 1


# --------------------------------------------------------------------------- #
# end to end on Weizmann horses
# --------------------------------------------------------------------------- #
def test_dense_probe_on_horses(horses_dir, tmp_path):
    model = _tiny_vit()
    cache = tmp_path / "cache"
    res = dense_probe(model, horses_dir / "train", horses_dir / "val", blocks=(1, -1), cache_dir=cache, limit=64)
    assert {"miou", "pixel_acc", "num_classes", "size", "resize_policy", "train_images", "val_images", "layers"} <= set(
        res
    )
    assert res["num_classes"] == 2 and res["size"] == 32
    assert res["train_images"] == 64 and res["val_images"] == 64
    assert res["epochs"] == 100  # default: 400 steps of 16 images
    assert "32x32" in res["resize_policy"]
    assert [layer["block"] for layer in res["layers"]] == [1, 2]
    for layer in res["layers"]:
        assert 0.0 <= layer["miou"] <= 100.0 and 0.0 <= layer["pixel_acc"] <= 100.0
        assert len(layer["per_class_iou"]) == 2
    assert res["miou"] == res["layers"][-1]["miou"] and res["pixel_acc"] == res["layers"][-1]["pixel_acc"]
    json.dumps(res)  # plain JSON

    # the float16 token stores are reused: same numbers, files untouched
    stamp = (cache / "train" / "feats.f16").stat().st_mtime_ns
    shape = json.loads((cache / "train" / "meta.json").read_text())["shape"]
    assert shape == [2, 64, 8, 8, 32]
    again = dense_probe(model, horses_dir / "train", horses_dir / "val", blocks=(-1,), cache_dir=cache, limit=64)
    assert (cache / "train" / "feats.f16").stat().st_mtime_ns == stamp
    assert again["layers"] == res["layers"][-1:]


def test_horse_masks_are_ids_at_their_own_size(horses_dir):
    ds = SegmentationFolder(horses_dir / "val", 48)
    image, mask, index = ds[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert mask.shape == (48, 48) and mask.dtype == torch.int64 and index == 0
    original = ds.original_mask(0)
    w, h = Image.open(ds.image_paths[0]).size
    assert original.shape == (h, w) and original.dtype == torch.int64
    assert set(original.unique().tolist()) == {0, 1}


# --------------------------------------------------------------------------- #
# other layouts and bad input
# --------------------------------------------------------------------------- #
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0, 0, 0] * 252 + [255, 255, 255]


def _write_pair(root: Path, stem: str, rng: np.random.Generator, size=(37, 53), ext=".png") -> None:
    """An image whose colour encodes the class of each region, and its palette (mode P) mask."""
    w, h = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = np.zeros((h, w), np.uint8)
    cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
    ids[:cy, cx:] = 1
    ids[cy:, :] = 2
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float64)
    rgb = colours[ids] + rng.normal(0, 20, (h, w, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{stem}{ext}")
    ids[cy, :] = 255  # a line of ignored pixels on the boundary
    mask = Image.fromarray(ids, mode="P")
    mask.putpalette(PALETTE)
    mask.save(root / "masks" / f"{stem}.png")


def _synthetic(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        _write_pair(root, f"img{i:03d}", rng, ext=(".png", ".jpg", ".bmp")[i % 3])
    return root


def test_three_classes_odd_sizes_palette_masks(tmp_path):
    train, val = _synthetic(tmp_path / "train", 12, 0), _synthetic(tmp_path / "val", 6, 1)
    ds = SegmentationFolder(val, 32)
    assert Image.open(ds.mask_paths[0]).mode == "P"
    original = ds.original_mask(0)
    assert original.shape == (53, 37)  # (H, W)
    assert set(original.unique().tolist()) == {0, 1, 2, 255}  # palette indices, not colours
    assert set(ds[0][1].unique().tolist()) <= {0, 1, 2, 255}  # nearest resize keeps ids
    res = dense_probe(_tiny_vit(), train, val, blocks=(1, 2), epochs=10)
    assert res["num_classes"] == 3 and res["train_images"] == 12 and res["val_images"] == 6
    for layer in res["layers"]:
        assert len(layer["per_class_iou"]) == 3
        assert all(v is not None for v in layer["per_class_iou"])
    assert res["miou"] > 80.0  # colour decides the class (~96 % measured); chance is ~33 % pixel accuracy


def test_bad_layouts(tmp_path):
    root = _synthetic(tmp_path / "d", 3, 0)
    with pytest.raises(EvaluationError, match="masks"):
        SegmentationFolder(tmp_path / "nowhere", 32)
    lonely = tmp_path / "no_masks"
    (lonely / "images").mkdir(parents=True)
    with pytest.raises(EvaluationError, match=r"no_masks/masks is not a folder"):
        SegmentationFolder(lonely, 32)
    (lonely / "masks").mkdir()
    with pytest.raises(EvaluationError, match="no image/mask pairs"):
        SegmentationFolder(lonely, 32)
    (root / "masks" / "img001.png").unlink()
    with pytest.raises(EvaluationError, match=r"1 image\(s\) .* have no mask .*: img001\.jpg"):
        SegmentationFolder(root, 32)


def test_corrupt_files_are_named(tmp_path):
    train, val = _synthetic(tmp_path / "train", 3, 0), _synthetic(tmp_path / "val", 3, 1)
    model = _tiny_vit()
    bad_mask = val / "masks" / "img001.png"
    bad_mask.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(EvaluationError, match="cannot read mask .*img001.png"):
        dense_probe(model, train, val, epochs=1)
    with pytest.raises(EvaluationError, match="cannot read mask .*img001.png"):
        SegmentationFolder(val, 32)[1]
    _synthetic(tmp_path / "val", 3, 1)  # repair
    bad_image = train / "images" / "img002.bmp"
    bad_image.write_bytes(bad_image.read_bytes()[:200])  # truncated: the header reads, decoding fails
    with pytest.raises(EvaluationError, match="cannot read image .*img002.bmp"):
        dense_probe(model, train, val, epochs=1)
    # the same one-line message from a DataLoader worker process
    with pytest.raises(EvaluationError, match="^cannot read image .*img002.bmp"):
        dense_probe(model, train, val, epochs=1, num_workers=1)


def test_bad_masks_and_sizes(tmp_path):
    train, val = _synthetic(tmp_path / "train", 3, 0), _synthetic(tmp_path / "val", 3, 1)
    model = _tiny_vit()
    with pytest.raises(EvaluationError, match="not a multiple of the patch size 4x4"):
        dense_probe(model, train, val, size=30)
    with pytest.raises(EvaluationError, match=r"img00\d\.png holds class id 2 but num_classes is 2"):
        dense_probe(model, train, val, num_classes=2)
    with pytest.raises(EvaluationError, match="block 3 does not exist"):
        dense_probe(model, train, val, blocks=(3,))
    rgb = val / "masks" / "img000.png"
    Image.open(rgb).convert("RGB").save(rgb)
    with pytest.raises(EvaluationError, match="img000.png has 3 channels .* single-channel"):
        dense_probe(model, train, val)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(rgb)
    with pytest.raises(EvaluationError, match=r"img000.png is 10x10 but image .* is 37x53"):
        dense_probe(model, train, val)


def test_non_finite_tokens_are_reported(tmp_path):
    train, val = _synthetic(tmp_path / "train", 2, 0), _synthetic(tmp_path / "val", 2, 1)
    model = _tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.fill_(float("nan"))
    with pytest.raises(EvaluationError, match="non-finite .* at block 2"):
        dense_probe(model, train, val)


# --------------------------------------------------------------------------- #
# limits: the loss resolution, the image cap, the step budget
# --------------------------------------------------------------------------- #
def test_loss_side_caps_at_four_pixels_per_token():
    assert loss_side(224, 14) == 56  # ViT-S/16 at 224 px
    assert loss_side(64, 16) == 64 and loss_side(32, 8) == 32  # the demo and TINY: the masks' own size
    assert loss_side(224, 14, 112) == 112 and loss_side(64, 16, 500) == 64  # given: at most the input size
    feats, masks = torch.randn(8, 4, 4, 6), torch.randint(0, 3, (8, 32, 32))
    head = train_dense_head(feats, masks, 3, epochs=2, loss_size=16)
    assert head(feats[:1], size=(32, 32)).shape == (1, 3, 32, 32)


def test_dense_probe_caps_images_with_a_fixed_random_subset(horses_dir, tmp_path):
    model = _tiny_vit()
    res = dense_probe(model, horses_dir / "train", horses_dir / "val", max_images=20, steps=7, seed=3)
    assert (res["train_images"], res["val_images"], res["train_total"], res["val_total"]) == (20, 20, 200, 128)
    assert res["epochs"] == 4 and res["steps"] == 8  # 7 steps at least, in whole epochs of 2 steps (20 images)
    assert res["loss_size"] == 32 and res["layers"][-1]["loss_size"] == 32
    subset = SegmentationFolder(horses_dir / "train", 32, max_images=20, seed=3).stems
    assert subset == sorted(subset) and subset != SegmentationFolder(horses_dir / "train", 32, limit=20).stems
    assert subset == SegmentationFolder(horses_dir / "train", 32, max_images=20, seed=3).stems  # fixed
    assert res["train_fingerprint"] == SegmentationFolder(horses_dir / "train", 32, max_images=20, seed=3).identity()
