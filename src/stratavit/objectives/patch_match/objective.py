"""``patch_match``: Local-Global / PW-Self (Javidani, Sadeghi, Araabi 2023): DINO on CLS and matched patches.

One DINO head maps every post-norm token (CLS and patches) of the single level read (default: the
last block). For every pair (teacher global view q, student view v ≠ q, locals included) the
tokens are matched per sample from the crop geometry (:func:`stratavit.objectives.patch_match.matching.match_patches`;
CLS <-> CLS always, patches of the overlap one-to-one); the loss of the pair is, per sample, the
weighted mean over its matched pairs of ``CE(P_t(q)[i], P_s(v)[j])`` (CLS weight 1, patch weight
``patch_weight``; equal by default), averaged over the batch, then over view pairs.

The student head maps only the tokens that occur in some matched pair (on the benchmark's
CIFAR views about two thirds of them: a global view's tokens outside its overlap with the other
global view are never matched) and the loss runs over all view pairs at once
(:mod:`stratavit.objectives.patch_match.pairs`); the authors' code maps every token and loops
over view pairs, which gives the same loss (each token is mapped on its own; with ``use_bn`` the
head still sees every token). The teacher head maps every global-view token: the centre is a mean
over all of them.

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
from stratavit.distributed import all_reduce_sum, sample_seeds, world_size
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.dino import DINOConfig, check_view_pairs, teacher_temperature
from stratavit.objectives.heads import DINOHead
from stratavit.objectives.patch_match.pairs import matched_pairs, matched_pair_loss


@dataclass
class PatchMatchConfig(DINOConfig):
    """DINO's head, temperatures and centre momentum, plus the patch-level fields."""

    patch_weight: float = 1.0
    """Weight of each matched patch pair relative to the CLS pair."""
    max_patch_pairs: int = 0
    """0: every matched patch pair enters the loss (the authors' choice). n > 0: at most n patch pairs per
    (teacher view, student view) pair and sample, evenly spread over the matched sub-grid and weighted so
    that the CLS pair and the patches keep their shares of the loss; the student head then maps fewer
    tokens (a speed switch, not in the paper)."""
    patch_jitter_p: float = 0.0
    """Probability that a student patch gets its own brightness/contrast jitter (0 = off)."""
    patch_jitter_strength: float = 0.4
    """Half-width of the per-patch brightness shift and contrast factor ranges."""


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
        if cfg.patch_weight < 0 or not 0 <= cfg.patch_jitter_p <= 1 or cfg.max_patch_pairs < 0:
            raise ConfigError("objectives.patch_match: patch_weight and max_patch_pairs must be >= 0 and "
                              "patch_jitter_p in [0, 1]")
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
        check_view_pairs(self.name, views)
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

    def _student_logits(self, student: ViewFeatures, rows: Tensor) -> Tensor:
        """(U, K) student logits divided by τ_s of the flattened student token ``rows`` (global views,
        then local; sorted).

        Without batch-norm in the head (``use_bn = False``, the default) every token is mapped on
        its own, so only these rows go through the final norm and the head; with batch-norm the
        head's MLP runs on every token of each view group (its statistics are those of the group's
        tokens, as in the authors' code) and only the last (linear) layer on these rows.
        """
        lv = self.levels[0]
        groups = [student.global_[lv]] + ([student.local[lv]] if student.local is not None and student.n_local else [])
        flat = [f.tokens_pre.reshape(-1, f.tokens_pre.shape[-1]) for f in groups]
        norm = groups[0].norm
        if self.cfg.use_bn:
            z = torch.cat([self.head.bottleneck(norm(x)) for x in flat])[rows]
        else:
            n_first = flat[0].shape[0]
            picked = [flat[0][rows[rows < n_first]]]
            if len(flat) > 1:
                picked.append(flat[1][rows[rows >= n_first] - n_first])
            z = self.head.bottleneck(norm(torch.cat(picked) if len(picked) > 1 else picked[0]))
        return self.head.prototypes(z, 1.0 / self.cfg.student_temp).float()

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        lv = self.levels[0]
        batch = student.batch
        t_feats = teacher.global_[lv]
        n_views, n_tokens, dim = t_feats.tokens_pre.shape
        if self.center.shape[0] != n_tokens:
            raise ValueError(
                f"patch_match: the global views have {n_tokens} tokens but the centre was "
                f"built for {self.center.shape[0]}; views.global_size must equal backbone.img_size"
            )
        local = student.local is not None and student.n_local > 0
        pairs = matched_pairs(
            batch.global_views, batch.local_views[: student.n_local] if local else [], t_feats.grid,
            student.local[lv].grid if local else None, self.cfg.patch_weight,  # type: ignore[index]
            self.cfg.max_patch_pairs,
        )
        s_rows, s_index = torch.unique(pairs.student_rows, return_inverse=True)
        t_rows, t_index = torch.unique(pairs.teacher_rows, return_inverse=True)
        temp = teacher_temperature(self.cfg, state.epoch_for(self.cfg.warmup_teacher_temp_epochs))
        with torch.no_grad():
            # the teacher's MLP on every token (the centre is a mean over all of them); its last layer
            # is linear, so the centre needs it only on the per-position mean, and the loss on the
            # matched rows
            z = teacher_head.bottleneck(t_feats.tokens.reshape(-1, dim)).float()  # (n_g·B·(1+N), D)
            shifted_center = self.center / temp
            t_probs = F.softmax(teacher_head.prototypes(z[t_rows], 1.0 / temp).float()
                                - shifted_center[t_rows % n_tokens], dim=-1)  # (R, K)
        loss = matched_pair_loss(self._student_logits(student, s_rows), s_index, t_probs, t_index, pairs.weights)
        with torch.no_grad():
            cls = teacher_head.prototypes(z[: batch.batch_size * n_tokens : n_tokens], 1.0 / temp).float()
            cls_probs = F.softmax(cls - shifted_center[0], dim=-1)  # view 0's CLS targets: a cheap collapse signal
            entropy = -(cls_probs * torch.log(cls_probs.clamp_min(1e-12))).sum(-1).mean()
            if self.training:
                z_mean = all_reduce_sum(z.reshape(n_views, n_tokens, -1).sum(0)) / (n_views * world_size())
                batch_mean = teacher_head.prototypes(z_mean).float()  # (1+N, K) = mean of the teacher outputs
                m = self.cfg.center_momentum
                self.center.copy_(self.center * m + batch_mean * (1 - m))
        return ObjectiveOutput(
            loss,
            {"patch_match/matched_per_pair": pairs.patch_pairs, "patch_match/teacher_entropy": entropy,
             "patch_match/teacher_temp": temp},
        )

    def on_after_backward(self, state: StepState) -> None:
        if state.epoch_for(self.cfg.freeze_last_layer_epochs) < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None
