"""``montage``: MCL (Guo et al. 2023) — every tile of a montage is contrasted with its source image.

For each of the two global views ``v`` (symmetric) and montage level ``i = 0 .. L−1``:

- level 0 is view ``v`` itself; level ``i ≥ 1`` tiles fresh crops of the batch (the recipe's
  local views, ``views.local_crops = 2 (L − 1)`` at ``views.local_size == views.global_size``)
  downscaled by ``r = 2^i`` into ``B / r²`` canvases (:func:`stratavit.montage.make_montage`);
- a tile's **region embedding** is the mean of the student's patch tokens inside it
  (:func:`stratavit.montage.tile_tokens`, tiles cover whole patches), through the shared neck
  (MoCo v3 projector) and the level's own predictor;
- targets: the teacher's whole-image embeddings (mean patch token, teacher neck) of the *other*
  global view, gathered across processes;
- ``L_i = 2T · CE(normalize(pred_i) · normalize(targets)ᵀ / T, source index of the tile)``,
  ``T = 1``; loss = Σ_v Σ_i w_i L_i with ``w = [1/2, 1/4, 1/8, 1/8]`` (the MoCo v3 convention of
  this code base: the two directions are summed).

The paper's ResNet-50 + FPN readout (7×7 windows of P5..P2) is not part of this objective yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbone import Backbone
from stratavit.config import ConfigError, ViewsConfig
from stratavit.distributed import gather_concat, rank
from stratavit.montage import Montage, check_montage_geometry, make_montage, tile_tokens
from stratavit.objectives.base import Objective, ObjectiveOutput, StepState, ViewFeatures
from stratavit.objectives.heads import ContrastiveHeadConfig, moco_mlp
from stratavit.views import MultiViewBatch


@dataclass
class MontageConfig(ContrastiveHeadConfig):
    temperature: float = 1.0
    montage_levels: int = 4
    """Montage levels L (level i tiles r = 2^i images per side; 1, 4, 16, 64 tiles per canvas)."""
    level_weights: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125, 0.125])
    """w_i of every montage level (the paper's 1/2, 1/4, 1/8, 1/8)."""


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

    def __init__(self, cfg: MontageConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.require_one_level("its patch tokens")
        if cfg.montage_levels < 1 or len(cfg.level_weights) != cfg.montage_levels:
            raise ConfigError(
                f"objectives.montage: give one level weight per montage level ({cfg.montage_levels}), "
                f"not {len(cfg.level_weights)}"
            )
        self.cfg: MontageConfig = cfg
        self.patch_size = backbone.patch_size
        self.neck = moco_mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.predictors = nn.ModuleList(
            moco_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, cfg.pred_layers) for _ in range(cfg.montage_levels)
        )
        # (side, level, montage) of the current step: made in student_views(), read in forward()
        self._pending: list[tuple[int, int, Montage]] = []

    def teacher_head(self) -> nn.Module:
        return self.neck

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        levels = self.cfg.montage_levels
        need = 2 * (levels - 1)
        if views.global_crops != 2 or views.local_crops < need:
            raise ConfigError(
                f"objectives.montage with {levels} montage levels needs views.global_crops=2 and "
                f"views.local_crops={need} fresh crops (one per level and side), got "
                f"{views.global_crops} and {views.local_crops}"
            )
        if need and views.local_size != views.global_size:
            raise ConfigError("objectives.montage: set views.local_size equal to views.global_size (montage canvases)")
        check_montage_geometry(batch_size, views.global_size, self.patch_size, levels)

    def student_views(self, batch: MultiViewBatch, state: StepState) -> dict[str, Tensor]:
        levels = self.cfg.montage_levels
        self._pending = []
        if levels == 1:
            return {}
        check_montage_geometry(batch.batch_size, batch.local_views[0].images.shape[-1], self.patch_size, levels)
        gen = torch.Generator().manual_seed(state.step * 7919 + rank())
        canvases = []
        for side in range(2):
            for level in range(1, levels):
                crops = batch.local_views[side * (levels - 1) + level - 1].images
                m = make_montage(crops, level, gen)
                self._pending.append((side, level, m))
                canvases.append(m.canvases)
        return {"montage": torch.cat(canvases)}

    def _embed(self, patches: Tensor, neck: nn.Module) -> Tensor:
        return neck(patches.mean(dim=1))

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        lv = self.levels[0]
        b = student.batch.batch_size
        with torch.no_grad():
            t_emb = self._embed(teacher.global_[lv].patches, teacher_head).float().chunk(2)
        targets = [gather_concat(t_emb[1]), gather_concat(t_emb[0])]  # side v contrasts with view 1 − v
        own = torch.arange(b, device=t_emb[0].device) + rank() * b
        s_global = student.global_[lv].patches.chunk(2)
        terms: list[Tensor | float] = [0.0] * self.cfg.montage_levels
        for side in range(2):
            pred = self.predictors[0](self._embed(s_global[side], self.neck))
            terms[0] = terms[0] + region_contrast(pred, targets[side], own, self.cfg.temperature)
        if self._pending:
            feats = student.extra["montage"][lv]
            offset = 0
            for side, level, m in self._pending:
                n = m.canvases.shape[0]
                patches = feats.patches[offset : offset + n]
                offset += n
                regions = tile_tokens(patches, feats.grid, m.ratio).reshape(n * m.ratio**2, -1)
                pred = self.predictors[level](self.neck(regions))
                labels = m.sources.reshape(-1).to(pred.device) + rank() * b
                terms[level] = terms[level] + region_contrast(pred, targets[side], labels, self.cfg.temperature)
        loss = sum(w * t for w, t in zip(self.cfg.level_weights, terms))
        metrics: dict[str, Tensor | float] = {
            f"montage/level{i}": t.detach() if isinstance(t, Tensor) else t for i, t in enumerate(terms)
        }
        return ObjectiveOutput(loss, metrics)  # type: ignore[arg-type]
