"""Geometry of views: pure functions over crop boxes and flips, batched as tensors.

Conventions (used by every method that reads geometry):

- A **box** is ``(x0, y0, x1, y1)`` in continuous source-image pixel coordinates: pixel ``(r, c)``
  of the source covers ``[c, c+1) x [r, r+1)``. Shape ``(..., 4)``.
- A view of size ``(S_h, S_w)`` shows the box resized to that size; if ``flip`` is true the view
  was mirrored horizontally *after* the crop. View coordinates are continuous too, in
  ``[0, S_w] x [0, S_h]``.
- All functions broadcast over leading dimensions, so a batch of ``B`` views is just boxes
  ``(B, 4)`` and flips ``(B,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_size(boxes: Tensor) -> Tensor:
    """(..., 4) boxes -> (..., 2) sizes ``(w, h)``."""
    return boxes[..., 2:] - boxes[..., :2]


def view_to_source(points: Tensor, boxes: Tensor, flips: Tensor, view_size: tuple[int, int]) -> Tensor:
    """Map view coordinates to source-image coordinates.

    Args:
        points: (..., P, 2) points ``(x, y)`` in view pixels.
        boxes: (..., 4) crop boxes in source pixels.
        flips: (...) bool, horizontal flip of each view.
        view_size: ``(S_h, S_w)`` of the views.
    Returns:
        (..., P, 2) points in source pixels.
    """
    s_h, s_w = view_size
    x = points[..., 0]
    y = points[..., 1]
    f = flips.to(torch.bool)[..., None]
    x = torch.where(f, s_w - x, x)
    x0, y0 = boxes[..., 0:1], boxes[..., 1:2]
    w, h = boxes[..., 2:3] - x0, boxes[..., 3:4] - y0
    return torch.stack((x0 + x * w / s_w, y0 + y * h / s_h), dim=-1)


def source_to_view(points: Tensor, boxes: Tensor, flips: Tensor, view_size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`view_to_source`: (..., P, 2) source points -> view points."""
    s_h, s_w = view_size
    x0, y0 = boxes[..., 0:1], boxes[..., 1:2]
    w, h = boxes[..., 2:3] - x0, boxes[..., 3:4] - y0
    x = (points[..., 0] - x0) * s_w / w
    y = (points[..., 1] - y0) * s_h / h
    f = flips.to(torch.bool)[..., None]
    x = torch.where(f, s_w - x, x)
    return torch.stack((x, y), dim=-1)


def patch_centers(grid: tuple[int, int], view_size: tuple[int, int]) -> Tensor:
    """Centres of a view's patch grid in view pixels, row-major: (gh * gw, 2) ``(x, y)``."""
    gh, gw = grid
    s_h, s_w = view_size
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) * s_h / gh
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) * s_w / gw
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


def patch_centers_in_source(
    boxes: Tensor, flips: Tensor, grid: tuple[int, int], view_size: tuple[int, int]
) -> Tensor:
    """Source-image position of every patch centre of every view: (B, gh * gw, 2)."""
    centers = patch_centers(grid, view_size).to(boxes)
    return view_to_source(centers.expand(*boxes.shape[:-1], -1, 2), boxes, flips, view_size)


def intersect(boxes_a: Tensor, boxes_b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection of two broadcastable box batches.

    Returns:
        ``(boxes, valid)``: (..., 4) intersection boxes (degenerate where empty) and (...) bool,
        true where the intersection has positive area.
    """
    lo = torch.maximum(boxes_a[..., :2], boxes_b[..., :2])
    hi = torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    valid = (hi > lo).all(dim=-1)
    hi = torch.maximum(hi, lo)
    return torch.cat((lo, hi), dim=-1), valid


def crop_box_from_params(top: int, left: int, height: int, width: int) -> Tensor:
    """torchvision crop parameters ``(i, j, h, w)`` -> box ``(x0, y0, x1, y1)`` (4,) float32."""
    return torch.tensor([left, top, left + width, top + height], dtype=torch.float32)
