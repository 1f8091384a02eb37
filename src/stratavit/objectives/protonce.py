"""``protonce``: PCL's ProtoNCE (Li et al. 2021) on top of MoCo v3's InfoNCE, at one level.

E-step (before every epoch from ``warmup_epochs`` on): teacher embeddings of the whole training
set (eval transform), gathered across processes, spherical k-means at M granularities, per-cluster
concentration φ (see :mod:`stratavit.clustering`); every process holds the same prototypes.

M-step loss, for every global view's query q (B, D), l2-normalised, and granularity m:
``CE(q · [c⁺ ; c⁻]ᵀ / [φ⁺ ; φ⁻], own column)`` where c⁺ (B, D) are the prototypes of the batch's
samples (row i's positive is column i) and c⁻ are up to ``num_negatives`` prototypes drawn from
those positive for no sample of the batch (all of them when K is small), as in PCL's code.
``L = InfoNCE + proto_weight · mean_m mean_views CE_m``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbone import Backbone, Features
from stratavit.clustering import Prototypes, distributed_cluster
from stratavit.objectives.base import ObjectiveOutput, StepState, ViewFeatures
from stratavit.objectives.infonce import InfoNCE, InfoNCEConfig


@dataclass
class ProtoNCEConfig(InfoNCEConfig):
    num_clusters: list[int] = field(default_factory=lambda: [500, 1000, 2000])
    """k-means granularities (PCL: 25k/50k/100k on ImageNet; ~500/1000/2000 for ~50k images)."""
    warmup_epochs: int | None = None
    """InfoNCE-only epochs before the first E-step; default: 10 % of train.epochs, at least 1."""
    num_negatives: int = 16000
    proto_weight: float = 1.0
    kmeans_iters: int = 20
    embed_batch_size: int = 512


def protonce_loss(q: Tensor, indices: Tensor, protos: Prototypes, num_negatives: int, generator: torch.Generator | None = None) -> Tensor:
    """PCL's prototype term for one granularity.

    Args:
        q: (B, D) queries (normalised here).
        indices: (B,) data-set indices of the batch's samples.
        protos: prototypes with ``centroids`` (K, D), ``assignments`` (N,), ``phi`` (K,).
        num_negatives: how many negative prototypes to draw (all if fewer are available).
    Returns:
        scalar: mean over the batch of ``CE(q·[c⁺;c⁻]ᵀ/[φ⁺;φ⁻], i)``.
    """
    q = F.normalize(q.float(), dim=1)
    device = q.device
    centroids = protos.centroids.to(device)
    phi = protos.phi.to(device)
    k = centroids.shape[0]
    pos = protos.assignments.to(device)[indices]
    is_pos = torch.zeros(k, dtype=torch.bool, device=device)
    is_pos[pos] = True
    candidates = torch.nonzero(~is_pos).squeeze(1)
    if candidates.numel() > num_negatives:
        pick = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:num_negatives].to(device)
        candidates = candidates[pick]
    chosen = torch.cat([pos, candidates])
    logits = (q @ centroids[chosen].t()) / phi[chosen]
    labels = torch.arange(q.shape[0], device=device)
    return F.cross_entropy(logits, labels)


class ProtoNCE(InfoNCE):
    name = "protonce"
    config_class = ProtoNCEConfig

    def __init__(self, cfg: ProtoNCEConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: ProtoNCEConfig = cfg
        self.require_one_level("the feature it clusters")
        if not cfg.num_clusters or min(cfg.num_clusters) < 2:
            raise ValueError("objectives.protonce.num_clusters needs granularities of at least 2 clusters")
        self.prototypes: list[Prototypes] = []
        self._proto_epoch = -1  # the epoch whose E-step made self.prototypes
        self._generator = torch.Generator().manual_seed(0)

    def get_extra_state(self) -> dict[str, Any]:
        """Prototypes, their epoch and the negative-sampling generator travel in the checkpoint, so a
        run resumed mid-epoch continues with the same prototype term (tensors only: weights_only loads)."""
        return {
            "epoch": torch.tensor(self._proto_epoch),
            "generator": self._generator.get_state(),
            "prototypes": [
                {"centroids": p.centroids, "assignments": p.assignments, "phi": p.phi, "sizes": p.sizes}
                for p in self.prototypes
            ],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._proto_epoch = int(state["epoch"])
        self._generator.set_state(state["generator"])
        self.prototypes = [
            Prototypes(p["centroids"], p["assignments"], p["phi"], p["sizes"]) for p in state["prototypes"]
        ]

    def warmup(self, epochs: int) -> int:
        if self.cfg.warmup_epochs is not None:
            return self.cfg.warmup_epochs
        return max(1, int(round(0.1 * epochs)))

    def needs_dataset_pass(self, epoch: int, epochs: int) -> bool:
        # not again for an epoch whose prototypes were restored from a mid-epoch checkpoint
        return epoch >= self.warmup(epochs) and epoch != self._proto_epoch

    def embed(self, teacher: Features, teacher_head: nn.Module | None) -> Tensor:
        assert teacher_head is not None
        lv = self.levels[0]
        return F.normalize(self.key(teacher[lv], lv, teacher_head).float(), dim=1)

    def on_dataset_embeddings(self, local_emb: Tensor, local_idx: Tensor, n_total: int, epoch: int) -> dict[str, float]:
        self.prototypes = distributed_cluster(
            local_emb, local_idx, n_total, self.cfg.num_clusters,
            temperature=self.cfg.temperature, iters=self.cfg.kmeans_iters, seed=epoch,
        )
        self._proto_epoch = epoch
        metrics: dict[str, float] = {}
        for p in self.prototypes:
            k = int(p.centroids.shape[0])
            sizes = p.sizes.float()
            metrics[f"protonce/k{k}/size_min"] = float(sizes.min())
            metrics[f"protonce/k{k}/size_median"] = float(sizes.median())
            metrics[f"protonce/k{k}/size_max"] = float(sizes.max())
            metrics[f"protonce/k{k}/empty"] = float((p.sizes == 0).sum())
            metrics[f"protonce/k{k}/phi_mean"] = float(p.phi.mean())
            metrics[f"protonce/k{k}/phi_min"] = float(p.phi.min())
            metrics[f"protonce/k{k}/phi_max"] = float(p.phi.max())
        return metrics

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        nce, metrics, queries = self.contrast(student, teacher, teacher_head)
        metrics["protonce/infonce"] = nce.detach()
        if not self.prototypes:  # InfoNCE-only warm-up
            return ObjectiveOutput(nce, metrics)
        indices = student.batch.indices
        terms = [
            protonce_loss(q, indices, protos, self.cfg.num_negatives, self._generator)
            for q in queries[self.levels[0]].chunk(student.n_global)
            for protos in self.prototypes
        ]
        proto = torch.stack(terms).mean()
        metrics["protonce/proto"] = proto.detach()
        return ObjectiveOutput(nce + self.cfg.proto_weight * proto, metrics)


