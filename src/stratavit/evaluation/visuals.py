"""Pictures for the evaluation report: tensors in, small PNGs out.

Every ``plot_*`` function draws on a bare :class:`matplotlib.figure.Figure` (see
:mod:`stratavit.evaluation.plotting`), writes one PNG and returns its path. Inputs may be torch
tensors or NumPy arrays; nothing here needs a GPU (tensors are moved to the CPU). Images are
expected already un-normalised, as floats in ``[0, 1]`` (values outside are clipped for display).
The 2-D feature map is in :mod:`stratavit.evaluation.embedding`, the per-block curves in
:mod:`stratavit.evaluation.block_plots`, the HTML page in :mod:`stratavit.evaluation.md_html`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stratavit.evaluation.embedding import pca_project
from stratavit.evaluation.plotting import as_cpu_float, new_figure, save_figure

__all__ = [
    "plot_attention_maps", "pca_rgb", "plot_pca_rgb", "plot_matches", "plot_confusion", "plot_segmentations",
    "unnormalise",
]

MAX_HEADS_SHOWN = 6
_CELL = 1.45  # inches per image cell in image grids


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _to_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` image -> ``(H, W, 3)`` float array in [0, 1]."""
    t = as_cpu_float(image)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.permute(1, 2, 0).clamp(0.0, 1.0).numpy()


def _check_images(images: Any) -> Tensor:
    t = as_cpu_float(images)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------- #
