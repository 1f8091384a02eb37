"""``patch_match``: Local-Global / PW-Self (Javidani, Sadeghi, Araabi 2023): DINO on CLS and matched patches.

One DINO head maps every post-norm token (CLS and patches) of the single level read (default: the
last block). For every pair (teacher global view q, student view v ≠ q, locals included) the
tokens are matched per sample from the crop geometry (:func:`stratavit.objectives.patch_match.matching.match_patches`;
CLS <-> CLS always, patches of the overlap one-to-one); the loss of the pair is, per sample, the
weighted mean over its matched pairs of ``CE(P_t(q)[i], P_s(v)[j])`` (CLS weight 1, patch weight
``patch_weight``; equal by default), averaged over the batch, then over view pairs.

``P_t = softmax((t − c)/τ_t)`` with a teacher centre **per token position** ``c`` ((1 + N_global), K),
``c ← m c + (1 − m) · mean over views, batch and processes of the teacher outputs at that
position``; ``P_s = softmax(s/τ_s)``. τ_t warms up as in ``dino``.

Option ``patch_jitter_p`` (the paper's later version; [inferred] details): each patch of a
student view gets, with probability p, its own brightness shift and contrast factor (±0.4, in the
normalised image space), so matched patches must agree across photometric changes too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone
from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.views import ViewBatch
from stratavit.distributed import sample_seeds
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.dino import DINOConfig, teacher_temperature, updated_center
from stratavit.objectives.heads import DINOHead
from stratavit.objectives.patch_match.matching import match_patches


@dataclass
class PatchMatchConfig(DINOConfig):
    """DINO's head, temperatures and centre momentum, plus the patch-level fields."""

    patch_weight: float = 1.0
    """Weight of each matched patch pair relative to the CLS pair."""
    patch_jitter_p: float = 0.0
    """Probability that a student patch gets its own brightness/contrast jitter (0 = off)."""
    patch_jitter_strength: float = 0.4
    """Half-width of the per-patch brightness shift and contrast factor ranges."""


def matched_cross_entropy(
    teacher_probs: Tensor, student_logp: Tensor, idx_t: Tensor, idx_s: Tensor, weights: Tensor
) -> Tensor:
    """Weighted mean CE over matched token pairs, per sample, then over the batch.

    Args:
        teacher_probs: (B, T_t, K) teacher distributions per token.
        student_logp: (B, T_s, K) student log-probabilities per token.
        idx_t, idx_s: (B, M) matched token indices.
        weights: (B, M) pair weights (0 for padding).
    Returns:
        scalar.
    """
    k = teacher_probs.shape[-1]
    pt = teacher_probs.gather(1, idx_t[..., None].expand(-1, -1, k))
    ls = student_logp.gather(1, idx_s[..., None].expand(-1, -1, k))
    ce = -(pt * ls).sum(-1)  # (B, M)
    return ((ce * weights).sum(1) / weights.sum(1)).mean()


def patchwise_jitter(
    images: Tensor, patch: int, p: float, strength: float, generator: torch.Generator | Sequence[torch.Generator]
) -> Tensor:
    """Per-patch photometric jitter of normalised images (B, 3, H, W) -> same shape.

    Each ``patch x patch`` cell is, with probability ``p``, mapped to
    ``mean + (x − mean) · c + b`` with its own contrast ``c ~ U(1 − s, 1 + s)`` around the cell's
    mean and brightness shift ``b ~ U(−s, s)`` (``s = strength``, in normalised units).
    ``generator``: one random source for the batch, or one per image (B of them; image ``i``'s
    cells then depend on ``generator[i]`` alone).
    """
    if p <= 0:
        return images
    b, _, h, w = images.shape
    gh, gw = h // patch, w // patch
    shape = (b, 1, gh, gw)
    if isinstance(generator, torch.Generator):
        u_on, u_c, u_b = (torch.rand(shape, generator=generator) for _ in range(3))
    else:
        if len(generator) != b:
            raise ValueError(f"patchwise_jitter: {len(generator)} generators for {b} images")
        u = torch.stack([torch.rand(3, 1, gh, gw, generator=g) for g in generator], dim=1)  # (3, B, 1, gh, gw)
        u_on, u_c, u_b = u.unbind(0)
    on = u_on < p
    c = torch.where(on, 1 + (u_c * 2 - 1) * strength, torch.ones(shape))
    shift = torch.where(on, (u_b * 2 - 1) * strength, torch.zeros(shape))
    c, shift = c.to(images), shift.to(images)
    cells = F.avg_pool2d(images, patch)  # (B, 3, gh, gw)
    up = lambda t: t.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # noqa: E731
    return up(cells) + (images - up(cells)) * up(c) + up(shift)


