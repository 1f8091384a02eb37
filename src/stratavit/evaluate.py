"""``evaluate``: frozen-feature evaluation of a run's backbone, per block and per level.

Writes ``OUT/results.json``::

    {"knn": {"top1": …}, "linear": {"top1": …},                        # last block, CLS
     "layers": [{"block": i, "knn_top1": …, "linear_top1": …,           # block is 1-based
                 "knn_top1_patch": …, "linear_top1_patch": …}, …],       # *_patch: mean patch token
     "dense": {"miou": …, "pixel_acc": …, "layers": [{"block": i, "miou": …}, …]},   # optional
     "correspondence": {"top1": …, "layers": [{"block": i, "top1": …, "chance": …}, …]},
     "baselines": {"random_init": {…same keys…}, "raw_pixels": {"knn_top1": …, "linear_top1": …}},
     "meta": {…}}

and ``OUT/report.md`` (+ PNGs, + a self-contained ``report.html``). Features are cached under
``OUT/cache`` keyed by the weights, the data and the resolution, so re-running is cheap.

A CNN backbone (``backbone.type=resnet_fpn``, evaluated as its plain timm body) has its feature
stages as blocks (layer1..layer4 of a ResNet, strides 4..32), each probed on its own grid; its
"CLS" entries (``knn_top1``, ``linear_top1``, the headline) hold the global average pool of the
stage, the ``*_patch`` entries are left out (they would repeat them), and ``meta`` says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from stratavit.config import Config, load_config_file
from stratavit.datasets import bad_files, build_dataset, segmentation_root, set_skip_log
from stratavit.evaluation import knn_per_layer, knn_top1, linear_probe_top1, raw_pixel_features, write_report
from stratavit.evaluation.correspondence import correspondence_score
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.features import BlockFeatures, extract_block_features
from stratavit.evaluation.tokens import (
    cnn_stages,
    depth_of,
    figure_block,
    is_cnn,
    model_at_size,
    native_size,
    resolve_blocks,
)
from stratavit.export import ExportError, backbone_from_checkpoint, load_backbone, plain_timm_model, random_backbone
from stratavit.run_folder import last_checkpoint
from stratavit.views import describe_resize, eval_transform


def load_run_backbone(run_dir: Path, which: str = "teacher") -> nn.Module:
    """The run's timm model (ViT or CNN body): ``backbone.safetensors`` (teacher) or the last checkpoint."""
    final = run_dir / "backbone.safetensors"
    if which == "teacher" and final.exists():
        return load_backbone(final)
    ckpt = last_checkpoint(run_dir)
    if ckpt.exists():
        return plain_timm_model(backbone_from_checkpoint(ckpt, which))
    raise ExportError(f"{run_dir} has no backbone.safetensors or {ckpt}; pre-train first (stratavit pretrain)")


def _weights_key(run_dir: Path, which: str) -> str:
    for f in (run_dir / "backbone.safetensors", last_checkpoint(run_dir)):
        if f.exists():
            st = f.stat()
            return f"{which}-{f.name}-{st.st_size}-{st.st_mtime_ns}"
    return which


def _cache_name(*parts: Any) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _num_classes(*label_sets: torch.Tensor) -> int:
    return int(max(int(ls.max()) for ls in label_sets)) + 1


def _class_names(ds: Dataset) -> list[str] | None:
    while not hasattr(ds, "classes") and hasattr(ds, "dataset"):
        ds = ds.dataset  # type: ignore[attr-defined]
    names = getattr(ds, "classes", None)
    return [str(c) for c in names] if names else None


def _pil_images(spec: str, count: int, seed: int) -> list:
    """``count`` images of a labelled set as PIL (a fixed random subset), for geometric probes."""
    ds = build_dataset(spec, split="test", transform=None, limit=count, seed=seed)
    return [ds[i][0] for i in range(len(ds))]  # type: ignore[arg-type]


