"""Dense retrieval as an evaluation: label validation patches by kNN over a memory of training patches.

The in-context scene understanding evaluation of Balažević et al. 2023 ("Towards In-context Scene
Understanding", NeurIPS; "Hummingbird"), without training anything: see
:mod:`stratavit.evaluation.retrieval_memory` for the method. It reads the dense probe's data
(``--dense-train`` / ``--dense-val``, ``dense.size``, ``dense.max_images``) and runs whenever that is
given; ``retrieval.enabled=false`` turns it off. With its blocks among the dense probe's (the
default) it reads the dense probe's token stores, so it costs no forward pass, only the kNN.

Options ``retrieval.*``:

* ``k`` (30) and ``temperature`` (0.02): the paper's k, and open-hummingbird-eval's softmax
  temperature over the neighbours' cosine similarities (the paper does not state T);
* ``memory_sizes`` ([10000, 100000]): memory sizes in patches, each capped at the labelled patches
  the training split has (the results record the real count). The memories are nested prefixes of
  one seeded random order of all labelled training patches (uniform, no class balancing, one
  view of each image: the paper's augmented passes over the training set multiply the extraction
  cost and are left out);
* ``blocks`` (default: the dense probe's).

``results.json``: ``retrieval`` (``miou`` / ``pixel_acc``: the last block at the largest memory;
``layers``: per block, the scores of every memory size under ``memories``), and the same under
``baselines.random_init``.

Cost: one ``(Q, C) x (C, M)`` similarity matmul per block (``Q`` validation patches, ``M`` the
largest memory), a top-k per memory size, and the scoring at the masks' resolution. Measured on 2
shared CPU cores (demo backbone: 128 wide, patch 4, horses sample at 64 px: Q = 32,768): about
2 s per block and model with a memory of 2,500 patches, 3.5-4.5 s with memories [1000, 5000], and
~15-40 s (load-dependent) with the default memories, capped at the 51,200 patches the split has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stratavit.config import Config
from stratavit.data.datasets import segmentation_root
from stratavit.evaluation.comparability import retrieval_basis
from stratavit.evaluation.dense import class_count, token_stores
from stratavit.evaluation.dense_head import segmentation_scores
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations.dense import default_dense_blocks
from stratavit.evaluation.options import Options
from stratavit.evaluation.protocol import (
    Column,
    ComparePlot,
    Context,
    Evaluation,
    Figure,
    HeadlineColumn,
    Panel,
    Result,
    cache_name,
)
from stratavit.evaluation.resolution import sized
from stratavit.evaluation.retrieval_memory import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    build_memory,
    patch_label_distributions,
    retrieval_confusions,
)
from stratavit.evaluation.segmentation_data import SegmentationFolder
from stratavit.evaluation.tables import dig, fmt, md_table, number
from stratavit.evaluation.tokens import model_at_size, resolve_blocks
from stratavit.evaluation.visuals import plot_segmentations, unnormalise

__all__ = ["Retrieval", "RetrievalBlock", "RetrievalMemory", "RetrievalOptions", "RetrievalPlan", "RetrievalResult"]

FIGURE_IMAGES = 4


@dataclass
class RetrievalOptions:
    """``retrieval.*``: on/off, neighbours, softmax temperature, memory sizes (patches), blocks
    (1-based, -1 = last; default the dense probe's). Data, size and image cap: the dense probe's."""

    enabled: bool = True
    k: int = field(default=DEFAULT_K, metadata={"min": 1})
    temperature: float = DEFAULT_TEMPERATURE
    memory_sizes: list[int] = field(default_factory=lambda: [10000, 100000], metadata={"min": 1})
    blocks: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EvaluationError(f"retrieval.temperature={self.temperature} must be > 0 (the paper's 0.02 is the default)")
        if not self.memory_sizes:
            raise EvaluationError("retrieval.memory_sizes is empty: give at least one size in patches, e.g. [10000]")
        if all(isinstance(m, int) and m >= 1 for m in self.memory_sizes) and self.k > min(self.memory_sizes):
            raise EvaluationError(
                f"retrieval.k={self.k} is larger than the smallest memory (retrieval.memory_sizes={self.memory_sizes}); "
                "lower retrieval.k or raise the sizes"
            )


@dataclass
class RetrievalPlan:
    """What the pre-flight check resolved: folders, 1-based blocks, input size, and whether the dense
    probe's token stores hold those blocks (then they are shared)."""

    train_root: Path
    val_root: Path
    blocks: list[int]
    size: int
    shares_dense_tokens: bool


@dataclass
class RetrievalMemory:
    """Scores (%) of one block with one memory: the size asked for and the patches it really held."""

    memory_size: int
    patches: int
    miou: float
    pixel_acc: float
    per_class_iou: list[float | None]


@dataclass
class RetrievalBlock:
    """One block: the largest memory's scores, the labelled training patches available, every memory's scores."""

    block: int
    miou: float
    pixel_acc: float
    available_patches: int
    memories: list[RetrievalMemory]


@dataclass
class RetrievalResult(Result):
    """Dense retrieval: the last block's scores at the largest memory, the settings, one row per block."""

    miou: float
    pixel_acc: float
    memory_patches: int
    num_classes: int
    size: int
    resize_policy: str
    train: str
    val: str
    train_images: int
    val_images: int
    train_total: int
    val_total: int
    train_fingerprint: str
    val_fingerprint: str
    max_images: int | None
    query_patches: int
    blocks: list[int]
    k: int
    temperature: float
    memory_sizes: list[int]
    seed: int
    layers: list[RetrievalBlock]
    example: dict[str, Any] = field(default_factory=dict, repr=False)  # the picture's rows, not in JSON

    def entries(self) -> dict[str, Any]:
        data = asdict(self)
        del data["example"]
        return {"retrieval": data}


def _dense_blocks(model: nn.Module, options: Options) -> list[int]:
    try:
        return resolve_blocks(model, default_dense_blocks(model, options.dense.blocks))
    except ValueError as e:
        raise EvaluationError(str(e)) from None


class Retrieval(Evaluation):
    """kNN retrieval of patch labels from a memory of training patches, per block (mIoU)."""

    name = "retrieval"
    sections = {"retrieval": RetrievalOptions}
    panels = (Panel("dense retrieval mIoU", "mIoU (%)", (("kNN retrieval", "retrieval", "miou"),), 45),)
    compare_plots = (
        ComparePlot("retrieval", "compare_retrieval_miou.png", "Dense retrieval mIoU per block",
                    "dense retrieval mIoU per transformer block", "mIoU (%)",
                    (("", ("retrieval", "layers"), "miou"),), 45, column="retrieval_miou"),
    )

    def enabled(self, options: Options) -> bool:
        return options.dense.train is not None and options.retrieval.enabled

    def check(self, model: nn.Module, size: int, cfg: Config, options: Options) -> RetrievalPlan:
        """Folders, size and blocks (the dense probe checks the folders' layout too)."""
        o, r = options.dense, options.retrieval
        d_size = o.size or size
        roots = (segmentation_root(str(o.train)), segmentation_root(str(o.val)))
        for root in roots:
            SegmentationFolder(root, d_size, cfg.views.mean, cfg.views.std)
        at_size = sized(model, d_size, "--dense-size" if o.size else "--img-size")
        dense_blocks = _dense_blocks(at_size, options)
        if r.blocks:
            try:
                blocks = resolve_blocks(at_size, r.blocks)
            except ValueError as e:
                raise EvaluationError(f"retrieval.blocks: {e}") from None
        else:
            blocks = dense_blocks
        return RetrievalPlan(roots[0], roots[1], blocks, d_size, set(blocks) <= set(dense_blocks))

    def _data(self, ctx: Context, plan: RetrievalPlan) -> tuple[SegmentationFolder, SegmentationFolder, int, Any]:
        """Both splits (as the dense probe reads them) and the class count, read once for every model."""
        key = ("retrieval data", plan.size)
        if key not in ctx.shared:
            o = ctx.options
            train_ds, val_ds = (
                SegmentationFolder(root, plan.size, ctx.cfg.views.mean, ctx.cfg.views.std,
                                   max_images=o.dense.max_images, seed=o.seed)
                for root in (plan.train_root, plan.val_root)
            )
            ctx.shared[key] = (train_ds, val_ds, *class_count(train_ds, val_ds, None, o.num_workers))
        return ctx.shared[key]

    def run(self, model: nn.Module, ctx: Context, plan: RetrievalPlan) -> RetrievalResult:
        o, r = ctx.options, ctx.options.retrieval
        train_ds, val_ds, num_classes, mask_dtype = self._data(ctx, plan)
        prefix = "dense" if plan.shares_dense_tokens else "retrieval"  # the dense probe's stores, when they fit
        root = ctx.out.cache / cache_name(prefix, ctx.model_tag, o.dense.train, o.dense.val, plan.size)
        net = model_at_size(model, plan.size)
        with ctx.timed("retrieval"):
            train_store, val_store = token_stores(
                net, train_ds, val_ds, plan.blocks, mask_dtype, root, batch_size=min(o.batch_size, 64),
                num_workers=o.num_workers, device=torch.device("cpu"),
            )
            assert train_store.masks is not None
            labels_by_grid: dict[tuple[int, int], torch.Tensor] = {}
            rows: list[RetrievalBlock] = []
            kept: list[torch.Tensor] = []
            for b in plan.blocks:
                feats = train_store.block(b)
                grid = (int(feats.shape[1]), int(feats.shape[2]))
                if grid not in labels_by_grid:
                    labels_by_grid[grid] = patch_label_distributions(train_store.masks, grid, num_classes)
                memory = build_memory(feats, labels_by_grid[grid], max(r.memory_sizes), o.seed)
                if len(memory) < r.k:
                    ctx.warn(f"dense retrieval: block {b} has only {len(memory)} labelled training patches, "
                             f"fewer than retrieval.k={r.k}; every patch is a neighbour")
                used = sorted({min(m, len(memory)) for m in r.memory_sizes})
                confs, kept_b = retrieval_confusions(
                    val_store.block(b), val_ds.original_masks(), memory, used, num_classes, k=r.k,
                    temperature=r.temperature, keep=FIGURE_IMAGES if b == plan.blocks[-1] else 0,
                    desc=f"{ctx.model_label} retrieval (block {b})",
                )
                scores = {m: segmentation_scores(c) for m, c in zip(used, confs)}
                memories = [
                    RetrievalMemory(m, min(m, len(memory)), scores[min(m, len(memory))]["miou"],
                                    scores[min(m, len(memory))]["pixel_acc"],
                                    scores[min(m, len(memory))]["per_class_iou"])
                    for m in r.memory_sizes
                ]
                top = scores[used[-1]]
                rows.append(RetrievalBlock(b, top["miou"], top["pixel_acc"], memory.available, memories))
                kept = kept_b or kept
        last = val_store.block(plan.blocks[-1])
        return RetrievalResult(
            miou=rows[-1].miou, pixel_acc=rows[-1].pixel_acc,
            memory_patches=max(m.patches for m in rows[-1].memories), num_classes=num_classes, size=plan.size,
            resize_policy=train_ds.resize_policy, train=str(o.dense.train), val=str(o.dense.val),
            train_images=len(train_ds), val_images=len(val_ds), train_total=train_ds.total, val_total=val_ds.total,
            train_fingerprint=train_ds.identity(), val_fingerprint=val_ds.identity(), max_images=o.dense.max_images,
            query_patches=int(last.shape[0] * last.shape[1] * last.shape[2]), blocks=list(plan.blocks), k=r.k,
            temperature=r.temperature, memory_sizes=list(r.memory_sizes), seed=o.seed, layers=rows,
            example={"preds": kept, "val": val_ds, "block": plan.blocks[-1]},
        )

    def figures(self, model: nn.Module, ctx: Context, result: Result, out_dir: Path) -> list[Figure]:
        assert isinstance(result, RetrievalResult)
        ex = result.example
        preds = ex.get("preds") or []
        if not preds:
            return []
        val: SegmentationFolder = ex["val"]
        mean, std = ctx.cfg.views.mean, ctx.cfg.views.std
        images = [unnormalise(val[i][0], mean, std) for i in range(len(preds))]
        truths = [val.original_mask(i) for i in range(len(preds))]
        patches = result.memory_patches
        png = plot_segmentations(images, truths, preds, result.num_classes, out_dir / "retrieval.png",
                                 title=f"block {ex['block']}, memory of {patches} patches, k={result.k}")
        caption = (f"Dense retrieval (no training): validation images, their true masks and the masks retrieved "
                   f"from a memory of {patches} training patches (block {ex['block']}, k={result.k})")
        return [Figure(caption, png, 45)]

    def headline(self) -> list[HeadlineColumn]:
        return [HeadlineColumn("retrieval mIoU (%)", lambda r: dig(r, "retrieval", "miou"),
                               lambda b: dig(b, "retrieval", "miou"))]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        rows = dig(results, "retrieval", "layers")
        if not rows:
            return None
        rr = results["retrieval"]
        sizes = list(rr.get("memory_sizes") or [])
        base = {int(row["block"]): row for row in dig(results, "baselines", "random_init", "retrieval", "layers") or []}

        def patches(row: Mapping[str, Any], m: int) -> Any:
            return next((x for x in row.get("memories") or [] if x.get("memory_size") == m), {})

        first = rows[-1]
        header = ["block", *(f"mIoU (%), memory {patches(first, m).get('patches', m)}" for m in sizes)]
        if base:
            header.append("random init mIoU (%), largest memory")
        table = []
        for row in rows:
            cells = [row["block"], *(patches(row, m).get("miou") for m in sizes)]
            if base:
                cells.append(base.get(int(row["block"]), {}).get("miou"))
            table.append(cells)
        used = self.settings_line(results)
        intro = (
            "## Dense retrieval\n\nNo head is trained: each validation patch takes the label distributions of its "
            f"k={fmt(rr.get('k'))} most similar training patches (cosine, weights softmax(sim / "
            f"{fmt(rr.get('temperature'))})), upsampled bilinearly to the mask and arg-maxed (Balažević et al. "
            f"2023, \"Hummingbird\"); {fmt(rr.get('num_classes'))} classes, mIoU at the masks' own resolution. "
            "A memory size larger than the training split's labelled patches is capped at them (the header "
            "gives the patches used)." + (f" Used: {used.removeprefix('dense retrieval: ')}." if used else "")
        )
        return intro + "\n\n" + md_table(header, table)

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        return {"retrieval_miou": results["retrieval"]["miou"]} if "retrieval" in results else {}

    def settings_line(self, results: Mapping[str, Any]) -> str | None:
        r = results.get("retrieval")
        if not isinstance(r, Mapping):
            return None
        blocks = ", ".join(str(b) for b in r.get("blocks") or [])
        return (f"dense retrieval: memory of {r.get('memory_patches')} patches (sizes {r.get('memory_sizes')}) "
                f"from {r.get('train_images')} train images, {r.get('query_patches')} patches of "
                f"{r.get('val_images')} val images at {r.get('size')} px, k={r.get('k')}, "
                f"T={r.get('temperature')}, blocks {blocks}")

    def columns(self) -> list[Column]:
        return [
            Column("retrieval_miou", lambda r: number(dig(r, "retrieval", "miou")), header="retrieval mIoU (%)",
                   best=("dense retrieval mIoU", True), bar="retrieval mIoU (%)", basis=retrieval_basis),
        ]
