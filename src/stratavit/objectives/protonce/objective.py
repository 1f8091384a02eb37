"""``protonce``: PCL's ProtoNCE (Li et al. 2021) on top of MoCo v3's InfoNCE, at one level.

E-step (before every epoch from ``warmup_epochs`` on): teacher embeddings of the whole training
set (eval transform), gathered across processes, spherical k-means at M granularities, per-cluster
concentration φ (see :mod:`stratavit.objectives.protonce.clustering`); every process holds the same prototypes.

M-step loss, for every global view's query q (B, D), l2-normalised, and granularity m:
``CE(q · [c⁺ ; c⁻]ᵀ / [φ⁺ ; φ⁻], own column)`` where c⁺ (B, D) are the prototypes of the batch's
samples (row i's positive is column i) and c⁻ are up to ``num_negatives`` prototypes drawn from
those positive for no sample of the batch (all of them when K is small), as in PCL's code.
``L = InfoNCE + proto_weight · s · mean_m mean_views CE_m``.

PCL's loss is ``CE_inst + (1/M) Σ_m CE_proto_m``: the instance and prototype cross-entropies in
the ratio 1:1. The instance term here is MoCo v3's ``2τ · CE`` summed over the two ordered view
pairs, i.e. ``4τ · mean CE_inst`` (:func:`~stratavit.objectives.infonce.symmetric_infonce`, for
any number of global views). ``proto_scale: instance`` (default) sets ``s = 4τ`` so that
``L = 4τ · (CE_inst + proto_weight · mean CE_proto)``, PCL's ratio (the overall 4τ only rescales
the gradient, as MoCo v3's 2τ does); ``proto_scale: none`` sets ``s = 1`` (the unscaled mean, this
library's former behaviour: at τ = 0.2 the prototype term weighed 1/(4τ) = 1.25× PCL's). The
logged ``protonce/proto`` is always the unscaled mean CE.

Granularities: ``num_clusters: null`` (default) picks them from the training-set size N when
training starts (:meth:`ProtoNCE.check_data`): ``N//100, N//50, N//25`` (500/1000/2000 at 50k
images, METHODS.md's values), see :func:`auto_num_clusters`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone, Features
from stratavit.config import ConfigError
from stratavit.objectives.base import ObjectiveOutput, StepState, ViewFeatures
from stratavit.objectives.infonce import InfoNCE, InfoNCEConfig
from stratavit.objectives.protonce.clustering import Prototypes, distributed_cluster

log = logging.getLogger(__name__)

AUTO_DIVISORS = (100, 50, 25)
"""``num_clusters: null`` -> K = N // d for each d (PCL: 25k/50k/100k for ImageNet's 1.28M)."""


@dataclass
class ProtoNCEConfig(InfoNCEConfig):
    num_clusters: list[int] | None = None
    """k-means granularities (PCL: 25k/50k/100k on ImageNet; ~500/1000/2000 for ~50k images).
    ``null``: from the training-set size N, ``N//100, N//50, N//25`` (see :func:`auto_num_clusters`);
    the resolved values are logged when training starts and live in the objective, not the config."""
    warmup_epochs: int | None = None
    """InfoNCE-only epochs before the first E-step; default: 10 % of train.epochs, at least 1."""
    num_negatives: int = 16000
    proto_weight: float = 1.0
    kmeans_iters: int = 20
    embed_batch_size: int = 512
    proto_scale: Literal["instance", "none"] = "instance"
    """Scale of the prototype term: ``instance`` multiplies it by the instance term's 4τ (MoCo v3's
    2τ over two view pairs), so instance and prototype cross-entropies weigh 1:1 as in PCL's loss;
    ``none`` keeps the plain mean (former behaviour; 1/(4τ) × PCL's weight). [inferred]"""


