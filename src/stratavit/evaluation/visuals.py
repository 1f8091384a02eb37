"""Pictures for the evaluation report: tensors in, small PNGs out.

Every ``plot_*`` function draws on a bare :class:`matplotlib.figure.Figure` (no pyplot, so it is
safe headless and in threads), writes one PNG and returns its path. Inputs may be torch tensors
or NumPy arrays; nothing here needs a GPU (tensors are moved to the CPU). Images are expected
already un-normalised, as floats in ``[0, 1]`` (values outside are clipped for display).

:func:`write_html` turns a Markdown report into one self-contained HTML file with the
report's PNGs embedded as base64 data URIs.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import math
import mimetypes
import re
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import Tensor

from stratavit.evaluation.report import _get, _new_figure, _save

__all__ = [
    "plot_attention_maps",
    "pca_rgb",
    "plot_pca_rgb",
    "plot_matches",
    "plot_confusion",
    "Embedding2D",
    "embed_2d",
    "plot_embedding_2d",
    "plot_layer_panels",
    "write_html",
]

MAX_HEADS_SHOWN = 6
EMBED_MAX_POINTS = 2000
_CELL = 1.45  # inches per image cell in image grids


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _tensor(x: Any) -> Tensor:
    """``x`` as a detached float32 CPU tensor."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32)


def _to_hwc(image: Any) -> np.ndarray:
    """``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` image -> ``(H, W, 3)`` float array in [0, 1]."""
    t = _tensor(image)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.permute(1, 2, 0).clamp(0.0, 1.0).numpy()


def _check_images(images: Any) -> Tensor:
    t = _tensor(images)
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(t.shape)}")
    return t


def _pca_project(x: Tensor, k: int) -> Tensor:
    """Project rows of ``x`` ``(M, C)`` onto its first ``k`` principal components -> ``(M, k)``.

    Exact (eigen-decomposition of the ``C x C`` covariance in float64, or SVD when ``C > M``),
    hence deterministic. Each component's sign is fixed so that its largest-magnitude loading is
    positive. Missing components (``k > min(M, C)``) are zero columns.
    """
    x = x.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    m, c = x.shape
    if c <= m:
        _, evecs = torch.linalg.eigh(x.T @ x)  # ascending
        comps = evecs.flip(-1)[:, :k]
    else:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        comps = vh[:k].T
    idx = comps.abs().argmax(dim=0)
    signs = torch.sign(comps[idx, torch.arange(comps.shape[1])])
    signs[signs == 0] = 1.0
    proj = x @ (comps * signs)
    if proj.shape[1] < k:
        proj = torch.cat([proj, proj.new_zeros(m, k - proj.shape[1])], dim=1)
    return proj.to(torch.float32)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _block_series(rows: Any, key: str) -> tuple[list[int], list[float]]:
    """``([block, ...], [value, ...])`` of ``rows`` (``[{"block": i, key: v}, ...]``), sorted."""
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        return [], []
    pts = []
    for r in rows:
        if not isinstance(r, Mapping) or "block" not in r:
            continue
        v = _finite(r.get(key))
        if v is not None:
            pts.append((int(r["block"]), v))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


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
    a = _tensor(attn)
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
    fig = _new_figure((_CELL * ncols, _CELL * n + 0.35))
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
    return _save(fig, out_png)


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
    p = _tensor(patches)
    if p.ndim != 4:
        raise ValueError(f"expected patches of shape (B, gh, gw, C), got {tuple(p.shape)}")
    b, gh, gw, c = p.shape
    proj = _pca_project(p.reshape(-1, c), 3).numpy()
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
    p = _tensor(patches)
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
    fig = _new_figure((_CELL * n, _CELL * nrows + 0.35))
    axes = fig.subplots(nrows, n, squeeze=False)
    for i in range(n):
        if imgs is not None:
            axes[0, i].imshow(_to_hwc(imgs[i]))
        axes[-1, i].imshow(rgb[i], interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    fig.suptitle("patch features: first 3 PCA components as RGB", fontsize="small")
    return _save(fig, out_png)


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
    pa, pb = _tensor(points_a).reshape(-1, 2), _tensor(points_b).reshape(-1, 2)
    ok = torch.as_tensor(correct).detach().cpu().reshape(-1).bool()
    if not (len(pa) == len(pb) == len(ok)):
        raise ValueError(f"points_a {len(pa)}, points_b {len(pb)} and correct {len(ok)} differ in length")
    p = len(ok)

    ha, wa = a.shape[:2]
    hb, wb = b.shape[:2]
    canvas = np.ones((max(ha, hb), wa + wb, 3), dtype=np.float32)
    canvas[:ha, :wa] = a
    canvas[:hb, wa:] = b

    fig = _new_figure((6.0, 6.0 * canvas.shape[0] / canvas.shape[1] + 0.5))
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
    return _save(fig, out_png)


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
    c = _tensor(conf).to(torch.float64)
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
    fig = _new_figure((side + 0.8, side))
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
    return _save(fig, out_png)


# --------------------------------------------------------------------------- #
# 2-D embedding
# --------------------------------------------------------------------------- #
class Embedding2D(NamedTuple):
    """Result of :func:`embed_2d`.

    Attributes:
        coords: ``(n, 2)`` float32 coordinates, ``n = min(N, max_points)``.
        method: ``"tsne"``, ``"umap"`` or ``"pca"``, whichever was used.
        indices: ``(n,)`` int64 rows of the input that were embedded (sorted).
    """

    coords: Tensor
    method: str
    indices: Tensor


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = x.shape[0]
    if x.shape[1] > 50:  # the usual PCA pre-reduction: faster, and the same picture
        x = _pca_project(torch.from_numpy(x), 50).numpy()
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity, learning_rate="auto")
    return np.asarray(tsne.fit_transform(x.astype(np.float32)), dtype=np.float32)


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap  # type: ignore[import-not-found]

    n = x.shape[0]
    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=int(min(15, n - 1)))
    return np.asarray(reducer.fit_transform(x.astype(np.float32)), dtype=np.float32)


