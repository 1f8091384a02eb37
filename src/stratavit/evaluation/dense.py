"""Dense probe: a linear segmentation head on frozen patch tokens, scored by mIoU.

Protocol (:func:`dense_probe`):

1. images are stretched to ``S x S`` (aspect ratio not kept, nothing cropped away), masks are
   resized with nearest-neighbour to ``S x S`` for training
   (:class:`~stratavit.evaluation.segmentation_data.SegmentationFolder`);
2. one forward pass per split extracts the patch tokens ``(gh, gw, C)`` of every requested block
   (after the final norm, see :func:`~stratavit.evaluation.tokens.block_tokens`) into a
   disk-backed float16 store (:mod:`stratavit.evaluation.store`) ``(n_blocks, N, gh, gw, C)`` --
   memory stays bounded by one batch, whatever the data set size (a CNN's blocks are its stages,
   each with its own grid ``S / stride`` and width, stored one after the other);
3. per block, a linear head is trained and scored (:mod:`stratavit.evaluation.dense_head`).

Defaults: the head trains for ``epochs=None`` -> :func:`~stratavit.evaluation.dense_head.auto_epochs`,
the fewest epochs that make ``steps=400`` steps of 16 images (Weizmann horses, 200 train images:
31 epochs, 403 steps; a data set of 6,400+ images: one epoch), AdamW lr 1e-2 cosine-decayed to 0,
weight decay 1e-3, zero-initialised head, the loss computed on masks of at most 4 pixels per token
side (:func:`~stratavit.evaluation.dense_head.loss_side`: 56 px for ViT-S/16 at 224 px, the full
``S`` for patch 4 at 64 px); ``max_images`` caps each split (a fixed random subset). On random-init ViT-S/16 tokens of the horses at ``S=224`` this
reaches a training loss within 4 % of a 100-epoch run (and the same val mIoU), where lr 1e-3 stays
40 % higher; more steps buy nothing on small sets, and a fixed step budget keeps large sets
affordable on a CPU (pass ``epochs`` for more).

Timings measured on 2 CPU cores, horses (200 train / 128 val images), both splits, blocks given:
tiny ViT (``S=32``, patch 4, 32 dims, 2 blocks, blocks 1 and 2): ~1 s in all (0.7 s with the token
stores cached); ViT-S/16 at ``S=224``, blocks 4, 8, 12: ~22 s of token extraction and ~5 s per
block for the head. Random-init weights reach ~46 % mIoU (tiny ViT) and ~60 % (ViT-S/16) there;
predicting background everywhere scores ~37 %.

Disk: each split's store takes ``n_blocks * N * gh * gw * C * 2`` bytes of tokens, plus ``N * S * S``
bytes of resized masks for train (horses, ViT-S/16, 3 blocks: 90 + 10 MB for train), under
``cache_dir`` or the system temporary folder.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stratavit.evaluation.dense_head import (
    DEFAULT_HEAD_BATCH,
    DEFAULT_LR,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT_DECAY,
    auto_epochs,
    evaluate_dense_head,
    loss_side,
    train_dense_head,
)
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.progress import progress
from stratavit.evaluation.segmentation_data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationFolder,
    guarded_batches,
    scan_masks,
)
from stratavit.evaluation.store import StoreWriter, open_arrays, read_meta
from stratavit.evaluation.tokens import (
    block_dims,
    block_tokens,
    grid_of,
    is_cnn,
    model_at_size,
    resolve_blocks,
)

__all__ = ["DenseTokens", "class_count", "dense_probe", "token_stores", "weights_fingerprint"]

_FP16_MAX = 65504.0
_STORE_VERSION = 1


def weights_fingerprint(model: nn.Module) -> str:
    """Cheap fingerprint of the weights (shapes, sums), so a cache never serves another model's tokens."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                v = t.detach().to("cpu", torch.float64)
                summary = f"{float(v.sum()):.10e},{float(v.abs().sum()):.10e}" if v.numel() else ""
            else:
                summary = str(t.detach().cpu().sum().item()) if t.numel() else ""
            h.update(f"{name}:{tuple(t.shape)}:{summary};".encode())
    return h.hexdigest()


@dataclass
class DenseTokens:
    """Patch tokens of one split: ``feats`` one ``(N, gh, gw, C)`` float16 array per block (the
    grid and width may differ from block to block, as a CNN's stages do), ``masks`` ``(N, S, S)``."""

    blocks: list[int]
    feats: list[np.ndarray]
    masks: np.ndarray | None

    def block(self, b: int) -> np.ndarray:
        return self.feats[self.blocks.index(b)]


