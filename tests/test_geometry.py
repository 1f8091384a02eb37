"""Geometry with hand-worked boxes, and a crop/flip round trip through real view making."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stratavit.config import ViewsConfig
from stratavit.data.geometry import (
    intersect,
    patch_centers,
    patch_centers_in_source,
    source_to_view,
    view_to_source,
)
from stratavit.data.views import ViewMaker


def test_view_to_source_hand_worked():
    # Box x 10..30 (w 20), y 5..15 (h 10), view 40x20 (h, w) -> scale x 0.5 per view px, y 0.5.
    boxes = torch.tensor([[10.0, 5.0, 30.0, 15.0], [10.0, 5.0, 30.0, 15.0]])
    flips = torch.tensor([False, True])
    pts = torch.tensor([[[0.0, 0.0], [20.0, 10.0], [40.0, 20.0]]]).expand(2, -1, -1)
    src = view_to_source(pts, boxes, flips, (20, 40))
    assert torch.allclose(src[0], torch.tensor([[10.0, 5.0], [20.0, 10.0], [30.0, 15.0]]))
    # flipped: view x=0 is the box's right edge
    assert torch.allclose(src[1], torch.tensor([[30.0, 5.0], [20.0, 10.0], [10.0, 15.0]]))


def test_round_trip_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy0 = torch.rand(64, 2, generator=g) * 100
    wh = torch.rand(64, 2, generator=g) * 50 + 1
    boxes = torch.cat([xy0, xy0 + wh], 1)
    flips = torch.rand(64, generator=g) > 0.5
    pts = torch.rand(64, 7, 2, generator=g) * 32
    back = source_to_view(view_to_source(pts, boxes, flips, (32, 32)), boxes, flips, (32, 32))
    assert torch.allclose(back, pts, atol=1e-4)


def test_patch_centers_and_source_positions():
    c = patch_centers((2, 2), (8, 8))
    assert torch.equal(c, torch.tensor([[2.0, 2.0], [6.0, 2.0], [2.0, 6.0], [6.0, 6.0]]))
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    src = patch_centers_in_source(boxes, torch.tensor([True]), (2, 2), (8, 8))
    # 2x scale, mirrored columns: first patch (top-left in the view) comes from the top-right
    assert torch.equal(src[0], torch.tensor([[12.0, 4.0], [4.0, 4.0], [12.0, 12.0], [4.0, 12.0]]))


def test_intersect_hand_worked():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[5.0, 2.0, 20.0, 8.0], [4.0, 0.0, 8.0, 4.0]])
    inter, valid = intersect(a, b)
    assert torch.equal(inter[0], torch.tensor([5.0, 2.0, 10.0, 8.0])) and bool(valid[0])
    assert not bool(valid[1])  # touching edges have no area


def _coordinate_image(w: int, h: int) -> Image.Image:
    """R = column, G = row: every pixel encodes its own source coordinates."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_view_pixels_come_from_the_recorded_box(flip_p):
    """Crop+flip a coordinate-encoding image; every view pixel's value is its mapped source pixel."""
    cfg = ViewsConfig(flip_p=flip_p, color_jitter_p=0.0, grayscale_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    size = 24
    maker = ViewMaker(cfg, size, (0.2, 0.6), blur_p=0.0, solarize_p=0.0)
    img = _coordinate_image(200, 120)
    torch.manual_seed(3)
    for _ in range(10):
        view = maker(img)
        assert view.flip == (flip_p == 1.0)
        assert view.source_size == (200, 120)
        centres = patch_centers((size, size), (size, size))  # pixel centres of the view
        src = view_to_source(centres, view.box, torch.tensor(view.flip), (size, size))
        values = (view.image * 255).round()  # (3, S, S)
        r = values[0].reshape(-1)
        g = values[1].reshape(-1)
        # resampling blurs by < 1 source pixel when downscaling with antialias; allow 1.5 px
        scale = float((view.box[2] - view.box[0]) / size)
        tol = 0.6 + scale
        assert (r - (src[:, 0] - 0.5)).abs().max() <= tol
        assert (g - (src[:, 1] - 0.5)).abs().max() <= tol