def classification_probes(
    train: BlockFeatures,
    test: BlockFeatures,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    linear_epochs: int,
    poolings: Sequence[str] = ("cls", "mean_patch"),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """kNN and linear probe on CLS and mean-patch features of every block.

    ``poolings``: which of the two to probe (a CNN: ``("cls",)``, which holds its global average
    pool; the mean patch would repeat it). Returns ``(layers, last)``: per-block rows and the
    last block's CLS linear-probe result (with its test predictions, for the confusion matrix).
    """
    depth = len(train.cls)
    layers: list[dict[str, Any]] = [{"block": i + 1} for i in range(depth)]
    last: dict[str, Any] = {}
    for pooling, suffix in (("cls", ""), ("mean_patch", "_patch")):
        if pooling not in poolings:
            continue
        ftr, fte = train.pooled(pooling), test.pooled(pooling)
        knn = knn_per_layer(ftr, train.labels, fte, test.labels, k=k, temperature=temperature, num_classes=num_classes)
        for i in range(depth):
            lin = linear_probe_top1(
                ftr[i], train.labels, fte[i], test.labels, num_classes=num_classes, epochs=linear_epochs
            )
            layers[i][f"knn_top1{suffix}"] = knn[i]
            layers[i][f"linear_top1{suffix}"] = round(lin["top1"], 2)
            if pooling == "cls" and i == depth - 1:
                last = lin
    return layers, last


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
    resize: str = "center_crop",
    which: str = "teacher",
    baselines: bool = False,
    num_workers: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    linear_epochs: int = 100,
    dense_train: str | Path | None = None,
    dense_val: str | Path | None = None,
    dense_blocks: Sequence[int] | None = None,
    dense_size: int | None = None,
    correspondence_images: int = 200,
    visuals: bool = True,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the backbone of ``run_dir``; writes ``results.json`` and the report; returns the results.

    Args:
        train, test: labelled ImageFolder directories or named sets (``cifar10``, ``cifar10:test``, …),
            of any image size: images are brought to ``img_size`` by the ``resize`` policy.
        img_size: evaluation resolution (default: the backbone's; position embeddings are resampled
            when it differs; a CNN: the run's ``views.global_size``, any multiple of its coarsest
            stride). resize: ``center_crop`` or ``stretch`` (recorded in ``meta``).
        baselines: also evaluate the same architecture at random initialisation and raw pixels.
        linear_epochs: epochs of every linear probe (one per block and pooling).
        dense_train, dense_val: ``images/`` + ``masks/`` folders for the dense probe (both or none),
            or ``horses-sample:train`` / ``horses-sample:val`` (the shipped Weizmann Horses sample).
        dense_blocks: blocks of the dense probe (1-based, ``-1`` = last; default: up to 4 evenly
            spaced blocks ending at the last). dense_size: its input size (default ``img_size``).
        correspondence_images: held-out test images for the correspondence score (0: skip).
        visuals: write the attention / PCA / matches / confusion / embedding pictures.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out) if out is not None else run_dir / "eval"
    if not (run_dir / "config.yaml").exists():
        raise ExportError(
            f"{run_dir} is not a stratavit run folder (no config.yaml); pass the --out folder of `stratavit pretrain`"
        )
    if (dense_train is None) != (dense_val is None):
        raise EvaluationError("the dense probe needs both --dense-train and --dense-val (images/ + masks/ folders)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    cfg: Config = load_config_file(run_dir / "config.yaml")
    base_model = load_run_backbone(run_dir, which)
    size = img_size or native_size(base_model) or cfg.views.global_size
    try:
        model = model_at_size(base_model, size)
        transform = eval_transform(size, cfg.views.mean, cfg.views.std, resize)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    train_ds = build_dataset(train, split="train", transform=transform, limit=train_limit, seed=seed)
    test_ds = build_dataset(test, split="test", transform=transform, limit=test_limit, seed=seed)
    skip_log = out_dir / "skipped_images.txt"
    for ds in (train_ds, test_ds):
        set_skip_log(ds, skip_log)
    dense_setup = _check_dense(model, dense_train, dense_val, dense_blocks, dense_size or size, cfg) if dense_train else None
    data_key = (train, test, train_limit, test_limit, size, resize)
    started = time.time()
    timings: dict[str, float] = {}

    def features(net: nn.Module, tag: str, label: str) -> tuple[BlockFeatures, BlockFeatures]:
        t0 = time.time()
        got = tuple(
            extract_block_features(
                net, ds, batch_size=batch_size, num_workers=num_workers, desc=f"{label} features ({split})",
                cache_dir=cache / _cache_name(tag, split, *data_key),
            )
            for ds, split in ((train_ds, "train"), (test_ds, "test"))
        )
        timings[f"{label} features"] = round(time.time() - t0, 1)
        return got  # type: ignore[return-value]

    def probes(net: nn.Module, tag: str, label: str) -> tuple[dict[str, Any], dict[str, Any], BlockFeatures]:
        ftr, fte = features(net, tag, label)
        n_cls = _num_classes(ftr.labels, fte.labels)
        t0 = time.time()
        layers, last = classification_probes(
            ftr, fte, num_classes=n_cls, k=k, temperature=temperature, linear_epochs=linear_epochs,
            poolings=("cls",) if is_cnn(net) else ("cls", "mean_patch"),
        )
        timings[f"{label} probes"] = round(time.time() - t0, 1)
        part: dict[str, Any] = {"layers": layers}
        if dense_train is not None:
            part["dense"] = _dense(net, tag, label)
        if correspondence_images > 0:
            part["correspondence"] = _correspondence(net, label)
        return part, last, fte

    def _dense(net: nn.Module, tag: str, label: str) -> dict[str, Any]:
        from stratavit.evaluation.dense import dense_probe

        assert dense_setup is not None
        t0 = time.time()
        train_root, val_root, blocks, d_size = dense_setup
        try:
            res = dense_probe(
                model_at_size(net, d_size), train_root, val_root, blocks=blocks, size=d_size, mean=cfg.views.mean,
                std=cfg.views.std, num_workers=num_workers,
                cache_dir=cache / _cache_name("dense", tag, dense_train, dense_val, d_size),
            )
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        timings[f"{label} dense"] = round(time.time() - t0, 1)
        return res

    corr_example: dict[str, Any] = {}
    corr_images: list = []

    def _correspondence(net: nn.Module, label: str) -> dict[str, Any]:
        t0 = time.time()
        if not corr_images:  # read once, shared by the pre-trained and the random-init backbone
            corr_images.extend(_pil_images(test, correspondence_images, seed))
        res = correspondence_score(
            net, corr_images, size=size, mean=cfg.views.mean, std=cfg.views.std,
            seed=seed, batch_size=min(batch_size, 128), example_block=figure_block(net, size),
        )
        example = res.pop("example")
        if not corr_example:
            corr_example.update(example)
        timings[f"{label} correspondence"] = round(time.time() - t0, 1)
        return res

    main, last, test_feats = probes(model, _weights_key(run_dir, which), which)
    results: dict[str, Any] = {
        "knn": {"top1": main["layers"][-1]["knn_top1"], "k": k, "temperature": temperature},
        "linear": {"top1": round(last["top1"], 2), "train_top1": round(last["train_top1"], 2), "epochs": linear_epochs},
        **main,
    }
    if baselines:
        rand = model_at_size(plain_timm_model(random_backbone(cfg.backbone, seed=cfg.train.seed)), size)
        rand_part, rand_last, _ = probes(rand, f"random-init-{cfg.backbone}-{cfg.train.seed}", "random init")
        raw = _raw_pixels(train_ds, test_ds, cache, data_key, batch_size, k, temperature, linear_epochs)
        results["baselines"] = {
            "random_init": {
                "knn_top1": rand_part["layers"][-1]["knn_top1"], "linear_top1": round(rand_last["top1"], 2),
                **rand_part,
            },
            "raw_pixels": raw,
        }
    results["meta"] = {
        "run_dir": str(run_dir),
        "recipe": cfg.recipe,
        "weights": which,
        "train": train,
        "test": test,
        "train_images": len(train_ds),  # type: ignore[arg-type]
        "test_images": len(test_ds),  # type: ignore[arg-type]
        "classes": _num_classes(test_feats.labels),
        "img_size": size,
        "resize_policy": describe_resize(size, resize),
        "skipped_images": len(set(bad_files(train_ds)) | set(bad_files(test_ds))),  # one shared skip log
        "seconds": timings,
        "eval_seconds": round(time.time() - started, 1),
        **(meta or {}),
    }
    if is_cnn(model):
        stages = cnn_stages(model)
        results["meta"]["blocks"] = (
            f"the {len(stages)} feature stages of the CNN {cfg.backbone.arch} "
            f"({', '.join(f'{s.module} at stride {s.stride}' for s in stages)})"
        )
        results["meta"]["global_feature"] = "global average pool of each stage (a CNN has no CLS token)"
    run_json = run_dir / "run.json"
    if run_json.exists():
        results["meta"]["training"] = json.loads(run_json.read_text())
    if results["meta"]["skipped_images"]:
        print(
            f"warning: {results['meta']['skipped_images']} unreadable image(s) were skipped (the next readable image "
            f"stands in for each); they are listed in {skip_log}",
            file=sys.stderr,
        )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures: list[tuple[str, Path]] = []
    if visuals:
        from stratavit.evaluation.report_figures import report_figures

        figures = report_figures(
            out_dir, model, test_ds, test_feats, last, results, corr_example,
            mean=cfg.views.mean, std=cfg.views.std, class_names=_class_names(test_ds), seed=seed,
        )
    write_report(
        out_dir,
        results,
        metrics_csv=run_dir / "metrics.csv",
        title=f"stratavit evaluation: {cfg.recipe}",
        figures=figures,
        html=visuals,
        extra_md=_cnn_note(model, size, visuals) if is_cnn(model) else "",
    )
    return results


def _check_dense(
    model: nn.Module, train: str | Path, val: str | Path | None, blocks: Sequence[int] | None, size: int, cfg: Config
) -> tuple[Path, Path, list[int], int]:
    """Validate the dense probe's folders, blocks and size before any feature is extracted.

    Returns ``(train_root, val_root, 1-based blocks, size)``; raises :class:`EvaluationError`.
    """
    from stratavit.evaluation.dense import SegmentationFolder

    roots = (segmentation_root(str(train)), segmentation_root(str(val)))
    try:
        for root in roots:
            SegmentationFolder(root, size, cfg.views.mean, cfg.views.std)  # layout and image/mask pairing
        sized = model_at_size(model, size)
        numbers = resolve_blocks(sized, _dense_blocks(sized, blocks))
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    return roots[0], roots[1], numbers, size


def _cnn_note(model: nn.Module, size: int, visuals: bool) -> str:
    """The report's note on how a CNN backbone is read (stages as blocks, no CLS, no attention)."""
    stages = cnn_stages(model)
    grids = ", ".join(f"{size // s.stride}x{size // s.stride}" for s in stages)
    lines = [
        "## CNN backbone",
        "",
        f"The backbone is a CNN: its **blocks are its {len(stages)} feature stages** "
        f"({', '.join(s.module for s in stages)}; strides {', '.join(str(s.stride) for s in stages)}; "
        f"grids {grids} at {size} px). A CNN has no class token: every \"CLS\" figure (kNN and linear "
        "top-1, the headline, the confusion matrix, the 2-D map) is the **global average pool** of the "
        "stage's feature map, so no separate mean-patch columns are listed. The dense probe and the "
        "correspondence score read each stage on its own grid: a \"patch\" is one cell of that stage "
        "(stride x stride pixels) and the one-patch tolerance of the correspondence score is one such cell.",
    ]
    if visuals:
        lines += [
            "",
            "The CLS-attention picture is skipped (a CNN has neither a class token nor attention); the "
            f"PCA and matches pictures show stage {figure_block(model, size)}.",
        ]
    return "\n".join(lines)


def _dense_blocks(model: nn.Module, blocks: Sequence[int] | None) -> list[int]:
    """The dense probe's blocks: as given, else up to 4 evenly spaced blocks ending at the last."""
    if blocks:
        return list(blocks)
    depth = depth_of(model)
    count = min(4, depth)
    return sorted({round(depth * (i + 1) / count) for i in range(count)})


def _raw_pixels(
    train_ds: Dataset, test_ds: Dataset, cache: Path, data_key: tuple, batch_size: int, k: int,
    temperature: float, linear_epochs: int,
) -> dict[str, Any]:
    ptr, ytr = raw_pixel_features(train_ds, batch_size=batch_size, desc="raw pixels (train)",
                                  cache_path=cache / (_cache_name("pixels", "train", *data_key) + ".pt"))
    pte, yte = raw_pixel_features(test_ds, batch_size=batch_size, desc="raw pixels (test)",
                                  cache_path=cache / (_cache_name("pixels", "test", *data_key) + ".pt"))
    n_cls = _num_classes(ytr, yte)
    return {
        "knn_top1": knn_top1(ptr, ytr, pte, yte, k=k, temperature=temperature, num_classes=n_cls),
        "linear_top1": round(linear_probe_top1(ptr, ytr, pte, yte, num_classes=n_cls, epochs=linear_epochs)["top1"], 2),
    }
