"""2-D maps of features for the report's scatter picture: t-SNE, UMAP or PCA, whichever is installed.

scikit-learn (t-SNE) and umap-learn (UMAP) are optional and imported lazily, only when used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from torch import Tensor

from stratavit.evaluation.plotting import as_cpu_float, new_figure, save_figure

__all__ = ["EMBED_MAX_POINTS", "Embedding2D", "embed_2d", "pca_project", "plot_embedding_2d"]

EMBED_MAX_POINTS = 2000


def pca_project(x: Tensor, k: int) -> Tensor:
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
        x = pca_project(torch.from_numpy(x), 50).numpy()
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
    x = as_cpu_float(feats)
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
        coords = pca_project(x, 2) if n else x.new_zeros(0, 2)
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
    if len(y) != as_cpu_float(feats).shape[0]:
        raise ValueError(f"{len(y)} labels for {as_cpu_float(feats).shape[0]} features")
    coords, used, idx = embed_2d(feats, method, seed, max_points=max_points)
    y = y[idx].numpy()
    xy = coords.numpy()
    classes = np.unique(y)

    fig = new_figure((6.4 if len(classes) <= 20 else 5.2, 5.0))
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
    return save_figure(fig, out_png), used
