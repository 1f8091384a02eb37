"""Montages for MCL (Guo et al. 2023): downscaled images tiled into canvases, with every tile's source.

Montage level ``i`` downscales each image of a batch of ``B`` by ``r = 2^i`` (nearest neighbour:
the top-left pixel of every ``r x r`` block, as the authors) and tiles ``r x r`` of them into one
canvas of the original size ``S``. Every image of the batch appears exactly ``c_i`` times at level
``i`` (``c_i`` = ``tile_copies[i]``): the tiles are ``c_i · B`` sources, a random permutation of
``range(c_i · B)`` taken modulo ``B``, so a level has ``c_i · B / r²`` canvases. The authors' values
``c = [1, 1, 1, 2]`` give ``B, B/4, B/16, B/32`` canvases (level 3: 64 tiles per canvas, every
image twice). Level 0 is the batch itself (in a permuted order).

Shapes: images (B, 3, S, S) -> canvases (c·B/r², 3, S, S), sources (c·B/r², r²), boxes (r², 4).

A tile's region embedding is either the mean of the patch tokens inside it (:func:`tile_tokens`,
``readout: pool``: tiles must cover whole patches, ``S / r`` a multiple of the patch) or RoI-align
on a feature pyramid (``readout: roi_align``, :mod:`stratavit.objectives.montage.readout`, any
``S / r``). :func:`montage_problems` lists everything a batch size / image size gets wrong, with
the nearest values that work.

Everything is a batched tensor operation (one gather and reshapes), no loop over tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stratavit.config import ConfigError


@dataclass
class Montage:
    """One montage level of a batch of ``B`` images.

    Attributes:
        canvases: (c·B / r², 3, S, S) tiled images.
        sources: (c·B / r², r²) int64 batch index of every tile, tiles row-major in their canvas;
            every index of ``range(B)`` occurs exactly ``c`` times.
        boxes: (r², 4) ``(x0, y0, x1, y1)`` of every tile in canvas pixels (the same in every canvas).
        ratio: ``r``.
        copies: ``c``, how many tiles every image has at this level.
    """

    canvases: Tensor
    sources: Tensor
    boxes: Tensor
    ratio: int
    copies: int = 1


def batch_multiple(tile_copies: list[int]) -> int:
    """The smallest ``M`` such that every batch size multiple of ``M`` fills whole canvases at every level.

    Level ``i`` has ``c_i · B / r²`` canvases (``r = 2^i``): ``B`` must be a multiple of
    ``r² / gcd(r², c_i)``; ``M`` is the lcm over the levels (32 for the authors' ``[1, 1, 1, 2]``).
    """
    m = 1
    for i, c in enumerate(tile_copies):
        r2 = 4**i
        m = math.lcm(m, r2 // math.gcd(r2, c))
    return m


def size_multiple(levels: int, patch: int, readout: str) -> int:
    """The smallest ``U`` such that every image size multiple of ``U`` works for ``levels`` montage levels.

    ``pool``: every tile (``S / r``) covers whole ``patch``-px patches, ``U = 2^(L−1) · patch``;
    ``roi_align``: every tile is a whole number of pixels and the backbone reads the image
    (``S`` a multiple of ``patch``), ``U = lcm(2^(L−1), patch)``.
    """
    r = 2 ** (levels - 1)
    return r * patch if readout == "pool" else math.lcm(r, patch)


def _neighbours(value: int, unit: int) -> str:
    """'a or b': the multiples of ``unit`` just below and above ``value`` (only those ≥ ``unit``)."""
    lo, hi = (value // unit) * unit, (value // unit + 1) * unit
    return f"{lo} or {hi}" if lo >= unit else f"{hi}"


def montage_problems(
    batch_size: int, size: int, patch: int, tile_copies: list[int], readout: str = "roi_align",
    batch_key: str = "data.batch_size", size_key: str = "views.global_size",
) -> list[str]:
    """Every reason why ``batch_size`` images of ``size`` px cannot be tiled, each with a fix that works.

    Args:
        batch_size: images per process; size: side of the (square) views.
        patch: the backbone's patch size (a CNN pyramid's coarsest stride).
        tile_copies: ``c_i`` of every montage level (its length is the number of levels).
        readout: ``pool`` (tiles must cover whole patches) or ``roi_align``.
        batch_key, size_key: the config keys named in the messages.
    Returns:
        one sentence per problem (empty when everything works).
    """
    problems = []
    levels = len(tile_copies)
    m = batch_multiple(tile_copies)
    if batch_size % m:
        bad = [i for i, c in enumerate(tile_copies) if (c * batch_size) % (4**i)]
        why = "; ".join(
            f"level {i}: {tile_copies[i]} x {batch_size} = {tile_copies[i] * batch_size} tiles, canvases of {4**i}"
            for i in bad
        )
        problems.append(
            f"{batch_key}={batch_size} does not fill whole montage canvases ({why}): the batch must be a "
            f"multiple of {m}: use {batch_key}={_neighbours(batch_size, m)}"
        )
    unit = size_multiple(levels, patch, readout)
    if size % unit:
        bad = [i for i in range(levels) if size % ((2**i) * patch if readout == "pool" else 2**i)]
        if readout == "pool" and bad:
            i = bad[-1]
            r = 2**i
            why = f"montage level {i} cuts it into {r}x{r} tiles of {size / r:g} px, not whole {patch}-px patches"
        elif bad:
            r = 2 ** bad[-1]
            why = f"montage level {bad[-1]} cuts it into {r}x{r} tiles of {size / r:g} px"
        else:
            why = f"the backbone reads images in {patch}-px patches"
        fix = f"use {size_key}={_neighbours(size, unit)} (with views.local_size equal to it)"
        if readout == "pool" and size % math.lcm(2 ** (levels - 1), patch) == 0:
            fix += " or objectives.montage.readout=roi_align (RoI-align reads tiles of any size)"
        problems.append(f"{size_key}={size}: {why}: {fix}")
    return problems


def raise_problems(problems: list[str], what: str = "objectives.montage") -> None:
    """One :class:`ConfigError` listing every problem (nothing when the list is empty)."""
    if len(problems) == 1:
        raise ConfigError(problems[0] if problems[0].startswith(what) else f"{what}: {problems[0]}")
    if problems:
        raise ConfigError(f"{what}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def check_montage_geometry(
    batch_size: int, size: int, patch: int, tile_copies: list[int], readout: str = "roi_align"
) -> None:
    """Raise one :class:`ConfigError` naming every problem of :func:`montage_problems` (and its fix)."""
    raise_problems(montage_problems(batch_size, size, patch, tile_copies, readout))


def make_montage(images: Tensor, level: int, generator: torch.Generator | None = None, copies: int = 1) -> Montage:
    """Tile the batch ``images`` (B, 3, S, S), each ``copies`` times, downscaled by ``r = 2^level``.

    Returns ``copies · B / r²`` canvases (:class:`Montage`). The tile sources are a random
    permutation of ``range(copies · B)`` modulo ``B``: every image appears exactly ``copies`` times,
    in random canvases and positions. Nearest-neighbour downscaling keeps pixel ``(r·y, r·x)`` of
    each image (the top-left pixel of every ``r x r`` block), so each tile's pixels are exactly
    pixels of its source image.
    """
    b, c, h, w = images.shape
    r = 2**level
    if copies < 1 or h % r or w % r or (copies * b) % (r * r):
        raise ValueError(f"cannot tile {b} images of {h}x{w}, {copies}x each, into {r}x{r} montages")
    small = images[:, :, ::r, ::r]  # (B, 3, h/r, w/r), nearest neighbour
    sources = (torch.randperm(copies * b, generator=generator) % b).to(images.device)
    n = copies * b // (r * r)
    tiles = small[sources].reshape(n, r, r, c, h // r, w // r)  # canvas, tile row, tile col, ...
    canvases = tiles.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    th, tw = h // r, w // r
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    boxes = torch.stack((cols * tw, rows * th, (cols + 1) * tw, (rows + 1) * th), dim=-1).reshape(r * r, 4)
    return Montage(canvases, sources.reshape(n, r * r), boxes.to(images.device, torch.float32), r, copies)


def tile_tokens(patches: Tensor, grid: tuple[int, int], ratio: int) -> Tensor:
    """Mean patch token of every tile: (n, N, C) patch tokens of ``grid`` -> (n, r², C), row-major tiles."""
    n, _, ch = patches.shape
    gh, gw = grid
    if gh % ratio or gw % ratio:
        raise ValueError(f"a {gh}x{gw} patch grid does not split into {ratio}x{ratio} tiles")
    x = patches.reshape(n, ratio, gh // ratio, ratio, gw // ratio, ch)
    return x.mean(dim=(2, 4)).reshape(n, ratio * ratio, ch)
