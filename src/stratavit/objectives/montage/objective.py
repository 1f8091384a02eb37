"""``montage``: MCL (Guo et al. 2023) — every tile of a montage is contrasted with its source image.

For each of the two global views ``v`` (symmetric) and montage level ``i = 0 .. L−1``:

- level 0 is view ``v`` itself, (B, 3, S, S); level ``i ≥ 1`` tiles fresh crops of the batch (the
  recipe's local views, ``views.local_crops = 2 (L − 1)`` at ``views.local_size ==
  views.global_size``) downscaled by ``r = 2^i``, every image ``c_i = tile_copies[i]`` times, into
  ``c_i · B / r²`` canvases (c_i·B/r², 3, S, S) (:func:`stratavit.objectives.montage.layout.make_montage`). The
  authors' ``c = [1, 1, 1, 2]`` gives ``B, B/4, B/16, B/32`` canvases: the batch must be a multiple
  of 32 (:func:`stratavit.objectives.montage.layout.batch_multiple`);
- a tile's **region embedding** (c_i · B, D) comes from the student's map of the canvases through
  the readout (below) and the level's own predictor;
- targets: the teacher's whole-image embeddings (B, D) of the *other* global view (level-0 readout,
  teacher readout), gathered across processes: (world · B, D);
- ``L_i = 2T · CE(normalize(pred_i) · normalize(targets)ᵀ / T, source index of the tile)``,
  ``T = 1``; loss = Σ_v Σ_i w_i L_i with ``w = [1/2, 1/4, 1/8, 1/8]`` (the MoCo v3 convention of
  this code base: the two directions are summed).

Readout (``readout``):

- ``roi_align`` (default, the authors'): MCL's own readout
  (:mod:`stratavit.objectives.montage.readout`): level ``i`` is read from pyramid level
  ``P_{top−i}`` with RoI-align, then a conv neck (4 × conv3x3-BN-ReLU, average pool, MLP). On a
  CNN + FPN backbone (recipe ``mcl-resnet``) the pyramid is the backbone's; on a ViT it is a simple
  (ViTDet) pyramid of the objective's level with strides ``p/4, p/2, p, 2p`` (4 levels). Either
  way, at 224 px (patch 16 / coarsest stride 32) every tile is an exact 7 × 7 window: level ``i``
  reads stride ``32 / 2^i`` (32, 16, 8, 4) where its ``224 / 2^i``-px tiles span 7 cells. Whole
  images (level 0 and the teacher's targets) are read with the box of the whole view. The image
  size must be a multiple of ``lcm(2^(L−1), patch)``.
- ``pool``: the mean patch token inside the tile (:func:`stratavit.objectives.montage.layout.tile_tokens`), through
  the neck MLP; tiles must cover whole patches, so the image size must be a multiple of
  ``2^(L−1) · patch`` (128 at patch 16: not 224).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone, level_map
from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.views import MultiViewBatch
from stratavit.distributed import gather_concat, rank
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    StudentViews,
    ViewFeatures,
)
from stratavit.objectives.heads import ContrastiveHeadConfig, moco_mlp
from stratavit.objectives.montage.layout import (
    Montage,
    make_montage,
    montage_problems,
    raise_problems,
    tile_tokens,
)
from stratavit.objectives.montage.readout import (
    ConvRegionNeck,
    RegionReadout,
    SimplePyramid,
)


@dataclass
class MontageConfig(ContrastiveHeadConfig):
    temperature: float = 1.0
    montage_levels: int = 4
    """Montage levels L (level i tiles r = 2^i images per side; 1, 4, 16, 64 tiles per canvas)."""
    level_weights: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125, 0.125])
    """w_i of every montage level (the paper's 1/2, 1/4, 1/8, 1/8)."""
    pred_last_bn: bool | None = None
    """Whether each level's predictor ends with BatchNorm; ``None`` = MCL's choice: no."""
    tile_copies: list[int] = field(default_factory=lambda: [1, 1, 1, 2])
    """How many times every image of the batch appears at each montage level (one value per level,
    level 0 is the view itself: 1). Level i has ``tile_copies[i] · B / 4^i`` canvases; the authors'
    ``[1, 1, 1, 2]`` gives B, B/4, B/16, B/32 canvases (batch a multiple of 32); ``[1, 1, 1, 1]``
    gives B/64 canvases at level 3 (batch a multiple of 64)."""
    readout: Literal["pool", "roi_align"] = "roi_align"
    """``roi_align`` (the authors'): RoI-align on a feature pyramid (the ViT's simple pyramid or the
    CNN's FPN) + conv neck; ``pool``: mean patch token of a tile + MLP neck (tiles must cover whole
    patches: image size a multiple of ``2^(L−1) · patch``)."""
    roi_size: int | None = None
    """``roi_align``: RoI output side; ``None`` = exact windows (the coarsest level's map side of a view)."""
    neck_convs: int = 4
    """``roi_align``: conv3x3-BN-ReLU layers of the neck before pooling (the paper's 4)."""
    pyramid_dim: int = 256
    """``roi_align`` on a ViT: channels of the simple feature pyramid built from the level."""


def region_contrast(pred: Tensor, targets: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """``2T · CE(normalize(pred) · normalize(targets)ᵀ / T, labels)``.

    Args:
        pred: (M, D) region predictions; targets: (N_all, D) image embeddings (no gradient);
        labels: (M,) index of each region's source image in ``targets``.
    """
    logits = F.normalize(pred.float(), dim=1) @ F.normalize(targets.float(), dim=1).t() / temperature
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MontageObjective(Objective):
    name = "montage"
    config_class = MontageConfig

    def __init__(self, cfg: MontageConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        problems = []
        if cfg.montage_levels < 1:
            problems.append(f"objectives.montage.montage_levels must be >= 1, got {cfg.montage_levels}")
        elif len(cfg.level_weights) != cfg.montage_levels:
            problems.append(
                f"objectives.montage.level_weights: give one level weight per montage level "
                f"({cfg.montage_levels}), not {len(cfg.level_weights)}"
            )
        if cfg.montage_levels >= 1 and len(cfg.tile_copies) != cfg.montage_levels:
            problems.append(
                f"objectives.montage.tile_copies: give one value per montage level ({cfg.montage_levels}), "
                f"not {len(cfg.tile_copies)} (e.g. {[1] * cfg.montage_levels})"
            )
        if any(c < 1 for c in cfg.tile_copies):
            problems.append(f"objectives.montage.tile_copies must all be >= 1, got {cfg.tile_copies}")
        elif cfg.tile_copies and cfg.tile_copies[0] != 1:
            problems.append(
                f"objectives.montage.tile_copies[0] must be 1 (level 0 is the view itself), got {cfg.tile_copies[0]}"
            )
        raise_problems(problems)
        self.cfg: MontageConfig = cfg
        self.on_pyramid = backbone.is_pyramid
        if self.on_pyramid and cfg.readout != "roi_align":
            raise ConfigError("objectives.montage on a CNN feature pyramid reads regions with readout=roi_align")
        self.readout: RegionReadout | None = None
        self.patch = backbone.patch_size  # a ViT's patch, a CNN pyramid's coarsest stride
        if cfg.readout == "pool":
            self.require_one_level("its patch tokens")
            self.neck = moco_mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        else:
            if self.on_pyramid:
                if len(self.levels) < cfg.montage_levels:
                    raise ConfigError(
                        f"objectives.montage reads montage level i from the i-th coarsest pyramid level: give "
                        f"{cfg.montage_levels} pyramid levels in 'levels' (e.g. [1, 2, 3, 4]), not {cfg.levels}"
                    )
                strides, pyramid, dim = [backbone.strides[lv - 1] for lv in self.levels], None, backbone.embed_dim
            else:
                self.require_one_level("the map its feature pyramid is built from")
                try:
                    pyramid = SimplePyramid(backbone.embed_dim, cfg.pyramid_dim, backbone.patch_size, cfg.montage_levels)
                except ValueError as e:
                    raise ConfigError(f"objectives.montage readout=roi_align: {e}; use readout=pool") from None
                strides, dim = pyramid.strides, cfg.pyramid_dim
            neck = ConvRegionNeck(dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.neck_convs, cfg.proj_layers)
            self.readout = RegionReadout(pyramid, strides, neck, cfg.roi_size)
        self.predictors = nn.ModuleList(
            moco_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, cfg.pred_layers, last_bn=bool(cfg.pred_last_bn))
            for _ in range(cfg.montage_levels)
        )

    def teacher_head(self) -> nn.Module:
        return self.readout if self.readout is not None else self.neck

    def setup_problems(self, views: ViewsConfig, batch_size: int) -> list[str]:
        """Every reason why these views and this per-process batch cannot feed the montages."""
        levels = self.cfg.montage_levels
        need = 2 * (levels - 1)
        problems = []
        if views.global_crops != 2:
            problems.append(f"views.global_crops={views.global_crops}: montages need views.global_crops=2 (two sides)")
        if views.local_crops < need:
            problems.append(
                f"views.local_crops={views.local_crops}: {levels} montage levels need views.local_crops={need} "
                f"fresh crops (one per level >= 1 and side)"
            )
        if need and views.local_size != views.global_size:
            problems.append(
                f"views.local_size={views.local_size}: the fresh crops are montage canvases of the view size: "
                f"set views.local_size equal to views.global_size={views.global_size}"
            )
        problems += montage_problems(
            batch_size, views.global_size, self.patch, self.cfg.tile_copies, self.cfg.readout
        )
        return problems

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        """One :class:`ConfigError` listing every problem of the views and batch, each with its fix."""
        raise_problems(self.setup_problems(views, batch_size))

    def student_views(self, batch: MultiViewBatch, state: StepState) -> dict[str, StudentViews]:
        """The canvases of every side and montage level >= 1, in one batch; its layout is the list of
        ``(side, level, montage)`` in the order of the canvases (read back in :meth:`forward`)."""
        levels = self.cfg.montage_levels
        if levels == 1:
            return {}
        size = batch.local_views[0].images.shape[-1]
        # the loader drops partial batches; a batch built by hand is checked here
        raise_problems(
            montage_problems(batch.batch_size, size, self.patch, self.cfg.tile_copies, self.cfg.readout),
            what=f"objectives.montage (a batch of {batch.batch_size} images of {size} px)",
        )
        gen = torch.Generator().manual_seed(state.step * 7919 + rank())
        canvases, layout = [], []
        for side in range(2):
            for level in range(1, levels):
                crops = batch.local_views[side * (levels - 1) + level - 1].images
                m = make_montage(crops, level, gen, copies=self.cfg.tile_copies[level])
                layout.append((side, level, m))
                canvases.append(m.canvases)
        return {"montage": StudentViews(torch.cat(canvases), layout)}

    def _maps(self, feats: dict, rows: slice | None = None) -> Tensor | list[Tensor]:
        """What the region readout reads: the ViT level's map, or every pyramid level (finest first)."""
        rows = rows if rows is not None else slice(None)
        if self.on_pyramid:
            return [level_map(feats[lv])[rows] for lv in self.levels]
        return level_map(feats[self.levels[0]])[rows]

    def _whole(self, feats: dict, head: nn.Module, size: int) -> Tensor:
        """(B, D) embeddings of whole views through ``head`` (the neck or the region readout)."""
        if self.readout is None:
            return head(feats[self.levels[0]].patches.mean(dim=1))
        maps = self._maps(feats)
        n = (maps[0] if isinstance(maps, list) else maps).shape[0]
        box = torch.tensor([0.0, 0.0, size, size]).expand(n, 1, 4)
        return head(maps, 0, box, size, tiles=1)

    def _tiles(self, feats: dict, rows: slice, m: Montage, level: int) -> Tensor:
        """(n · r², D) neck embeddings of the tiles of the canvases ``rows`` of the montage views."""
        if self.readout is None:
            lf = feats[self.levels[0]]
            n = rows.stop - rows.start
            return self.neck(tile_tokens(lf.patches[rows], lf.grid, m.ratio).reshape(n * m.ratio**2, -1))
        maps = self._maps(feats, rows)
        n = (maps[0] if isinstance(maps, list) else maps).shape[0]
        return self.readout(maps, level, m.boxes.expand(n, *m.boxes.shape), int(m.canvases.shape[-1]), tiles=m.ratio)

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        b = student.batch.batch_size
        size = student.batch.global_views[0].images.shape[-1]
        with torch.no_grad():
            t_emb = self._whole(teacher.global_, teacher_head, size).float().chunk(2)
        targets = [gather_concat(t_emb[1]), gather_concat(t_emb[0])]  # side v contrasts with view 1 − v
        own = torch.arange(b, device=t_emb[0].device) + rank() * b
        s_emb = self._whole(student.global_, self.teacher_head(), size).chunk(2)  # the student side
        terms: list[Tensor | float] = [0.0] * self.cfg.montage_levels
        for side in range(2):
            pred = self.predictors[0](s_emb[side])
            terms[0] = terms[0] + region_contrast(pred, targets[side], own, self.cfg.temperature)
        layout: list[tuple[int, int, Montage]] = student.layouts.get("montage", [])
        if layout:
            feats = student.extra["montage"]
            offset = 0
            for side, level, m in layout:
                n = m.canvases.shape[0]
                pred = self.predictors[level](self._tiles(feats, slice(offset, offset + n), m, level))
                offset += n
                labels = m.sources.reshape(-1).to(pred.device) + rank() * b
                terms[level] = terms[level] + region_contrast(pred, targets[side], labels, self.cfg.temperature)
        loss = sum(w * t for w, t in zip(self.cfg.level_weights, terms))
        metrics: dict[str, Tensor | float] = {
            f"montage/level{i}": t.detach() if isinstance(t, Tensor) else t for i, t in enumerate(terms)
        }
        return ObjectiveOutput(loss, metrics)  # type: ignore[arg-type]