class PatchMatch(Objective):
    name = "patch_match"
    config_class = PatchMatchConfig
    reads_local_views = True

    def __init__(self, cfg: PatchMatchConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.require_one_level("all its tokens")
        if cfg.patch_weight < 0 or not 0 <= cfg.patch_jitter_p <= 1:
            raise ConfigError("objectives.patch_match: patch_weight must be >= 0 and patch_jitter_p in [0, 1]")
        self.cfg: PatchMatchConfig = cfg
        self.patch_size = backbone.patch_size
        self.head = DINOHead(
            backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.use_bn,
            cfg.norm_last_layer,
        )
        tokens = 1 + (backbone.img_size // backbone.patch_size) ** 2
        self.register_buffer("center", torch.zeros(tokens, cfg.out_dim))
        self._n_views: dict[str, int] = {}  # views per group, from check_setup (to find B in augment_student)

    def teacher_head(self) -> nn.Module:
        return self.head

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        self._n_views = {"global": views.global_crops, "local": views.local_crops}

    def augment_student(self, images: Tensor, group: str, state: StepState) -> Tensor:
        """Per-patch jitter of a view group (V·B, 3, H, W), view-major. Each image's jitter is seeded
        by (step, group, view, the sample's position in the batch of all processes), so it does not
        depend on how the batch is split across processes (V from :meth:`check_setup`; 1 if unknown)."""
        if self.cfg.patch_jitter_p <= 0 or not self.training:
            return images
        n_views = self._n_views.get(group, 1)
        if n_views < 1 or images.shape[0] % n_views:
            n_views = 1
        seeds = sample_seeds(f"patch_match:{state.step}:{group}", n_views, images.shape[0] // n_views)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return patchwise_jitter(images, self.patch_size, self.cfg.patch_jitter_p, self.cfg.patch_jitter_strength, gens)

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        lv = self.levels[0]
        batch = student.batch
        t_feats = teacher.global_[lv]
        if self.center.shape[0] != t_feats.tokens.shape[1]:
            raise ValueError(
                f"patch_match: the global views have {t_feats.tokens.shape[1]} tokens but the centre was "
                f"built for {self.center.shape[0]}; views.global_size must equal backbone.img_size"
            )
        with torch.no_grad():
            t_out = teacher_head(t_feats.tokens).float()  # (n_g·B, 1+N, K)
        temp = teacher_temperature(self.cfg, state.epoch)
        t_probs = F.softmax((t_out - self.center) / temp, dim=-1).chunk(teacher.n_global)
        groups: list[tuple[list[ViewBatch], Tensor, tuple[int, int]]] = [
            (batch.global_views, self.head(student.global_[lv].tokens).float(), student.global_[lv].grid)
        ]
        if student.local is not None and student.n_local:
            groups.append((batch.local_views[: student.n_local], self.head(student.local[lv].tokens).float(),
                           student.local[lv].grid))
        total, pairs, matched = 0.0, 0, 0.0
        for views, s_out, s_grid in groups:
            s_logp = F.log_softmax(s_out / self.cfg.student_temp, dim=-1).chunk(len(views))
            for iq, q in enumerate(batch.global_views):
                for iv, v in enumerate(views):
                    if views is batch.global_views and iv == iq:
                        continue
                    m = match_patches(q.boxes, q.flips, t_feats.grid, v.boxes, v.flips, s_grid)
                    w = m.valid.float()
                    w[:, 1:] *= self.cfg.patch_weight
                    total = total + matched_cross_entropy(t_probs[iq], s_logp[iv], m.idx_a, m.idx_b, w)
                    pairs += 1
                    matched += float(m.patch_pairs.float().mean())
        loss = total / pairs
        with torch.no_grad():
            cls_probs = t_probs[0][:, 0]  # the CLS targets: a cheap collapse signal
            entropy = -(cls_probs * torch.log(cls_probs.clamp_min(1e-12))).sum(-1).mean()
            if self.training:
                flat = updated_center(self.center.reshape(1, -1), t_out.reshape(t_out.shape[0], -1),
                                      self.cfg.center_momentum)
                self.center.copy_(flat.reshape_as(self.center))
        return ObjectiveOutput(
            loss,  # type: ignore[arg-type]
            {"patch_match/matched_per_pair": matched / pairs, "patch_match/teacher_entropy": entropy,
             "patch_match/teacher_temp": temp},
        )

    def on_after_backward(self, state: StepState) -> None:
        if state.epoch < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None
