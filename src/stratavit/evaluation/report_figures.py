"""The report's pictures of the model itself: per-block panels, CLS attention, PCA of patch features.

Each evaluation adds its own pictures (``Evaluation.figures``); these are the ones that belong to
no single evaluation. A CNN (see :func:`~stratavit.evaluation.tokens.is_cnn`) has no attention
picture (no class token nor attention); its PCA picture shows
:func:`~stratavit.evaluation.tokens.figure_block` and the captions name stages instead of blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from stratavit.evaluation.block_plots import plot_block_panels
from stratavit.evaluation.protocol import Figure, Panel
from stratavit.evaluation.tokens import (
    block_tokens,
    cls_attention_maps,
    figure_block,
    is_cnn,
)
from stratavit.evaluation.visuals import plot_attention_maps, plot_pca_rgb, unnormalise

__all__ = ["model_figures"]


def model_figures(
    out_dir: Path,
    model: nn.Module,
    test_ds: Dataset,
    results: Mapping[str, Any],
    panels: Sequence[Panel],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    n_images: int = 6,
) -> list[Figure]:
    """Write the per-block panels (of ``panels``, in their order), attention and PCA pictures into ``out_dir``."""
    figures: list[Figure] = []
    cnn = is_cnn(model)
    names = {"unit": "CNN stage", "global_label": "global avg pool"} if cnn else {}
    specs = [(p.title, p.ylabel, list(p.curves)) for p in sorted(panels, key=lambda p: p.order)]
    png = plot_block_panels(results, out_dir / "layer_panels.png", panels=specs, **names)
    if png is not None:
        figures.append(Figure(
            "Per-stage probes: kNN and linear on the global average pool, correspondence, dense" if cnn else
            "Per-block probes: kNN and linear on CLS and mean patch, correspondence, dense",
            png, 10,
        ))
    n = len(test_ds)  # type: ignore[arg-type]
    picks = torch.linspace(0, n - 1, min(n_images, n)).round().long().unique().tolist()  # spread over classes
    images = torch.stack([test_ds[i][0] for i in picks])
    model.eval()
    shown = unnormalise(images, mean, std)
    if cnn:
        stage = figure_block(model, int(images.shape[-1]))
        with torch.inference_mode():
            patches = block_tokens(model, images, [stage])[0].patches
        figures.append(Figure(f"Feature map of stage {stage}, first 3 principal components as RGB",
                              plot_pca_rgb(shown, patches, out_dir / "pca.png"), 30))
        return figures
    with torch.inference_mode():
        attn = cls_attention_maps(model, images)
        patches = block_tokens(model, images, [-1])[0].patches
    figures.append(Figure("CLS attention of the last block (mean and per head)",
                          plot_attention_maps(shown, attn, out_dir / "attention.png"), 20))
    figures.append(Figure("Patch features of the last block, first 3 principal components as RGB",
                          plot_pca_rgb(shown, patches, out_dir / "pca.png"), 30))
    return figures
