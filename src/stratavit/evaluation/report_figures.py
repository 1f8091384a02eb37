"""The pictures of an evaluation report, computed from the model and the evaluation's results.

Attention maps and PCA colours of the last block on a few test images, the matched patches of
one correspondence pair, the per-block panels, the linear probe's confusion matrix and a 2-D map
(t-SNE / UMAP / PCA, whichever is installed) of the test CLS features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stratavit.evaluation.features import BlockFeatures
from stratavit.evaluation.tokens import block_tokens, cls_attention_maps, figure_block, is_cnn
from stratavit.evaluation.block_plots import plot_layer_panels
from stratavit.evaluation.embedding import plot_embedding_2d
from stratavit.evaluation.visuals import plot_attention_maps, plot_confusion, plot_matches, plot_pca_rgb


def _unnormalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(..., 3, H, W)`` normalised images -> values in ``[0, 1]``."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)


def report_figures(
    out_dir: Path,
    model: nn.Module,
    test_ds: Dataset,
    test_feats: BlockFeatures,
    linear_last: dict[str, Any],
    results: dict[str, Any],
    correspondence_example: dict[str, Any],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: list[str] | None,
    seed: int = 0,
    n_images: int = 6,
) -> list[tuple[str, Path]]:
    """Write the report's PNGs into ``out_dir``; returns ``[(caption, png), ...]`` in report order.

    A CNN ``model`` (see :func:`~stratavit.evaluation.tokens.is_cnn`): no attention picture (it has
    no class token nor attention), the PCA picture shows :func:`~stratavit.evaluation.tokens.figure_block`
    and the captions name stages and the global average pool instead of blocks and CLS.
    """
    figures: list[tuple[str, Path]] = []
    cnn = is_cnn(model)
    names = {"unit": "CNN stage", "global_label": "global avg pool"} if cnn else {}
    panels = plot_layer_panels(results, out_dir / "layer_panels.png", **names)
    if panels is not None:
        figures.append((
            "Per-stage probes: kNN and linear on the global average pool, correspondence, dense" if cnn else
            "Per-block probes: kNN and linear on CLS and mean patch, correspondence, dense",
            panels,
        ))

    n = len(test_ds)  # type: ignore[arg-type]
    picks = torch.linspace(0, n - 1, min(n_images, n)).round().long().unique().tolist()  # spread over classes
    images = torch.stack([test_ds[i][0] for i in picks])
    model.eval()
    shown = _unnormalise(images, mean, std)
    if cnn:
        stage = figure_block(model, int(images.shape[-1]))
        with torch.inference_mode():
            patches = block_tokens(model, images, [stage])[0].patches
        figures.append((f"Feature map of stage {stage}, first 3 principal components as RGB",
                        plot_pca_rgb(shown, patches, out_dir / "pca.png")))
    else:
        with torch.inference_mode():
            attn = cls_attention_maps(model, images)
            patches = block_tokens(model, images, [-1])[0].patches
        figures.append(("CLS attention of the last block (mean and per head)",
                        plot_attention_maps(shown, attn, out_dir / "attention.png")))
        figures.append(("Patch features of the last block, first 3 principal components as RGB",
                        plot_pca_rgb(shown, patches, out_dir / "pca.png")))

    if correspondence_example:
        ex = correspondence_example
        figures.append((
            f"Nearest-cell matches between two crops at stage {ex.get('block')} (green: within one cell of the "
            "truth)" if cnn else "Nearest-patch matches between two crops (green: within one patch of the truth)",
            plot_matches(
                _unnormalise(ex["view_a"], mean, std), _unnormalise(ex["view_b"], mean, std),
                ex["points_a"], ex["points_b"], ex["correct"], out_dir / "matches.png",
            ),
        ))

    preds = linear_last.get("predictions")
    if preds is not None:
        labels = test_feats.labels
        k = max(int(labels.max()), int(preds.max()), len(class_names or []) - 1) + 1
        conf = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
        where = "last stage, global average pool" if cnn else "last block, CLS"
        figures.append((f"Confusion matrix of the linear probe ({where}), rows normalised",
                        plot_confusion(conf, class_names, out_dir / "confusion.png")))

    png, method = plot_embedding_2d(
        test_feats.cls[-1].float(), test_feats.labels, class_names, out_dir / "embedding.png", seed=seed
    )
    what = "global-average-pool features of the last stage" if cnn else "CLS features of the last block"
    figures.append((f"Test {what} in 2-D ({method})", png))
    return figures
