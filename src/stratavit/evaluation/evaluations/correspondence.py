"""The correspondence score as an evaluation: does a patch find the same place in another crop?

Options ``correspondence.images`` (CLI ``--correspondence N``; 0 turns it off): held-out test images,
two random crops each (see :mod:`stratavit.evaluation.correspondence`). ``results.json``:
``correspondence``, and the same under ``baselines.random_init``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from stratavit.data.datasets import build_dataset
from stratavit.evaluation.comparability import correspondence_basis
from stratavit.evaluation.correspondence import correspondence_score
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
)
from stratavit.evaluation.tables import block_section, dig, fmt, number
from stratavit.evaluation.tokens import figure_block, is_cnn
from stratavit.evaluation.visuals import plot_matches, unnormalise

__all__ = ["Correspondence", "CorrespondenceBlock", "CorrespondenceOptions", "CorrespondenceResult"]


@dataclass
class CorrespondenceOptions:
    """``correspondence.*``: how many held-out test images (0: skip the score)."""

    images: int = field(default=200, metadata={"min": 0})


@dataclass
class CorrespondenceBlock:
    """One block's score (%): within one patch of the truth, the very patch, a random guess."""

    block: int
    top1: float
    exact: float
    chance: float


@dataclass
class CorrespondenceResult(Result):
    """The last block's top-1 (%), one :class:`CorrespondenceBlock` per block, and the settings."""

    top1: float
    layers: list[CorrespondenceBlock]
    pairs: int
    queries_per_pair: float
    size: int
    example: dict[str, Any] = field(default_factory=dict, repr=False)  # the picture's pair, not in JSON

    def entries(self) -> dict[str, Any]:
        data = asdict(self)
        del data["example"]
        return {"correspondence": data}


class Correspondence(Evaluation):
    """Nearest-patch matching between two crops of held-out images, per block."""

    name = "correspondence"
    sections = {"correspondence": CorrespondenceOptions}
    panels = (Panel("correspondence top-1", "top-1 (%)", (("patch NN", "correspondence", "top1"),), 30),)
    compare_plots = (
        ComparePlot("correspondence", "compare_correspondence.png", "Correspondence top-1 per block",
                    "correspondence top-1 per transformer block", "correspondence top-1 (%)",
                    (("", ("correspondence", "layers"), "top1"),), 30, column="correspondence_top1"),
    )

    def enabled(self, options: Options) -> bool:
        return options.correspondence.images > 0

    def run(self, model: nn.Module, ctx: Context, plan: Any) -> CorrespondenceResult:
        o = ctx.options
        with ctx.timed("correspondence"):
            if "correspondence images" not in ctx.shared:  # read once, shared by every model
                ds = build_dataset(ctx.test, split="test", transform=None, limit=o.correspondence.images, seed=o.seed)
                ctx.shared["correspondence images"] = [ds[i][0] for i in range(len(ds))]  # type: ignore[arg-type]
            res = correspondence_score(
                model, ctx.shared["correspondence images"], size=ctx.size, mean=ctx.cfg.views.mean,
                std=ctx.cfg.views.std, seed=o.seed, batch_size=min(o.batch_size, 128),
                example_block=figure_block(model, ctx.size),
            )
        layers = [CorrespondenceBlock(**row) for row in res.pop("layers")]
        return CorrespondenceResult(layers=layers, **res)

    def figures(self, model: nn.Module, ctx: Context, result: Result, out_dir: Path) -> list[Figure]:
        assert isinstance(result, CorrespondenceResult)
        ex, mean, std = result.example, ctx.cfg.views.mean, ctx.cfg.views.std
        if not ex:
            return []
        caption = (
            f"Nearest-cell matches between two crops at stage {ex.get('block')} (green: within one cell of the "
            "truth)" if is_cnn(model) else "Nearest-patch matches between two crops (green: within one patch of the truth)"
        )
        png = plot_matches(unnormalise(ex["view_a"], mean, std), unnormalise(ex["view_b"], mean, std),
                           ex["points_a"], ex["points_b"], ex["correct"], out_dir / "matches.png")
        return [Figure(caption, png, 40)]

    def headline(self) -> list[HeadlineColumn]:
        return [HeadlineColumn("correspondence (%)", lambda r: dig(r, "correspondence", "top1"),
                               lambda b: dig(b, "correspondence", "top1"))]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        return block_section(
            results, "correspondence", [("top1", "top-1 (%)"), ("exact", "exact (%)"), ("chance", "chance (%)")],
            "## Correspondence\n\nTwo random crops of each of "
            f"{fmt(dig(results, 'correspondence', 'pairs'))} held-out images: is the nearest patch (cosine) "
            "of the other view within one patch of the true location? *exact*: the very patch; *chance*: a "
            "random guess.",
        )

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        return {"correspondence_top1": results["correspondence"]["top1"]} if "correspondence" in results else {}

    def columns(self) -> list[Column]:
        return [
            Column("correspondence_top1", lambda r: number(dig(r, "correspondence", "top1")),
                   header="correspondence top-1 (%)", best=("correspondence top-1", True),
                   bar="correspondence top-1 (%)", basis=correspondence_basis),
        ]
