"""Correspondence score: hand-worked geometry, position-exact features score 1, random ~chance."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from stratavit.data.geometry import patch_centers_in_source
from stratavit.evaluation.correspondence import (
    correspondence_score,
    make_view_pairs,
    match_scores,
    sample_crop,
)

VIEW = (32, 32)
GRID = (4, 4)  # patch 8


def position_features(boxes: torch.Tensor, flips: torch.Tensor, extent: float = 64.0, sigma: float = 2.0) -> torch.Tensor:
    """Features that encode the source position of each patch centre exactly: (B, gh, gw, A).

    Gaussian bumps on a 1-pixel anchor grid; the cosine similarity of two such vectors decreases
    monotonically with the distance of the two positions.
    """
    centers = patch_centers_in_source(boxes.float(), flips, GRID, VIEW)  # (B, P, 2)
    axis = torch.arange(0.0, extent + 1.0)
    ax, ay = torch.meshgrid(axis, axis, indexing="xy")
    anchors = torch.stack((ax.reshape(-1), ay.reshape(-1)), -1)  # (A, 2)
    d2 = ((centers[..., None, :] - anchors) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2)).reshape(boxes.shape[0], *GRID, -1)


def test_identity_crops_match_exactly_with_any_distinct_features():
    boxes = torch.tensor([[3.0, 5.0, 35.0, 37.0]])
    flips = torch.tensor([False])
    feats = torch.randn(1, *GRID, 16)
    s = match_scores(feats, feats, boxes, flips, boxes, flips, VIEW)
    assert s.queries == 16 and s.top1 == 100.0 and s.exact == 100.0


def test_hand_worked_shift_marks_only_overlapping_patches_as_queries():
    # A shows source x in [0, 32), B shows [16, 48): A's columns 2 and 3 (centres x=20, 28)
    # fall inside B at B-columns 0 and 1; columns 0 and 1 of A are outside B.
    boxes_a = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    boxes_b = torch.tensor([[16.0, 0.0, 48.0, 32.0]])
    no = torch.tensor([False])
    s = match_scores(position_features(boxes_a, no), position_features(boxes_b, no), boxes_a, no, boxes_b, no, VIEW)
    expected_valid = torch.tensor([[False, False, True, True]] * 4).reshape(1, 16)
    assert torch.equal(s.valid, expected_valid)
    assert s.queries == 8 and s.top1 == 100.0 and s.exact == 100.0
    # A's (row r, col 2) -> B's (row r, col 0): index r*4 + 0; col 3 -> col 1
    rows = torch.arange(4)
    assert s.nearest[0, rows * 4 + 2].tolist() == (rows * 4).tolist()
    assert s.nearest[0, rows * 4 + 3].tolist() == (rows * 4 + 1).tolist()
    # chance: a target in B's column 0 or 1 has a clipped 3x3 neighbourhood of 2 or 3 columns
    # times 2 or 3 rows; averaged over the 8 queries.
    near = {0: 2, 1: 3, 2: 3, 3: 2}
    expected = sum(near[r] * near[c] for r in range(4) for c in (0, 1)) / 8 / 16 * 100
    assert s.chance == pytest.approx(expected)


def test_flipped_view_matches_mirrored_columns():
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    s = match_scores(position_features(boxes, no), position_features(boxes, yes), boxes, no, boxes, yes, VIEW)
    idx = torch.arange(16)
    mirrored = (idx // 4) * 4 + (3 - idx % 4)
    assert s.queries == 16 and s.exact == 100.0
    assert torch.equal(s.nearest[0], mirrored)


def test_disjoint_crops_have_no_queries():
    a = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    b = torch.tensor([[40.0, 40.0, 56.0, 56.0]])
    no = torch.tensor([False])
    s = match_scores(torch.randn(1, *GRID, 8), torch.randn(1, *GRID, 8), a, no, b, no, VIEW)
    assert s.queries == 0 and np.isnan(s.top1)


def _random_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    boxes_a, boxes_b, flips_a, flips_b = [], [], [], []
    for _ in range(n):
        for boxes, flips in ((boxes_a, flips_a), (boxes_b, flips_b)):
            top, left, h, w = sample_crop(rng, 64, 64, (0.3, 1.0), (3 / 4, 4 / 3))
            boxes.append([left, top, left + w, top + h])
            flips.append(rng.random() < 0.5)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return t(boxes_a), torch.tensor(flips_a), t(boxes_b), torch.tensor(flips_b)


def test_position_exact_features_score_one_and_random_features_score_chance():
    ba, fa, bb, fb = _random_pairs(300)
    s = match_scores(position_features(ba, fa), position_features(bb, fb), ba, fa, bb, fb, VIEW)
    assert s.queries > 1000
    assert s.top1 == 100.0  # every query's nearest patch is within one patch of the truth
    assert s.exact > 90.0  # nearest in feature space is the containing patch almost always
    g = torch.Generator().manual_seed(0)
    r = match_scores(
        torch.randn(300, *GRID, 32, generator=g), torch.randn(300, *GRID, 32, generator=g), ba, fa, bb, fb, VIEW
    )
    assert abs(r.top1 - r.chance) < 4.0 and r.chance < 60.0


def test_sample_crop_stays_inside_the_image_and_respects_scale():
    rng = random.Random(1)
    for _ in range(200):
        top, left, h, w = sample_crop(rng, 50, 30, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h > 0 and w > 0


def _coordinate_image(w: int, h: int) -> Image.Image:
    """An image whose red channel encodes x and green channel encodes y."""
    xs = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    ys = np.tile(np.linspace(0, 255, h, dtype=np.float32)[:, None], (1, w))
    rgb = np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8)
    return Image.fromarray(rgb)


def test_view_pairs_geometry_matches_pixels():
    """The recorded boxes and flips say where each view's pixels come from in the source."""
    img = _coordinate_image(64, 48)
    pairs = make_view_pairs([img] * 8, 32, mean=(0, 0, 0), std=(1, 1, 1), seed=3)
    src = torch.from_numpy(np.array(img)).float() / 255
    for views, boxes, flips in ((pairs.view_a, pairs.boxes_a, pairs.flips_a), (pairs.view_b, pairs.boxes_b, pairs.flips_b)):
        centers = patch_centers_in_source(boxes, flips, (32, 32), (32, 32))  # every view pixel centre
        for i in range(8):
            xy = centers[i]
            cols = xy[:, 0].floor().long().clamp(0, 63)
            rows = xy[:, 1].floor().long().clamp(0, 47)
            expected = src[rows, cols, :2]  # (x, y) code of the source pixel under each view pixel
            got = views[i, :2].permute(1, 2, 0).reshape(-1, 2)
            assert (got - expected).abs().mean() < 0.03


def test_correspondence_score_end_to_end_with_a_vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=0,
    ).eval()
    images = [_coordinate_image(40 + i, 36) for i in range(10)]
    out = correspondence_score(model, images, size=32, mean=(0.5,) * 3, std=(0.25,) * 3, blocks=None, batch_size=4)
    assert [layer["block"] for layer in out["layers"]] == [1, 2]
    for layer in out["layers"]:
        assert 0.0 <= layer["top1"] <= 100.0 and 0.0 < layer["chance"] < 100.0
    assert out["top1"] == out["layers"][-1]["top1"] and out["pairs"] == 10
    ex = out["example"]
    assert ex["view_a"].shape == (3, 32, 32) and ex["points_a"].shape == ex["points_b"].shape
    assert ex["correct"].dtype == torch.bool and len(ex["correct"]) == len(ex["points_a"])
    again = correspondence_score(model, images, size=32, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4)
    assert again["layers"] == out["layers"]  # deterministic for a seed