def embed_2d(
    feats: Tensor, method: str = "auto", seed: int = 0, *, max_points: int = EMBED_MAX_POINTS
) -> Embedding2D:
    """Embed features in 2-D for a scatter plot.

    Args:
        feats: ``(N, C)`` features.
        method: ``"tsne"`` (scikit-learn, PCA init), ``"umap"`` (umap-learn), ``"pca"`` (torch,
            exact) or ``"auto"``: the first of t-SNE, UMAP, PCA that is installed and imports
            (PCA also when there are too few points for the others: ``N < 8`` for "auto", fewer
            than 3 / 4 for an explicit t-SNE / UMAP; ``method_used`` then says ``"pca"``).
        seed: seeds the subsample and t-SNE/UMAP, so the result is reproducible.
        max_points: embed a random subsample of at most this many rows (speed).

    Returns:
        ``Embedding2D(coords (n, 2), method, indices (n,))``; unpack as
        ``coords, method, indices = embed_2d(...)``.

    Raises:
        ImportError: ``method`` names a package that is not installed.
        ValueError: unknown ``method`` or ``feats`` not 2-D.
    """
    x = _tensor(feats)
    if x.ndim != 2:
        raise ValueError(f"expected features of shape (N, C), got {tuple(x.shape)}")
    if method not in ("auto", "tsne", "umap", "pca"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'tsne', 'umap' or 'pca'")
    n_all = x.shape[0]
    if max_points > 0 and n_all > max_points:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(n_all, generator=g)[: int(max_points)].sort().values
    else:
        idx = torch.arange(n_all)
    x = x[idx]
    n = x.shape[0]

    runners = {"tsne": (_tsne, "scikit-learn", "sklearn", 3), "umap": (_umap, "umap-learn", "umap", 4)}
    if method == "auto":
        order = [m for m in ("tsne", "umap") if n >= 8 and _have(runners[m][2])]
    elif method == "pca":
        order = []
    else:
        if not _have(runners[method][2]):
            package = runners[method][1]
            raise ImportError(f"method={method!r} needs {package}: pip install {package}")
        order = [method]
    coords = None
    for name in order:
        fn, _, _, min_n = runners[name]
        if n < min_n:  # too few points for a neighbour graph: PCA says as much
            break
        try:
            coords = torch.from_numpy(fn(x.numpy(), int(seed)))
        except ImportError:  # installed but broken: "auto" moves on, an explicit request fails
            if method != "auto":
                raise
            continue
        method = name
        break
    if coords is None:
        coords = _pca_project(x, 2) if n else x.new_zeros(0, 2)
        method = "pca"
    return Embedding2D(coords.to(torch.float32), method, idx.to(torch.int64))


def plot_embedding_2d(
    feats: Tensor,
    labels: Tensor,
    class_names: list[str] | None,
    out_png: Path,
    *,
    method: str = "auto",
    seed: int = 0,
    max_points: int = EMBED_MAX_POINTS,
) -> tuple[Path, str]:
    """Scatter of a 2-D embedding of ``feats`` coloured by class.

    Args:
        feats: ``(N, C)`` features.
        labels: ``(N,)`` integer class labels.
        class_names: names indexed by label, or ``None`` for the label numbers.
        out_png: where to write the figure.
        method, seed, max_points: see :func:`embed_2d`.

    Returns:
        ``(out_png, method_used)``. A legend is drawn for at most 20 classes.
    """
    y = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if len(y) != _tensor(feats).shape[0]:
        raise ValueError(f"{len(y)} labels for {_tensor(feats).shape[0]} features")
    coords, used, idx = embed_2d(feats, method, seed, max_points=max_points)
    y = y[idx].numpy()
    xy = coords.numpy()
    classes = np.unique(y)

    fig = _new_figure((6.4 if len(classes) <= 20 else 5.2, 5.0))
    ax = fig.add_subplot()
    if len(classes) <= 20:
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        cm = colormaps[cmap]
        for i, cls in enumerate(classes):
            m = y == cls
            name = class_names[cls] if class_names is not None and 0 <= cls < len(class_names) else str(cls)
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cm(i % cm.N), label=name, alpha=0.8, linewidths=0)
        ax.legend(
            loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small", markerscale=2.5, frameon=False
        )
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=5, c=y, cmap="turbo", alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    name = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}[used]
    ax.set_title(f"{name} of {len(xy)} features", fontsize="medium")
    return _save(fig, out_png), used


