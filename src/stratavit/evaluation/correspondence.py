"""Correspondence score: do patch features find the same place in another view of the image?

For each held-out image two random crops (scale, aspect ratio, horizontal flip) are taken with
known geometry. Every patch of view A whose centre falls inside view B is a query; its nearest
patch of view B by cosine similarity is correct when it lies within one patch (8-neighbourhood,
Chebyshev distance <= 1 on B's grid) of the patch of B that contains the true location. The score
per block is the fraction of correct queries; ``exact`` counts only the containing patch, and
``chance`` is the expected score of a uniformly random guess (size of the clipped neighbourhood
over the number of patches), so random features read as ~chance and position-exact features as 1.

With a CNN the blocks are its feature stages and a "patch" is one cell of that stage's feature
map: the grid, the true cell and the one-cell tolerance all follow the stage's own stride
(stride 4: a 4-pixel cell, stride 32: a 32-pixel cell), and ``chance`` with them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn

from stratavit.data.geometry import (
    crop_box_from_params,
    patch_centers_in_source,
    source_to_view,
)
from stratavit.evaluation.progress import progress
from stratavit.evaluation.tokens import block_tokens, grid_of, resolve_blocks

__all__ = ["ViewPairs", "sample_crop", "make_view_pairs", "match_scores", "correspondence_score"]


@dataclass
class ViewPairs:
    """Two crops of each of ``B`` images, with geometry.

    Attributes:
        view_a, view_b: ``(B, 3, S, S)`` normalised views.
        boxes_a, boxes_b: ``(B, 4)`` crop boxes ``(x0, y0, x1, y1)`` in source pixels.
        flips_a, flips_b: ``(B,)`` bool, horizontal flip after the crop.
    """

    view_a: Tensor
    view_b: Tensor
    boxes_a: Tensor
    boxes_b: Tensor
    flips_a: Tensor
    flips_b: Tensor


@dataclass
class MatchScores:
    """Scores of one block over ``B`` view pairs with ``P`` patches each.

    Attributes:
        top1, exact, chance: percentages over the queries (NaN when there is none).
        queries: number of queries (patches of A whose centre lies inside B).
        valid, correct, exact_mask: ``(B, P)`` bool per patch of A (False where not a query).
        chance_sum: sum over queries of the random-guess probability of being correct.
        nearest: ``(B, P)`` index of the nearest patch of B.
    """

    top1: float
    exact: float
    chance: float
    queries: int
    chance_sum: float
    valid: Tensor = field(repr=False)
    correct: Tensor = field(repr=False)
    exact_mask: Tensor = field(repr=False)
    nearest: Tensor = field(repr=False)


def sample_crop(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random-resized-crop window ``(top, left, h, w)`` of a ``width x height`` image.

    Area fraction uniform in ``scale``, log-uniform aspect ratio in ``ratio``; falls back to the
    largest centred crop within ``ratio`` after 10 failed draws (the usual RandomResizedCrop rule).

    Not :class:`stratavit.data.views.ViewMaker`: the training views draw from torch's global RNG
    (``RandomResizedCrop.get_params``), resize the PIL image and add photometric noise, while this
    score draws from its own ``random.Random(seed)`` and crops the tensor, so that its numbers depend
    only on the seed; sharing the view maker would change every score. The geometry (boxes, flips,
    patch centres) is :mod:`stratavit.data.geometry`'s, as in training.
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def make_view_pairs(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    seed: int = 0,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> ViewPairs:
    """Two random crops of each PIL image, resized to ``size x size`` (bilinear, antialiased).

    Deterministic for a given ``seed`` and image list.
    """
    rng = random.Random(seed)
    out: dict[str, list[Tensor]] = {k: [] for k in ("view_a", "view_b", "boxes_a", "boxes_b", "flips_a", "flips_b")}
    for img in images:
        img = img.convert("RGB")
        tensor = TF.to_tensor(img)
        for tag in ("a", "b"):
            top, left, h, w = sample_crop(rng, img.width, img.height, scale, ratio)
            flip = rng.random() < flip_p
            view = TF.resized_crop(tensor, top, left, h, w, [size, size], antialias=True)
            if flip:
                view = TF.hflip(view)
            out[f"view_{tag}"].append(TF.normalize(view, list(mean), list(std)))
            out[f"boxes_{tag}"].append(crop_box_from_params(top, left, h, w))
            out[f"flips_{tag}"].append(torch.tensor(flip))
    return ViewPairs(**{k: torch.stack(v) for k, v in out.items()})


def match_scores(
    patches_a: Tensor,
    patches_b: Tensor,
    boxes_a: Tensor,
    flips_a: Tensor,
    boxes_b: Tensor,
    flips_b: Tensor,
    view_size: tuple[int, int],
) -> MatchScores:
    """Nearest-neighbour patch matching from view A to view B against the true geometry.

    Args:
        patches_a, patches_b: ``(B, gh, gw, C)`` patch features of the two views.
        boxes_*: ``(B, 4)`` crop boxes in source pixels; flips_*: ``(B,)`` bool.
        view_size: ``(S_h, S_w)`` of both views.
    """
    b, gh, gw, _ = patches_a.shape
    s_h, s_w = view_size
    centers = patch_centers_in_source(boxes_a.float(), flips_a, (gh, gw), view_size)  # (B, P, 2)
    in_b = source_to_view(centers, boxes_b.float(), flips_b, view_size)  # (B, P, 2) in B's pixels
    valid = (in_b[..., 0] >= 0) & (in_b[..., 0] < s_w) & (in_b[..., 1] >= 0) & (in_b[..., 1] < s_h)
    true_col = (in_b[..., 0] * gw / s_w).floor().clamp(0, gw - 1).long()
    true_row = (in_b[..., 1] * gh / s_h).floor().clamp(0, gh - 1).long()
    fa = F.normalize(patches_a.reshape(b, gh * gw, -1).float(), dim=-1)
    fb = F.normalize(patches_b.reshape(b, gh * gw, -1).float(), dim=-1)
    nearest = (fa @ fb.transpose(1, 2)).argmax(dim=-1)  # (B, P)
    d_row = (nearest // gw - true_row).abs()
    d_col = (nearest % gw - true_col).abs()
    correct = valid & (d_row <= 1) & (d_col <= 1)
    exact = valid & (d_row == 0) & (d_col == 0)
    rows_near = (torch.minimum(true_row + 1, torch.full_like(true_row, gh - 1)) - (true_row - 1).clamp_min(0) + 1)
    cols_near = (torch.minimum(true_col + 1, torch.full_like(true_col, gw - 1)) - (true_col - 1).clamp_min(0) + 1)
    chance = (rows_near * cols_near).float() / (gh * gw)
    n = int(valid.sum())
    chance_sum = float(chance[valid].sum())
    return MatchScores(
        top1=_pct(float(correct.sum()), n),
        exact=_pct(float(exact.sum()), n),
        chance=_pct(chance_sum, n),
        queries=n,
        chance_sum=chance_sum,
        valid=valid,
        correct=correct,
        exact_mask=exact,
        nearest=nearest,
    )


def _pct(count: float, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def correspondence_score(
    model: nn.Module,
    images: Sequence[Image.Image],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    blocks: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    example_block: int | None = None,
) -> dict[str, Any]:
    """Correspondence accuracy per block on two random crops of each image.

    Args:
        model: a timm ViT taking ``size x size`` inputs (see ``tokens.model_at_size``), or a timm
            CNN (blocks = stages, each matched on its own grid, ``size`` a multiple of its strides).
        images: held-out PIL images (any size).
        blocks: 1-based blocks (``-1`` = last, ``None`` = all).
        example_block: the block of the ``example`` (one of ``blocks``; default the last).

    Returns:
        ``{"top1": last block's %, "layers": [{"block", "top1", "exact", "chance"}], "pairs": B,
        "queries": per-pair mean, "example": {...}}``; ``example`` holds the first pair's views,
        matched points and correctness at ``example_block`` (its 1-based number under
        ``"block"``), for the report's picture.
    """
    if not images:
        raise ValueError("correspondence_score needs at least one image")
    numbers = resolve_blocks(model, blocks)
    shown = numbers[-1] if example_block is None else resolve_blocks(model, [example_block])[0]
    if shown not in numbers:
        raise ValueError(f"example_block {example_block} is not among the scored blocks {numbers}")
    dev = torch.device(device)
    model.eval()
    pairs = make_view_pairs(images, size, mean, std, seed=seed)
    grid = grid_of(model, (size, size), shown)
    totals = {n: {"queries": 0, "correct": 0.0, "exact": 0.0, "chance": 0.0} for n in numbers}
    example: dict[str, Any] = {}
    for start in progress(range(0, len(images), batch_size), "correspondence", math.ceil(len(images) / batch_size)):
        sl = slice(start, start + batch_size)
        toks_a = block_tokens(model, pairs.view_a[sl].to(dev), numbers)
        toks_b = block_tokens(model, pairs.view_b[sl].to(dev), numbers)
        for ta, tb in zip(toks_a, toks_b):
            s = match_scores(
                ta.patches.cpu(), tb.patches.cpu(), pairs.boxes_a[sl], pairs.flips_a[sl],
                pairs.boxes_b[sl], pairs.flips_b[sl], (size, size),
            )
            t = totals[ta.block]
            t["queries"] += s.queries
            t["correct"] += float(s.correct.sum())
            t["exact"] += float(s.exact_mask.sum())
            t["chance"] += s.chance_sum
            if start == 0 and ta.block == shown:
                example = _example(pairs, s, grid, (size, size))
                example["block"] = shown
    layers = [
        {
            "block": n,
            "top1": round(_pct(t["correct"], t["queries"]), 2),
            "exact": round(_pct(t["exact"], t["queries"]), 2),
            "chance": round(_pct(t["chance"], t["queries"]), 2),
        }
        for n, t in totals.items()
    ]
    return {
        "top1": layers[-1]["top1"],
        "layers": layers,
        "pairs": len(images),
        "queries_per_pair": round(totals[numbers[-1]]["queries"] / len(images), 1),
        "size": size,
        "example": example,
    }


def _example(pairs: ViewPairs, s: MatchScores, grid: tuple[int, int], view_size: tuple[int, int]) -> dict[str, Any]:
    """Points of the first pair's queries in A and their nearest patches in B (view pixels)."""
    gh, gw = grid
    s_h, s_w = view_size
    idx = torch.nonzero(s.valid[0]).flatten()
    def centre(i: Tensor) -> Tensor:
        return torch.stack(((i % gw + 0.5) * s_w / gw, (i // gw + 0.5) * s_h / gh), dim=-1)
    return {
        "view_a": pairs.view_a[0],
        "view_b": pairs.view_b[0],
        "points_a": centre(idx),
        "points_b": centre(s.nearest[0, idx]),
        "correct": s.correct[0, idx],
    }
