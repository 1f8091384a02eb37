"""Evaluation building blocks: frozen-feature extraction, kNN and linear probes, reports."""

from stratavit.evaluation.features import extract_block_features, raw_pixel_features
from stratavit.evaluation.knn import knn_per_block, knn_predict, knn_top1
from stratavit.evaluation.linear import linear_probe_top1
from stratavit.evaluation.report import plot_block_curve, plot_loss_curve, write_report

__all__ = [
    "extract_block_features",
    "raw_pixel_features",
    "knn_predict",
    "knn_top1",
    "knn_per_block",
    "linear_probe_top1",
    "plot_loss_curve",
    "plot_block_curve",
    "write_report",
]