# --------------------------------------------------------------------------- #
# per-block panels
# --------------------------------------------------------------------------- #
def plot_layer_panels(
    results: Mapping[str, Any], out_png: Path, *, unit: str = "transformer block", global_label: str = "CLS"
) -> Path | None:
    """Up to four panels of per-block scores from an evaluation ``results`` dict.

    ``unit`` names the x axis and ``global_label`` the ``knn_top1`` / ``linear_top1`` curves (a CNN:
    ``"CNN stage"`` and ``"global avg pool"``).

    Panels (each drawn only when it has data): kNN top-1 (CLS ``knn_top1`` and mean-patch
    ``knn_top1_patch`` of ``results["layers"]``), linear top-1 (``linear_top1``,
    ``linear_top1_patch``), correspondence top-1 (``results["correspondence"]["layers"]``) and
    dense mIoU (``results["dense"]["layers"]``). The randomly initialised backbone's per-block
    curves (``results["baselines"]["random_init"]``, same layout) are dashed; the raw-pixel kNN
    score is a dotted line on the kNN panel. See :mod:`stratavit.evaluation.report` for the layout.

    Returns:
        ``out_png``, or ``None`` when there is nothing to plot.
    """
    if not isinstance(results, Mapping):
        return None
    rnd = _get(results, "baselines", "random_init") or {}
    model_layers, rnd_layers = results.get("layers"), _get(rnd, "layers")
    corr, rnd_corr = _get(results, "correspondence", "layers"), _get(rnd, "correspondence", "layers")
    dense, rnd_dense = _get(results, "dense", "layers"), _get(rnd, "dense", "layers")
    # (title, y label, [(curve label, model rows, baseline rows, key), ...])
    specs: list[tuple[str, str, list[tuple[str, Any, Any, str]]]] = [
        ("kNN top-1", "top-1 (%)", [
            (global_label, model_layers, rnd_layers, "knn_top1"),
            ("mean patch", model_layers, rnd_layers, "knn_top1_patch"),
        ]),
        ("linear top-1", "top-1 (%)", [
            (global_label, model_layers, rnd_layers, "linear_top1"),
            ("mean patch", model_layers, rnd_layers, "linear_top1_patch"),
        ]),
        ("correspondence top-1", "top-1 (%)", [("patch NN", corr, rnd_corr, "top1")]),
        ("dense mIoU", "mIoU (%)", [("mIoU", dense, rnd_dense, "miou")]),
    ]

    panels = []
    for title, ylabel, curves in specs:
        drawn = []
        for i, (label, rows, base_rows, key) in enumerate(curves):
            xs, ys = _block_series(rows, key)
            if xs:
                drawn.append((label, xs, ys, "-", "o", f"C{i}"))
            bx, by = _block_series(base_rows, key)
            if bx:
                drawn.append((f"{label}, random init", bx, by, "--", "s", f"C{i}"))
        if not any(style == "-" for _, _, _, style, _, _ in drawn):
            continue  # no curve of the model itself (a baseline alone is not worth a panel)
        hline = None
        if title == "kNN top-1":
            raw = _finite(_get(results, "baselines", "raw_pixels", "knn_top1"))
            if raw is not None:
                hline = ("raw pixels", raw)
        panels.append((title, ylabel, drawn, hline))
    if not panels:
        return None

    n = len(panels)
    nrows, ncols = (2, 2) if n == 4 else (1, n)
    fig = _new_figure((3.6 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, ylabel, drawn, hline) in zip(axes, panels):
        blocks: set[int] = set()
        for label, xs, ys, style, marker, colour in drawn:
            ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5, color=colour,
                    linewidth=1.6 if style == "-" else 1.0, label=label)
            blocks.update(xs)
        if hline is not None:
            ax.axhline(
                hline[1], linestyle=":", color="tab:gray", linewidth=1.0, label=f"{hline[0]}: {hline[1]:.1f}"
            )
        ticks = sorted(blocks)
        step = max(1, math.ceil(len(ticks) / 12))
        ax.set_xticks(ticks[::step])
        ax.set_xlabel(unit)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="best")
    return _save(fig, out_png)


