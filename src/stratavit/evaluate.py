"""``evaluate``: frozen-feature evaluation of a run's backbone (kNN, linear probe, per-layer kNN).

Writes ``OUT/results.json``::

    {"knn": {"top1": …}, "linear": {"top1": …},
     "layers": [{"block": i, "knn_top1": …}, …],          # block is 1-based
     "baselines": {"random_init": {"knn_top1": …, "layers": […]}, "raw_pixels": {"knn_top1": …}},  # optional
     "meta": {…}}

and ``OUT/report.md`` with plots. Features are cached under ``OUT/cache`` keyed by the weights,
the data and the resolution, so re-running is cheap.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stratavit.config import Config, load_config_file
from stratavit.datasets import build_dataset
from stratavit.evaluation import (
    extract_block_features,
    knn_per_layer,
    knn_top1,
    linear_probe_top1,
    raw_pixel_features,
    write_report,
)
from stratavit.export import ExportError, backbone_from_checkpoint, load_backbone, random_backbone
from stratavit.train import last_checkpoint
from stratavit.views import eval_transform


def load_run_backbone(run_dir: Path, which: str = "teacher") -> nn.Module:
    """The run's timm ViT: ``backbone.safetensors`` (teacher) or the last checkpoint."""
    final = run_dir / "backbone.safetensors"
    if which == "teacher" and final.exists():
        return load_backbone(final)
    ckpt = last_checkpoint(run_dir)
    if ckpt.exists():
        return backbone_from_checkpoint(ckpt, which).vit.eval()
    raise ExportError(f"{run_dir} has no backbone.safetensors or {ckpt}; pre-train first (stratavit pretrain)")


def _weights_key(run_dir: Path, which: str) -> str:
    for f in (run_dir / "backbone.safetensors", last_checkpoint(run_dir)):
        if f.exists():
            st = f.stat()
            return f"{which}-{f.name}-{st.st_size}-{st.st_mtime_ns}"
    return which


def _cache_name(*parts: Any) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16] + ".pt"


def _num_classes(*label_sets: torch.Tensor) -> int:
    return int(max(int(ls.max()) for ls in label_sets)) + 1


def evaluate_run(
    run_dir: str | Path,
    train: str,
    test: str,
    out: str | Path | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    batch_size: int = 256,
    img_size: int | None = None,
    which: str = "teacher",
    baselines: bool = False,
    num_workers: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the backbone of ``run_dir`` on labelled ``train``/``test`` sets; returns the results.

    Args:
        train, test: ImageFolder directories or named sets (``cifar10``, ``cifar10:test``, …).
        img_size: evaluation resolution (default: the backbone's). Images are resized (shorter
            side) and centre-cropped to it; the policy is recorded in ``meta``.
        baselines: also evaluate the same architecture at random initialisation and raw pixels.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out) if out is not None else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    if not (run_dir / "config.yaml").exists():
        raise ExportError(
            f"{run_dir} is not a stratavit run folder (no config.yaml); pass the --out folder of `stratavit pretrain`"
        )
    cfg: Config = load_config_file(run_dir / "config.yaml")
    model = load_run_backbone(run_dir, which)
    size = img_size or int(model.patch_embed.img_size[0])
    transform = eval_transform(size, cfg.views.mean, cfg.views.std)
    train_ds = build_dataset(train, split="train", transform=transform, limit=train_limit, seed=0)
    test_ds = build_dataset(test, split="test", transform=transform, limit=test_limit, seed=0)
    data_key = (train, test, train_limit, test_limit, size)
    started = time.time()

    def features(net: nn.Module, tag: str, label: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ftr, ytr = extract_block_features(
            net, train_ds, batch_size=batch_size, num_workers=num_workers, desc=f"{label} features (train)",
            cache_path=cache / _cache_name(tag, "train", *data_key),
        )
        fte, yte = extract_block_features(
            net, test_ds, batch_size=batch_size, num_workers=num_workers, desc=f"{label} features (test)",
            cache_path=cache / _cache_name(tag, "test", *data_key),
        )
        return ftr, ytr, fte, yte

    ftr, ytr, fte, yte = features(model, _weights_key(run_dir, which), which)
    n_cls = _num_classes(ytr, yte)
    per_layer = knn_per_layer(ftr, ytr, fte, yte, k=k, temperature=temperature, num_classes=n_cls)
    lin = linear_probe_top1(ftr[-1], ytr, fte[-1], yte, num_classes=n_cls)
    results: dict[str, Any] = {
        "knn": {"top1": per_layer[-1], "k": k, "temperature": temperature},
        "linear": {"top1": lin["top1"], "train_top1": lin["train_top1"]},
        "layers": [{"block": i + 1, "knn_top1": acc} for i, acc in enumerate(per_layer)],
    }
    if baselines:
        rand = random_backbone(cfg.backbone, seed=cfg.train.seed).vit
        rtr, rytr, rte, ryte = features(rand, f"random-init-{cfg.backbone}-{cfg.train.seed}", "random init")
        rand_layers = knn_per_layer(rtr, rytr, rte, ryte, k=k, temperature=temperature, num_classes=n_cls)
        ptr, pytr = raw_pixel_features(train_ds, batch_size=batch_size, desc="raw pixels train",
                                       cache_path=cache / _cache_name("pixels", "train", *data_key))
        pte, pyte = raw_pixel_features(test_ds, batch_size=batch_size, desc="raw pixels test",
                                       cache_path=cache / _cache_name("pixels", "test", *data_key))
        results["baselines"] = {
            "random_init": {
                "knn_top1": rand_layers[-1],
                "layers": [{"block": i + 1, "knn_top1": a} for i, a in enumerate(rand_layers)],
            },
            "raw_pixels": {"knn_top1": knn_top1(ptr, pytr, pte, pyte, k=k, temperature=temperature, num_classes=n_cls)},
        }
    results["meta"] = {
        "run_dir": str(run_dir),
        "recipe": cfg.recipe,
        "weights": which,
        "train": train,
        "test": test,
        "train_images": len(ytr),
        "test_images": len(yte),
        "classes": n_cls,
        "resize_policy": f"resize shorter side to {size}, centre crop {size}x{size}",
        "eval_seconds": round(time.time() - started, 1),
        **(meta or {}),
    }
    run_json = run_dir / "run.json"
    if run_json.exists():
        results["meta"]["training"] = json.loads(run_json.read_text())
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(
        out_dir,
        results,
        metrics_csv=run_dir / "metrics.csv",
        title=f"stratavit evaluation: {cfg.recipe}",
    )
    return results
