"""Patch correspondences between two views of each image, from crop geometry (Local-Global).

For views A and B of the same source image (boxes ``(x0, y0, x1, y1)`` in source pixels, a
horizontal flip each), per sample and without a loop over the batch:

1. intersect the boxes; no overlap -> only CLS <-> CLS;
2. per view and axis with ``P`` patches: start = round(P · (inter_lo − crop_lo) / crop_len),
   count = round(P · inter_len / crop_len) (clipped to the grid); a flipped view mirrors its
   columns and walks them in reverse, so both sub-grids are listed in source order;
3. the larger sub-grid of each axis is subsampled to the smaller one's length with
   ``floor(linspace(0, L_big − 1, L_small))`` (exact integer arithmetic), giving one-to-one pairs.

Indices are **token** indices: 0 is the CLS token, patch ``(r, c)`` of a ``(gh, gw)`` grid is
``1 + r · gw + c`` (row-major), so they index ``LevelFeatures.tokens`` directly. Pair 0 is always
CLS <-> CLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stratavit.data.geometry import intersect


@dataclass
class PatchMatches:
    """Matched token pairs of ``B`` view pairs, padded to ``M`` pairs each.

    Attributes:
        idx_a, idx_b: (B, M) int64 token indices into view A's / view B's ``1 + N`` tokens.
        valid: (B, M) bool; column 0 (CLS <-> CLS) is always valid. Padding has index 0.
    """

    idx_a: Tensor
    idx_b: Tensor
    valid: Tensor

    @property
    def patch_pairs(self) -> Tensor:
        """(B,) number of matched patch pairs (CLS excluded)."""
        return self.valid[:, 1:].sum(dim=1)


def _axis_range(lo: Tensor, length: Tensor, inter_lo: Tensor, inter_len: Tensor, cells: int) -> tuple[Tensor, Tensor]:
    """Start cell and number of cells (B,) of the overlap on one axis of a ``cells``-long grid."""
    start = torch.round(cells * (inter_lo - lo) / length).long().clamp(0, cells)
    count = torch.round(cells * inter_len / length).long()
    return start, torch.minimum(count, cells - start).clamp_min(0)


def _subsample(k: Tensor, count: Tensor, length: Tensor) -> Tensor:
    """Offset of the k-th of ``length`` picks among ``count`` cells: floor(k · (count − 1) / (length − 1))."""
    num = k * (count - 1).clamp_min(0)
    return torch.where(length > 1, num // (length - 1).clamp_min(1), torch.zeros_like(num))


def match_patches(
    boxes_a: Tensor,
    flips_a: Tensor,
    grid_a: tuple[int, int],
    boxes_b: Tensor,
    flips_b: Tensor,
    grid_b: tuple[int, int],
) -> PatchMatches:
    """One-to-one token correspondences of view A and view B of every sample.

    Args:
        boxes_a, boxes_b: (B, 4) crop boxes in source pixels.
        flips_a, flips_b: (B,) bool horizontal flips (applied after the crop).
        grid_a, grid_b: ``(gh, gw)`` patch grids of the two views.
    Returns:
        :class:`PatchMatches` with ``M = 1 + min(gh_a, gh_b) · min(gw_a, gw_b)``.
    """
    inter, overlap = intersect(boxes_a.float(), boxes_b.float())
    inter_w, inter_h = inter[:, 2] - inter[:, 0], inter[:, 3] - inter[:, 1]
    per_view = []
    for boxes, (gh, gw) in ((boxes_a.float(), grid_a), (boxes_b.float(), grid_b)):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        col0, ncol = _axis_range(boxes[:, 0], w, inter[:, 0], inter_w, gw)
        row0, nrow = _axis_range(boxes[:, 1], h, inter[:, 1], inter_h, gh)
        per_view.append((col0, ncol, row0, nrow))
    (ca0, nca, ra0, nra), (cb0, ncb, rb0, nrb) = per_view
    lx = torch.minimum(nca, ncb) * overlap  # (B,) pairs per axis; 0 without overlap
    ly = torch.minimum(nra, nrb) * overlap
    kx = torch.arange(min(grid_a[1], grid_b[1]), device=boxes_a.device)[None, :]  # (1, Kx)
    ky = torch.arange(min(grid_a[0], grid_b[0]), device=boxes_a.device)[None, :]  # (1, Ky)

    def cols(c0: Tensor, n: Tensor, flip: Tensor, gw: int) -> Tensor:
        c = c0[:, None] + _subsample(kx, n[:, None], lx[:, None])  # (B, Kx) source order
        return torch.where(flip.to(torch.bool)[:, None], gw - 1 - c, c)

    def rows(r0: Tensor, n: Tensor) -> Tensor:
        return r0[:, None] + _subsample(ky, n[:, None], ly[:, None])  # (B, Ky)

    col_a, col_b = cols(ca0, nca, flips_a, grid_a[1]), cols(cb0, ncb, flips_b, grid_b[1])
    row_a, row_b = rows(ra0, nra), rows(rb0, nrb)
    tok_a = 1 + row_a[:, :, None] * grid_a[1] + col_a[:, None, :]  # (B, Ky, Kx)
    tok_b = 1 + row_b[:, :, None] * grid_b[1] + col_b[:, None, :]
    valid = (ky[:, :, None] < ly[:, None, None]) & (kx[:, None, :] < lx[:, None, None])  # (B, Ky, Kx)
    b = boxes_a.shape[0]
    ones = torch.ones(b, 1, dtype=torch.bool, device=boxes_a.device)
    zeros = torch.zeros(b, 1, dtype=torch.long, device=boxes_a.device)
    valid_flat = valid.reshape(b, -1)
    return PatchMatches(
        idx_a=torch.cat([zeros, torch.where(valid_flat, tok_a.reshape(b, -1), 0)], dim=1),
        idx_b=torch.cat([zeros, torch.where(valid_flat, tok_b.reshape(b, -1), 0)], dim=1),
        valid=torch.cat([ones, valid_flat], dim=1),
    )