# --------------------------------------------------------------------------- #
# self-contained HTML
# --------------------------------------------------------------------------- #
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.45;
       color: #222; max-width: 980px; margin: 2em auto; padding: 0 1em; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: .1em .3em; border-radius: 3px; font-size: .92em; }
pre { background: #f4f4f4; padding: .7em; overflow-x: auto; } pre code { padding: 0; }
img { max-width: 100%; height: auto; }
blockquote { margin: 0; padding-left: 1em; border-left: 3px solid #ccc; color: #555; }
""".strip()

_SAFE_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)
_LIST_ITEM = re.compile(r"^( *)[-*+]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_HR = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _url(raw: str) -> str:
    """An escaped URL for an attribute; ``javascript:`` and other non-web schemes become ``#``."""
    raw = raw.strip()
    if _SAFE_URL.match(raw) and not re.match(r"^(https?:|mailto:|data:image/|//)", raw, re.I):
        raw = "#"
    return html.escape(raw, quote=True)


def _inline(text: str) -> str:
    """Inline Markdown (code, images, links, bold, italic) -> HTML, with everything else escaped."""
    stash: list[str] = []

    def keep(fragment: str) -> str:
        stash.append(fragment)
        return f"\x00{len(stash) - 1}\x00"

    text = text.replace("\x00", "")
    text = re.sub(r"(`+)(.+?)\1", lambda m: keep(f"<code>{html.escape(m[2].strip())}</code>"), text)
    text = re.sub(
        r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"([^\"]*)\")?\s*\)",
        lambda m: keep(
            f'<img src="{_url(m[2])}" alt="{html.escape(m[1], quote=True)}"'
            + (f' title="{html.escape(m[3], quote=True)}"' if m[3] else "")
            + ">"
        ),
        text,
    )
    text = re.sub(
        r"\[([^\]]+)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)",
        lambda m: keep(f'<a href="{_url(m[2])}">') + m[1] + keep("</a>"),
        text,
    )
    text = re.sub(
        r"<(https?://[^>\s]+)>", lambda m: keep(f'<a href="{_url(m[1])}">{html.escape(m[1])}</a>'), text
    )
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"(?<!\w)_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)", r"<em>\1</em>", text)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|])", r"\1", text)
    for _ in range(3):  # stashed fragments may hold stashed fragments (link text with code)
        text = re.sub(r"\x00(\d+)\x00", lambda m: stash[int(m[1])], text)
    return text


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _table(lines: list[str]) -> str:
    header = _split_row(lines[0])
    aligns = []
    for cell in _split_row(lines[1]):
        left, right = cell.startswith(":"), cell.endswith(":")
        aligns.append("center" if left and right else "right" if right else "left" if left else "")

    def cells(row: list[str], tag: str) -> str:
        out = []
        for i in range(len(header)):
            text = row[i] if i < len(row) else ""
            al = aligns[i] if i < len(aligns) else ""
            style = f' style="text-align: {al}"' if al else ""
            out.append(f"<{tag}{style}>{_inline(text)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    body = [cells(_split_row(r), "td") for r in lines[2:]]
    parts = ["<table>", "<thead>", cells(header, "th"), "</thead>"]
    if body:
        parts += ["<tbody>", *body, "</tbody>"]
    parts.append("</table>")
    return "\n".join(parts)


def _list(items: list[tuple[int, str]]) -> str:
    out: list[str] = []
    stack: list[int] = []
    for indent, text in items:
        if not stack or indent > stack[-1]:
            out.append("<ul>")
            stack.append(indent)
        else:
            while len(stack) > 1 and indent < stack[-1]:
                out.append("</li></ul>")
                stack.pop()
            out.append("</li>")
        out.append("<li>" + _inline(text))
    out.extend("</li></ul>" for _ in stack)
    return "".join(out)


def _md_to_html(text: str) -> str:
    """Built-in converter for the Markdown subset our reports use.

    Headings (``#``..``######``), paragraphs, ``-``/``*`` bullet lists nested by indentation,
    pipe tables (with ``:---:`` alignment), fenced code blocks, ``>`` quotes, horizontal rules,
    and inline code, images, links, ``**bold**`` and ``_italic_``. All other text is escaped.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n")
    blocks: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + _inline("\n".join(s.strip() for s in para)) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            flush()
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence[1]):
                body.append(lines[i])
                i += 1
            i += 1
            blocks.append("<pre><code>" + html.escape("\n".join(body)) + "</code></pre>")
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading[1])
            blocks.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
            i += 1
            continue
        if _HR.match(line) and not para:
            blocks.append("<hr>")
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]) and "-" in lines[i + 1]:
            flush()
            rows = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].strip() and "|" in lines[i]:
                rows.append(lines[i])
                i += 1
            blocks.append(_table(rows))
            continue
        if _LIST_ITEM.match(line) and not _HR.match(line):
            flush()
            items: list[tuple[int, str]] = []
            while i < len(lines) and lines[i].strip():
                m = _LIST_ITEM.match(lines[i])
                if m and not _HR.match(lines[i]):
                    items.append((len(m[1]), m[2]))
                elif lines[i].startswith(" ") and items:  # continuation of the previous item
                    items[-1] = (items[-1][0], items[-1][1] + "\n" + lines[i].strip())
                else:
                    break
                i += 1
            blocks.append(_list(items))
            continue
        if line.lstrip().startswith(">"):
            flush()
            quote = []
            while i < len(lines) and lines[i].lstrip().startswith(">"):
                quote.append(re.sub(r"^\s*>\s?", "", lines[i]))
                i += 1
            blocks.append("<blockquote>" + _md_to_html("\n".join(quote)) + "</blockquote>")
            continue
        para.append(line)
        i += 1
    flush()
    return "\n".join(blocks)


def _normalise_list_indent(text: str) -> str:
    """Re-indent nested bullets to 4 spaces per level (Python-Markdown needs 4; ours use 2)."""
    out = []
    stack: list[int] = []  # indents of the open list levels
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence or _HR.match(line) else _LIST_ITEM.match(line)
        if m:
            indent = len(m[1])
            while stack and indent < stack[-1]:
                stack.pop()
            if not stack or indent > stack[-1]:
                stack.append(indent)
            out.append("    " * (len(stack) - 1) + line.lstrip())
        elif stack and line.strip() and line.startswith(" ") and not in_fence:
            out.append("    " * len(stack) + line.lstrip())  # continuation of an item
        else:
            if line.strip() and not line.startswith(" "):
                stack = []
            out.append(line)
    return "\n".join(out)


def _markdown_package_html(text: str) -> str:
    import markdown  # type: ignore[import-untyped]

    md = markdown.Markdown(extensions=["tables", "fenced_code"], output_format="html")
    # escape raw HTML instead of passing it through (Markdown has no "safe mode" any more)
    md.preprocessors.deregister("html_block", strict=False)
    md.inlinePatterns.deregister("html", strict=False)
    return md.convert(_normalise_list_indent(text))


def _embed_images(body: str, base: Path) -> str:
    """Replace ``src`` of ``<img>`` tags that name local files by base64 data URIs."""

    def repl(m: re.Match[str]) -> str:
        src = html.unescape(m[2])
        if src.startswith("data:") or _SAFE_URL.match(src):
            return m[0]
        candidates = [Path(src), Path(urllib.parse.unquote(src))]
        for cand in candidates:
            path = cand if cand.is_absolute() else base / cand
            if path.is_file():
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                return f"{m[1]}data:{mime};base64,{data}{m[3]}"
        warnings.warn(f"write_html: image {src!r} not found next to the report; left as a link", stacklevel=3)
        return m[0]

    return re.sub(r'(<img\b[^>]*?\bsrc=")([^"]*)(")', repl, body)


def write_html(report_md: Path, out_html: Path, *, engine: str = "auto") -> Path:
    """Write a self-contained HTML version of a Markdown report.

    Images the report references by a local path (``![alt](file.png)``, relative to the
    report's folder) are embedded as base64 data URIs, so the HTML file can be moved or
    attached alone.

    Args:
        report_md: the Markdown report.
        out_html: where to write the HTML (folders are created).
        engine: ``"markdown"`` (the ``markdown`` package, tables extension), ``"builtin"`` (a
            small converter for the subset our reports use) or ``"auto"`` (the package when
            importable). Raw HTML in the Markdown is escaped by both.

    Returns:
        ``out_html``.
    """
    report_md = Path(report_md)
    out_html = Path(out_html)
    if engine not in ("auto", "markdown", "builtin"):
        raise ValueError(f"unknown engine {engine!r}; use 'auto', 'markdown' or 'builtin'")
    text = report_md.read_text(encoding="utf-8")
    use_pkg = engine == "markdown" or (engine == "auto" and _have("markdown"))
    body = _markdown_package_html(text) if use_pkg else _md_to_html(text)
    body = _embed_images(body, report_md.parent)

    title_match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.M)
    title = html.escape(title_match[1] if title_match else report_md.stem)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html