def auto_num_clusters(n_images: int) -> list[int]:
    """Granularities for ``num_clusters: null`` on a training set of ``n_images`` images.

    ``K_i = max(2, N // d_i)`` for ``d = (100, 50, 25)``, made strictly increasing (each at least
    the previous + 1), keeping only ``K < N`` (a cluster per image is no clustering): 50 000 images
    -> [500, 1000, 2000]; 200 -> [2, 4, 8]; 64 -> [2, 3, 4]; 3 -> [2]. Raises ``ConfigError``
    below 3 images.
    """
    out: list[int] = []
    for d in AUTO_DIVISORS:
        k = max(2, n_images // d)
        if out:
            k = max(k, out[-1] + 1)
        if k < n_images:
            out.append(k)
    if not out:
        raise ConfigError(
            f"objectives.protonce clusters the training set, which has {n_images} image(s) (counted after "
            "data.limit); k-means needs at least 3 images for 2 clusters: add images or raise data.limit"
        )
    return out


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

    def __init__(self, cfg: ProtoNCEConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: ProtoNCEConfig = cfg
        self.require_one_level("the feature it clusters")
        if cfg.num_clusters is not None:
            if not cfg.num_clusters or min(cfg.num_clusters) < 2 or len(set(cfg.num_clusters)) != len(cfg.num_clusters):
                raise ConfigError(
                    f"objectives.{self.name}.num_clusters={cfg.num_clusters}: give distinct granularities of at "
                    f"least 2 clusters each (or null: chosen from the data-set size)"
                )
        self.num_clusters: list[int] | None = list(cfg.num_clusters) if cfg.num_clusters is not None else None
        """The granularities in use: the config's, or resolved from the data-set size (:meth:`check_data`)."""
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

    def check_data(self, n_images: int) -> None:
        """Before training: resolve ``num_clusters: null`` from the training-set size, and raise
        ``ConfigError`` if a granularity has more clusters than there are images (k-means would
        otherwise fail at the first E-step, after the warm-up)."""
        key = f"objectives.{self.name}.num_clusters"
        if self.cfg.num_clusters is None:
            self.num_clusters = auto_num_clusters(n_images)
            how = f"(automatic: N//{', N//'.join(map(str, AUTO_DIVISORS))})"
        else:
            too_many = [k for k in self.cfg.num_clusters if k > n_images]
            if too_many:
                try:
                    auto = f" (automatic: {auto_num_clusters(n_images)} for {n_images} images)"
                except ConfigError:
                    auto = ""
                fits = [k for k in self.cfg.num_clusters if k <= n_images]
                alt = f" or {key}={fits}" if fits else ""
                raise ConfigError(
                    f"{key}={self.cfg.num_clusters} asks k-means for {max(too_many)} clusters, but the training "
                    f"set has only {n_images} images (counted after data.limit); every cluster needs at least "
                    f"one image. Set {key}=null{auto}{alt}, or train on more images"
                )
            self.num_clusters = list(self.cfg.num_clusters)
            how = f"(from {key})"
        if getattr(rank_zero_only, "rank", 0) == 0:  # once per run, not once per process
            log.info("%s: %d images -> num_clusters %s %s", self.name, n_images, self.num_clusters, how)

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
        if self.num_clusters is None:  # trained without stratavit.pretrain's check_data call
            self.check_data(n_total)
        assert self.num_clusters is not None
        self.prototypes = distributed_cluster(
            local_emb, local_idx, n_total, self.num_clusters,
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
        metrics["protonce/proto"] = proto.detach()  # unscaled mean CE, whatever proto_scale
        return ObjectiveOutput(nce + self.cfg.proto_weight * self.proto_scale() * proto, metrics)

    def proto_scale(self) -> float:
        """Factor on the mean prototype CE: the instance term's 4τ (``symmetric_infonce`` is 4τ · the
        mean CE over ordered view pairs) for ``proto_scale: instance``, PCL's 1:1 ratio; else 1."""
        return 4.0 * self.cfg.temperature if self.cfg.proto_scale == "instance" else 1.0