def _open_tokens(folder: Path, key: dict[str, Any], blocks: list[int], want_masks: bool) -> DenseTokens | None:
    meta = read_meta(folder)
    if meta is None or meta.get("key") != key or not set(blocks) <= set(meta["blocks"]):
        return None
    if want_masks and not meta["masks"]:
        return None
    shapes = meta.get("shapes") or [meta["shape"][1:]] * meta["shape"][0]  # one shape: all blocks alike
    feats = open_arrays(folder, "feats.f16", np.float16, shapes)
    masks = open_arrays(folder, "masks.bin", meta["mask_dtype"], [meta["mask_shape"]])[0] if meta["masks"] else None
    return DenseTokens(list(meta["blocks"]), feats, masks)


def _extract_tokens(
    model: nn.Module,
    ds: SegmentationFolder,
    blocks: list[int],
    folder: Path,
    key: dict[str, Any],
    *,
    with_masks: bool,
    mask_dtype: np.dtype,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    desc: str,
) -> DenseTokens:
    """One forward pass over ``ds``: tokens of ``blocks`` (and resized masks) into a new store at ``folder``."""
    cached = _open_tokens(folder, key, blocks, with_masks)
    if cached is not None:
        return cached
    n, s = len(ds), ds.size
    dims = block_dims(model)
    shapes = [(n, *grid_of(model, (s, s), b), dims[b - 1]) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with StoreWriter(folder) as store:
            feats = store.arrays("feats.f16", np.float16, shapes)
            masks = store.array("masks.bin", mask_dtype, (n, s, s)) if with_masks else None
            _fill_tokens(model, ds, blocks, feats, masks, batch_size=batch_size, num_workers=num_workers,
                         device=device, desc=desc)
            uniform = len(set(shapes)) == 1  # a ViT: one (L, N, gh, gw, C) array, as stores have always been
            meta: dict[str, Any] = {
                "key": key, "blocks": blocks, "masks": masks is not None,
                **({"shape": [len(blocks), *shapes[0]]} if uniform else {"shapes": [list(x) for x in shapes]}),
            }
            if masks is not None:
                meta.update(mask_dtype=np.dtype(mask_dtype).str, mask_shape=[n, s, s])
            del feats, masks
            store.commit(meta)
    finally:
        model.train(was_training)
    opened = _open_tokens(folder, key, blocks, with_masks)
    assert opened is not None
    return opened


def _fill_tokens(
    model: nn.Module, ds: SegmentationFolder, blocks: list[int], feats: list[np.ndarray], masks: np.ndarray | None,
    *, batch_size: int, num_workers: int, device: torch.device, desc: str,
) -> None:
    n = len(ds)
    start = 0
    with torch.inference_mode():
        for images, ys, _ in guarded_batches(
            n, ds.__getitem__, batch_size=batch_size, num_workers=num_workers, desc=desc, pin=device.type == "cuda",
        ):
            b = images.shape[0]
            tokens = block_tokens(model, images.to(device, non_blocking=True).float(), blocks)
            for li, t in enumerate(tokens):
                if not bool(torch.isfinite(t.patches).all()):
                    raise EvaluationError(
                        f"the backbone gives non-finite (NaN / inf) tokens at block {t.block} for images "
                        f"{start}..{start + b - 1} of {ds.root}; check the checkpoint (did training diverge?)"
                    )
                feats[li][start : start + b] = t.patches.clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()
            if masks is not None:
                masks[start : start + b] = ys.numpy().astype(masks.dtype)
            start += b
    if start != n:
        raise RuntimeError(f"the data set yielded {start} images but has {n}")


def _input_size(model: nn.Module, size: int | None) -> int:
    if size is not None:
        return int(size)
    if is_cnn(model):
        raise EvaluationError(
            "a CNN backbone has no native input size: pass size= (a multiple of its coarsest stride, e.g. 224)"
        )
    img_size = tuple(model.patch_embed.img_size)  # type: ignore[union-attr]
    if img_size[0] != img_size[1]:
        raise EvaluationError(
            f"the model takes {img_size[0]}x{img_size[1]} inputs; the dense probe uses square inputs: pass size="
        )
    return int(img_size[0])


def class_count(train_ds: SegmentationFolder, val_ds: SegmentationFolder, num_classes: int | None,
                 num_workers: int) -> tuple[int, np.dtype]:
    """``K`` (given, or the largest id in the masks + 1, checked) and the dtype of the stored masks."""
    summaries = {
        split: scan_masks(ds, num_workers=num_workers, desc=f"dense masks ({split})", ignore_index=IGNORE_INDEX)
        for split, ds in (("train", train_ds), ("val", val_ds))
    }
    for split, summary in summaries.items():
        if summary.labelled == 0:
            raise EvaluationError(f"every {split} mask pixel is {IGNORE_INDEX} (ignore): nothing to segment")
    top = max(summaries.values(), key=lambda m: m.max_id)
    if num_classes is None:
        num_classes = top.max_id + 1
        if num_classes < 2:
            raise EvaluationError(
                "the masks hold only class 0: a segmentation probe needs at least two classes (pass num_classes)"
            )
    elif top.max_id >= num_classes:
        raise EvaluationError(
            f"mask {top.max_file} holds class id {top.max_id} but num_classes is {num_classes}; "
            f"pass num_classes > {top.max_id} (or leave it unset) or mark those pixels {IGNORE_INDEX} (ignore)"
        )
    return num_classes, np.dtype(np.uint8) if max(top.max_id, IGNORE_INDEX) <= 255 else np.dtype(np.int32)


def token_stores(
    net: nn.Module, train_ds: SegmentationFolder, val_ds: SegmentationFolder, numbers: list[int],
    mask_dtype: np.dtype, root: Path, *, batch_size: int, num_workers: int, device: torch.device,
) -> tuple[DenseTokens, DenseTokens]:
    """The patch-token stores of both splits under ``root/train`` (with the ``S x S`` masks) and
    ``root/val``, extracted by one forward pass each unless a store there already matches the
    weights, data, size and blocks (so the dense probe and dense retrieval share them)."""
    weights = weights_fingerprint(net)
    stores = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        key = {
            "version": _STORE_VERSION, "weights": weights, "data": ds.digest(), "n": len(ds), "size": ds.size,
            "mean": list(ds.mean), "std": list(ds.std),
        }
        stores[split] = _extract_tokens(
            net, ds, numbers, root / split, key, with_masks=split == "train", mask_dtype=mask_dtype,
            batch_size=batch_size, num_workers=num_workers, device=device, desc=f"dense features ({split})",
        )
    assert stores["train"].masks is not None
    return stores["train"], stores["val"]


def _probe_blocks(
    net: nn.Module, train_ds: SegmentationFolder, val_ds: SegmentationFolder, numbers: list[int], num_classes: int,
    mask_dtype: np.dtype, root: Path, head: dict[str, Any], *, batch_size: int, num_workers: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Token stores of both splits under ``root``, then one head per block: its row of ``layers``."""
    train_store, val_store = token_stores(net, train_ds, val_ds, numbers, mask_dtype, root, batch_size=batch_size,
                                          num_workers=num_workers, device=device)
    layers = []
    loss_size = head.pop("loss_size", None)
    for b in progress(numbers, "dense heads", total=len(numbers)):
        side = loss_side(train_ds.size, min(grid_of(net, (train_ds.size, train_ds.size), b)), loss_size)
        trained = train_dense_head(train_store.block(b), train_store.masks, num_classes, device=device,
                                   loss_size=side, **head)
        scores = evaluate_dense_head(trained, val_store.block(b), val_ds.original_masks(), num_classes)
        layers.append(
            {"block": b, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
             "per_class_iou": scores["per_class_iou"], "loss_size": side}
        )
    return layers


def dense_probe(
    model: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    *,
    blocks: Sequence[int] = (-1,),
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: int | None = None,
    batch_size: int = 64,
    epochs: int | None = None,
    lr: float = DEFAULT_LR,
    head_batch_size: int = DEFAULT_HEAD_BATCH,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    limit: int | None = None,
    max_images: int | None = None,
    steps: int = DEFAULT_STEPS,
    loss_size: int | None = None,
) -> dict[str, Any]:
    """Linear segmentation probe of frozen patch tokens at ``blocks``: mIoU and pixel accuracy.

    Args:
        model: a timm ``VisionTransformer`` or CNN (blocks = its stages, each probed on its own
            grid); moved to ``device`` in place, its train/eval mode restored afterwards.
        train_root, val_root: folders in the :class:`SegmentationFolder` layout.
        blocks: 1-based blocks (``-1`` = last) to probe; all from one forward pass per split.
        size: input side ``S`` (images stretched to ``S x S``); default the model's input size
            (a CNN has none: pass it). Must be a multiple of the patch size, or of a CNN's coarsest
            stride (another size than a ViT's resamples the position embeddings, see
            :func:`~stratavit.evaluation.tokens.model_at_size`).
        mean, std: input normalisation (the backbone's training values).
        num_classes: ``K``; default the largest id in the train and val masks (255 excluded) + 1.
        batch_size: images per forward pass. num_workers: DataLoader workers.
        epochs, lr, head_batch_size, weight_decay, seed: the head's training
            (:func:`~stratavit.evaluation.dense_head.train_dense_head`; defaults and timings: see
            the module docstring). ``epochs=None``: the fewest epochs that make ``steps``
            optimiser steps.
        cache_dir: folder for the disk-backed float16 token stores (``train/``, ``val/``), reused
            when they match the data, weights, size and blocks; ``None``: a temporary folder,
            deleted afterwards.
        device: where the backbone and the heads run.
        limit: use only the first ``limit`` pairs (sorted by stem) of each split.
        max_images: use a fixed random subset (seeded by ``seed``) of at most this many pairs of
            each split; ``None``: all.
        loss_size: side of the masks the heads' training loss is computed at; ``None``: ``S``
            capped at 4 pixels per token (:func:`~stratavit.evaluation.dense_head.loss_side`).

    Returns:
        ``{"miou", "pixel_acc"`` (percent, deepest requested block), ``"num_classes"``,
        ``"size"``, ``"resize_policy"``, ``"train_images"``, ``"val_images"`` (used),
        ``"train_total"``, ``"val_total"`` (in the folders), ``"train_fingerprint"``,
        ``"val_fingerprint"`` (of the pairs used), ``"blocks"``, ``"epochs"``, ``"steps"``, ``"lr"``,
        ``"loss_size"`` (the deepest block's), ``"layers": [{"block", "miou", "pixel_acc",
        "per_class_iou", "loss_size"}, ...]}``
        with one layer per block in increasing order; ``per_class_iou`` holds ``None`` for
        classes absent from both the val masks and the predictions.

    Raises:
        EvaluationError: any bad input (layout, unreadable files, size, blocks, class ids).
    """
    s = _input_size(model, size)
    try:
        net = model_at_size(model, s)
        numbers = resolve_blocks(net, blocks)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    if num_classes is not None and num_classes < 2:
        raise EvaluationError(f"num_classes must be at least 2, not {num_classes}")
    train_ds = SegmentationFolder(train_root, s, mean, std, limit=limit, max_images=max_images, seed=seed)
    val_ds = SegmentationFolder(val_root, s, mean, std, limit=limit, max_images=max_images, seed=seed)
    if epochs is None:
        epochs = auto_epochs(len(train_ds), head_batch_size, steps)
    num_classes, mask_dtype = class_count(train_ds, val_ds, num_classes, num_workers)
    dev = torch.device(device)
    net.to(dev)
    head = {"epochs": epochs, "lr": lr, "batch_size": head_batch_size, "weight_decay": weight_decay, "seed": seed,
            "loss_size": loss_size}
    tmp_ctx = tempfile.TemporaryDirectory(prefix="stratavit-dense-") if cache_dir is None else None
    root = Path(tmp_ctx.name) if tmp_ctx is not None else Path(cache_dir)  # type: ignore[arg-type]
    try:
        layers = _probe_blocks(net, train_ds, val_ds, numbers, num_classes, mask_dtype, root, head,
                               batch_size=batch_size, num_workers=num_workers, device=dev)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return {
        "miou": layers[-1]["miou"],
        "pixel_acc": layers[-1]["pixel_acc"],
        "num_classes": num_classes,
        "size": s,
        "resize_policy": train_ds.resize_policy,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "train_total": train_ds.total,
        "val_total": val_ds.total,
        "train_fingerprint": train_ds.identity(),
        "val_fingerprint": val_ds.identity(),
        "blocks": numbers,
        "epochs": epochs,
        "steps": epochs * math.ceil(len(train_ds) / head_batch_size),
        "lr": lr,
        "loss_size": layers[-1]["loss_size"],
        "layers": layers,
    }
