"""Montages for MCL (Guo et al. 2023): downscaled images tiled into canvases, with every tile's source.

Montage level ``i`` downscales each image of a batch by ``r = 2^i`` (nearest neighbour, as the
paper) and tiles ``r x r`` of them into one canvas of the original size, in a random permutation
of the batch: ``B`` images make ``B / r²`` canvases. Level 0 is the batch itself. For a ViT every
tile must cover whole patches (``S / r`` a multiple of the patch size), so a tile's region
embedding is the pool of the patch tokens inside it (:func:`tile_tokens`).

Everything is a batched tensor operation (one gather and reshapes), no loop over tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stratavit.config import ConfigError


@dataclass
class Montage:
    """One montage level of a batch.

    Attributes:
        canvases: (B / r², 3, S, S) tiled images.
        sources: (B / r², r²) int64 batch index of every tile, tiles row-major in their canvas.
        boxes: (r², 4) ``(x0, y0, x1, y1)`` of every tile in canvas pixels (the same in every canvas).
        ratio: ``r``.
    """

    canvases: Tensor
    sources: Tensor
    boxes: Tensor
    ratio: int


def check_montage_geometry(batch_size: int, size: int, patch: int, levels: int) -> None:
    """Raise :class:`ConfigError` unless every level ``i < levels`` tiles ``size`` into whole patches
    and the batch splits into whole canvases."""
    for i in range(levels):
        r = 2**i
        if size % (r * patch):
            raise ConfigError(
                f"montage level {i} cuts {size}-px images into {r}x{r} tiles of {size / r:g} px, which is not a "
                f"whole number of {patch}-px patches: use an image size that is a multiple of {r * patch} "
                f"or fewer montage levels"
            )
        if batch_size % (r * r):
            raise ConfigError(
                f"montage level {i} puts {r * r} images on a canvas, but the batch has {batch_size}: "
                f"use a batch size that is a multiple of {r * r}"
            )


def make_montage(images: Tensor, level: int, generator: torch.Generator | None = None) -> Montage:
    """Tile the batch ``images`` (B, 3, S, S) downscaled by ``2^level`` into ``B / 4^level`` canvases.

    Nearest-neighbour downscaling keeps pixel ``(r·y, r·x)`` of each image (the top-left pixel of
    every ``r x r`` block), so each tile's pixels are exactly pixels of its source image.
    """
    b, c, h, w = images.shape
    r = 2**level
    if h % r or w % r or b % (r * r):
        raise ValueError(f"cannot tile {b} images of {h}x{w} into {r}x{r} montages")
    small = images[:, :, ::r, ::r]  # (B, 3, h/r, w/r), nearest neighbour
    perm = torch.randperm(b, generator=generator).to(images.device)
    n = b // (r * r)
    tiles = small[perm].reshape(n, r, r, c, h // r, w // r)  # canvas, tile row, tile col, ...
    canvases = tiles.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    th, tw = h // r, w // r
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    boxes = torch.stack((cols * tw, rows * th, (cols + 1) * tw, (rows + 1) * th), dim=-1).reshape(r * r, 4)
    return Montage(canvases, perm.reshape(n, r * r), boxes.to(images.device, torch.float32), r)


def tile_tokens(patches: Tensor, grid: tuple[int, int], ratio: int) -> Tensor:
    """Mean patch token of every tile: (n, N, C) patch tokens of ``grid`` -> (n, r², C), row-major tiles."""
    n, _, ch = patches.shape
    gh, gw = grid
    if gh % ratio or gw % ratio:
        raise ValueError(f"a {gh}x{gw} patch grid does not split into {ratio}x{ratio} tiles")
    x = patches.reshape(n, ratio, gh // ratio, ratio, gw // ratio, ch)
    return x.mean(dim=(2, 4)).reshape(n, ratio * ratio, ch)