# attention
# --------------------------------------------------------------------------- #
def plot_attention_maps(images: Tensor, attn: Tensor, out_png: Path, *, max_images: int = 6) -> Path:
    """Show CLS->patch attention of the last block, one row per image.

    Columns: the image; the head-mean attention, upsampled (bilinear) to the image size and
    overlaid on it; then each head's map on the patch grid (at most 6 heads). Every map is
    scaled to its own maximum for display.

    Args:
        images: ``(B, 3, H, W)`` floats in ``[0, 1]`` (already un-normalised).
        attn: ``(B, heads, gh, gw)`` CLS->patch attention, each map summing to 1
            (``(B, heads, gh * gw)`` with a square grid is accepted too).
        out_png: where to write the figure.
        max_images: at most this many rows (the first images of the batch).

    Returns:
        ``out_png``.
    """
    imgs = _check_images(images)
    a = as_cpu_float(attn)
    if a.ndim == 3:
        side = math.isqrt(a.shape[-1])
        if side * side != a.shape[-1]:
            raise ValueError(
                f"attention over {a.shape[-1]} patches is not a square grid; pass (B, heads, gh, gw)"
            )
        a = a.reshape(a.shape[0], a.shape[1], side, side)
    if a.ndim != 4:
        raise ValueError(f"expected attention of shape (B, heads, gh, gw), got {tuple(a.shape)}")
    if a.shape[0] != imgs.shape[0]:
        raise ValueError(f"{imgs.shape[0]} images but attention for {a.shape[0]}")

    n = max(1, min(int(max_images), imgs.shape[0]))
    heads = min(a.shape[1], MAX_HEADS_SHOWN)
    h, w = imgs.shape[-2:]
    mean = F.interpolate(a[:n].mean(dim=1, keepdim=True), size=(h, w), mode="bilinear", align_corners=False)

    ncols = 2 + heads
    fig = new_figure((_CELL * ncols, _CELL * n + 0.35))
    axes = fig.subplots(n, ncols, squeeze=False)
    for i in range(n):
        img = _to_hwc(imgs[i])
        m = mean[i, 0]
        m = (m / m.max().clamp_min(1e-12)).numpy()
        axes[i, 0].imshow(img)
        axes[i, 1].imshow(img)
        axes[i, 1].imshow(m, cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
        for j in range(heads):
            hm = a[i, j]
            hm = (hm / hm.max().clamp_min(1e-12)).numpy()
            axes[i, 2 + j].imshow(hm, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
        for ax in axes[i]:
            ax.set_axis_off()
    titles = ["image", "mean attn"] + [f"head {j}" for j in range(heads)]
    for ax, t in zip(axes[0], titles):
        ax.set_title(t, fontsize="small")
    if a.shape[1] > heads:
        fig.suptitle(f"CLS attention (first {heads} of {a.shape[1]} heads)", fontsize="small")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# PCA colouring of patch features
# --------------------------------------------------------------------------- #
def pca_rgb(patches: Tensor) -> Tensor:
    """Colour patch features by their first three principal components.

    The PCA is fitted jointly on all ``B * gh * gw`` patches of the batch (exact, deterministic;
    component signs fixed by their largest loading). Each component is clipped to its 1st-99th
    percentile over the batch and min-max scaled to ``[0, 1]``.

    Args:
        patches: ``(B, gh, gw, C)`` patch features.

    Returns:
        ``(B, gh, gw, 3)`` float32 in ``[0, 1]`` (R, G, B = components 1, 2, 3; a component that
        does not exist, e.g. ``C < 3``, is 0).
    """
    p = as_cpu_float(patches)
    if p.ndim != 4:
        raise ValueError(f"expected patches of shape (B, gh, gw, C), got {tuple(p.shape)}")
    b, gh, gw, c = p.shape
    proj = pca_project(p.reshape(-1, c), 3).numpy()
    out = np.zeros_like(proj)
    for k in range(3):
        col = proj[:, k]
        # "higher"/"lower" rather than interpolation: one outlier among few patches must not
        # drag the clip bound towards itself
        lo = float(np.percentile(col, 1.0, method="higher"))
        hi = float(np.percentile(col, 99.0, method="lower"))
        if not hi > lo:
            lo, hi = float(col.min()), float(col.max())
        if hi > lo:
            out[:, k] = (np.clip(col, lo, hi) - lo) / (hi - lo)
    return torch.from_numpy(out).reshape(b, gh, gw, 3)


def plot_pca_rgb(images: Tensor | None, patches: Tensor, out_png: Path, *, max_images: int = 6) -> Path:
    """Images (top row) and their patch features coloured by PCA (bottom row).

    Args:
        images: ``(B, 3, H, W)`` floats in ``[0, 1]``, or ``None`` for the PCA row alone.
        patches: ``(B, gh, gw, C)`` patch features of the same images; the PCA is fitted on the
            shown images only.
        out_png: where to write the figure.
        max_images: at most this many columns (the first images of the batch).

    Returns:
        ``out_png``.
    """
    p = as_cpu_float(patches)
    if p.ndim != 4:
        raise ValueError(f"expected patches of shape (B, gh, gw, C), got {tuple(p.shape)}")
    n = max(1, min(int(max_images), p.shape[0]))
    imgs = None
    if images is not None:
        imgs = _check_images(images)
        if imgs.shape[0] != p.shape[0]:
            raise ValueError(f"{imgs.shape[0]} images but patches for {p.shape[0]}")
    rgb = pca_rgb(p[:n]).numpy()

    nrows = 1 if imgs is None else 2
    fig = new_figure((_CELL * n, _CELL * nrows + 0.35))
    axes = fig.subplots(nrows, n, squeeze=False)
    for i in range(n):
        if imgs is not None:
            axes[0, i].imshow(_to_hwc(imgs[i]))
        axes[-1, i].imshow(rgb[i], interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.suptitle("patch features: first 3 PCA components as RGB", fontsize="small")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# correspondence matches
# --------------------------------------------------------------------------- #
def plot_matches(
    image_a: Tensor,
    image_b: Tensor,
    points_a: Tensor,
    points_b: Tensor,
    correct: Tensor,
    out_png: Path,
    *,
    max_lines: int = 60,
    seed: int = 0,
) -> Path:
    """Two views side by side with a line from each query point to its match.

    Args:
        image_a, image_b: ``(3, H, W)`` floats in ``[0, 1]`` (heights may differ).
        points_a, points_b: ``(P, 2)`` matched points ``(x, y)`` in each view's pixels.
        correct: ``(P,)`` bool; green lines are correct matches, red wrong ones.
        out_png: where to write the figure.
        max_lines: draw a random subsample (fixed ``seed``) of at most this many matches; the
            accuracy in the title counts all ``P``.
        seed: seed of the subsample.

    Returns:
        ``out_png``.
    """
    a, b = _to_hwc(image_a), _to_hwc(image_b)
    pa, pb = as_cpu_float(points_a).reshape(-1, 2), as_cpu_float(points_b).reshape(-1, 2)
    ok = torch.as_tensor(correct).detach().cpu().reshape(-1).bool()
    if not (len(pa) == len(pb) == len(ok)):
        raise ValueError(f"points_a {len(pa)}, points_b {len(pb)} and correct {len(ok)} differ in length")
    p = len(ok)

    ha, wa = a.shape[:2]
    hb, wb = b.shape[:2]
    canvas = np.ones((max(ha, hb), wa + wb, 3), dtype=np.float32)
    canvas[:ha, :wa] = a
    canvas[:hb, wa:] = b

    fig = new_figure((6.0, 6.0 * canvas.shape[0] / canvas.shape[1] + 0.5))
    ax = fig.add_subplot()
    ax.imshow(canvas)
    ax.axvline(wa - 0.5, color="white", linewidth=1.0)
    if p:
        idx = torch.arange(p)
        if max_lines >= 0 and p > max_lines:
            g = torch.Generator().manual_seed(int(seed))
            idx = torch.randperm(p, generator=g)[: int(max_lines)].sort().values
        # draw wrong matches first so the correct ones stay visible on top
        for flag, colour in ((False, "red"), (True, "lime")):
            sel = idx[ok[idx] == flag]
            if len(sel) == 0:
                continue
            xa, ya = pa[sel, 0].numpy(), pa[sel, 1].numpy()
            xb, yb = pb[sel, 0].numpy() + wa, pb[sel, 1].numpy()
            ax.plot(np.stack([xa, xb]), np.stack([ya, yb]), color=colour, linewidth=0.8, alpha=0.8)
            ax.scatter(np.concatenate([xa, xb]), np.concatenate([ya, yb]), s=5, color=colour, zorder=3)
        n_ok = int(ok.sum())
        shown = f", {len(idx)} shown" if len(idx) < p else ""
        title = f"matches: {100.0 * n_ok / p:.1f}% correct ({n_ok}/{p}{shown})"
    else:
        title = "matches: none"
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(title, fontsize="small")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# confusion matrix
# --------------------------------------------------------------------------- #
def plot_confusion(conf: Tensor, class_names: list[str] | None, out_png: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class).

    Args:
        conf: ``(K, K)`` counts, ``conf[i, j]`` = samples of true class ``i`` predicted ``j``.
        class_names: names for the ticks (at least ``K``; with more, the matrix is padded
            with empty classes), or ``None`` for indices.
        out_png: where to write the figure.

    Returns:
        ``out_png``. Cells show percentages of their row when ``K <= 20``; rows without samples
        stay 0. The title gives the overall accuracy.
    """
    c = as_cpu_float(conf).to(torch.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a (K, K) confusion matrix, got {tuple(c.shape)}")
    k = c.shape[0]
    if class_names is not None and len(class_names) != k:
        if len(class_names) < k:
            raise ValueError(f"{len(class_names)} class names for a {k}x{k} matrix")
        # a matrix sized by the largest label seen: the missing classes have no samples
        c = F.pad(c, (0, len(class_names) - k, 0, len(class_names) - k))
        k = c.shape[0]
    totals = c.sum(dim=1, keepdim=True)
    norm = (c / totals.clamp_min(1e-12)).numpy()
    total = float(c.sum())
    acc = 100.0 * float(c.diagonal().sum()) / total if total > 0 else float("nan")

    side = min(10.0, max(3.6, 0.42 * k + 2.0))
    fig = new_figure((side + 0.8, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of true class")
    if k <= 20:
        size = "small" if k <= 10 else "xx-small"
        for i in range(k):
            for j in range(k):
                v = norm[i, j]
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=size,
                        color="white" if v > 0.5 else "black")
    labels = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if k <= 40:
        ax.set_xticks(range(k), labels, rotation=90 if (k > 6 or max(map(len, labels), default=0) > 4) else 0,
                      fontsize="small")
        ax.set_yticks(range(k), labels, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (row-normalised %), accuracy {acc:.1f}%", fontsize="medium")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# segmentations
# --------------------------------------------------------------------------- #
def plot_segmentations(
    images: Sequence[Tensor], truths: Sequence[Tensor], preds: Sequence[Tensor], num_classes: int, out_png: Path,
    *, title: str = "", ignore_index: int = 255,
) -> Path:
    """One row per image: the image, the true mask, the predicted mask (same colours per class).

    Args:
        images: ``(3, h, w)`` floats in ``[0, 1]``, any size (shown stretched to its mask's shape).
        truths, preds: ``(H, W)`` class ids of the same shape per row; ``ignore_index`` pixels grey.
        num_classes: ``K``, for a fixed colour per class.

    Returns:
        ``out_png``.
    """
    n = len(preds)
    if not (len(images) == len(truths) == n) or n == 0:
        raise ValueError(f"{len(images)} images, {len(truths)} masks and {n} predictions: need the same, at least 1")
    cmap = matplotlib.colormaps["tab20"].resampled(max(2, int(num_classes)))
    fig = new_figure((3 * _CELL, n * _CELL + 0.4))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        truth = torch.as_tensor(truths[i]).cpu()
        h, w = truth.shape
        for j, (name, mask) in enumerate((("truth", truth), ("retrieved", torch.as_tensor(preds[i]).cpu()))):
            m = np.ma.masked_equal(mask.numpy(), ignore_index)
            ax = axes[i, j + 1]
            ax.set_facecolor("0.6")
            ax.imshow(m, cmap=cmap, vmin=-0.5, vmax=max(2, int(num_classes)) - 0.5, interpolation="nearest")
            if i == 0:
                ax.set_title(name, fontsize="small")
        axes[i, 0].imshow(_to_hwc(images[i]), extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        if i == 0:
            axes[i, 0].set_title("image", fontsize="small")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize="small")
    return save_figure(fig, out_png)


def unnormalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(..., 3, H, W)`` normalised images -> values in ``[0, 1]``."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)
