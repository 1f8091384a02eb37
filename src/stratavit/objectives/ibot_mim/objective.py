"""``ibot_mim``: iBOT (Zhou et al. 2022) — DINO on the CLS token plus masked-patch self-distillation.

The student's global views are masked blockwise (:mod:`stratavit.objectives.ibot_mim.masking`; a learned mask token,
owned here, replaces the masked patch embeddings before the position embedding); the teacher sees
them clean; local views are never masked. One projection head (shared by default) maps every
post-norm token of the single level read (default: the last block) to K logits.

``L = λ_cls · L_cls + λ_mim · L_mim``:

- ``L_cls``: DINO (:func:`stratavit.objectives.dino.pair_cross_entropy`, every view pair at once) on the CLS outputs: mean over pairs
  (teacher global view q, student view v ≠ q, locals included) of ``mean_b CE(P_t(q), P_s(v))``,
  with the CLS centre ``c`` (1, K) and the CLS teacher temperature.
- ``L_mim`` (:func:`mim_loss`): for each global view, CE between the teacher's patch distributions
  (centred with a separate patch centre ``c_p`` (1, K_p), sharpened with ``teacher_patch_temp``) and
  the student's patch distributions of the *same* view, at the masked positions only. Normalised as
  iBOT's ``iBOTLoss``: per image, the sum over its masked patches divided by ``max(1, #masked)``;
  then the mean over the images of a view (images without masked patches contribute 0 and still
  count), then the mean over the global views.

Both centres follow ``c ← m c + (1 − m) · mean`` of the teacher outputs over the batch of all
processes (the patch centre over every patch of every global view). Teacher temperatures warm up
linearly per epoch (``warmup_teacher_temp_epochs``; the patch warm-up starts at
``pred_start_epoch``).

Metrics: ``ibot/cls`` and ``ibot/mim`` (unweighted terms), ``ibot/mask_ratio`` (fraction of the
global views' patches actually masked), ``ibot/teacher_temp``, ``ibot/teacher_patch_temp``,
``ibot/teacher_entropy`` (CLS targets) and ``ibot/teacher_patch_entropy`` (the patch targets, i.e.
at the masked positions; 0 when nothing is masked).

Choices that differ from the reference code, none of which changes the loss:

- With ``use_bn = False`` (the default) the student head runs only on the CLS tokens and the masked
  patch tokens: the outputs at unmasked positions never enter the loss, and each token is mapped
  independently, so this equals iBOT's head-on-every-token while running the student head on ~15 %
  of the patches (the mean mask ratio of iBOT's masks). The teacher head's MLP runs on every
  token (the patch centre is a mean over all patches); its prototype layer, linear, runs on the
  CLS tokens, the masked patches and once on the sum of all patches' bottleneck vectors (the
  centre's input): the outputs and centre of the head on every token
  (:meth:`IBOTHead.teacher_outputs`).
  With ``use_bn = True`` the head runs on every token (batch-norm statistics over all tokens).
- The local views' CLS tokens go through the head alone (iBOT runs the head over all local
  tokens and keeps the CLS output; identical without batch-norm).
- ``shared_head = False`` gives the patches their own last (prototype) layer on the shared MLP,
  in student and teacher alike (the EMA teacher mirrors the student; iBOT's
  ``shared_head_teacher`` switch is not reproduced).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone
from stratavit.config import ConfigError, ViewsConfig
from stratavit.distributed import sample_seeds
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.dino import (
    DINOConfig,
    check_view_pairs,
    pair_cross_entropy,
    teacher_probs,
    teacher_temperature,
    updated_center,
    updated_center_from_sum,
)
from stratavit.objectives.heads import DINOHead
from stratavit.objectives.ibot_mim.masking import block_masks, ibot_min_num_patches


@dataclass
class IBOTConfig(DINOConfig):
    """iBOT's fields: DINO's head, CLS temperatures and centre, plus the patch (MIM) side.

    The CLS-side fields (``out_dim``, ``hidden_dim``, ``bottleneck_dim``, ``head_layers``, ``use_bn``,
    ``norm_last_layer``, ``student_temp``, ``teacher_temp``, ``warmup_teacher_temp``,
    ``warmup_teacher_temp_epochs``, ``center_momentum``, ``freeze_last_layer_epochs``) mean what
    they mean for ``dino``.
    """

    out_dim: int = 8192
    patch_out_dim: int | None = None
    """Patch prototypes K_p; ``None`` = ``out_dim``. Must equal ``out_dim`` with a shared head."""
    shared_head: bool = True
    """One head (MLP and prototype layer) for CLS and patches (iBOT's ViT recipes); ``False``:
    the patches get their own prototype layer on the shared MLP."""
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    patch_center_momentum: float = 0.9
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    """Range of the uniform mask ratio of a masked global view."""
    mask_prob: float = 0.5
    """Probability that a global view is not masked at all (iBOT: ratio 0 or U(0.1, 0.5), equally)."""
    mask_min_aspect: float = 0.3
    """Mask blocks have aspect ratios log-uniform in [mask_min_aspect, 1 / mask_min_aspect]."""
    mask_min_patches: int | None = None
    """Smallest mask block area; ``None`` = iBOT's ``(min(gh, gw) // 3) ** 2`` (BEiT: 4)."""
    pred_start_epoch: float = 0
    """Masking starts at this epoch (iBOT's ``pred_start_epoch``; 0 for ViTs, 50 for Swin); before
    it the masks are empty, so ``L_mim`` = 0."""
    mask_seed: int | None = None
    """Base seed of the masks; ``None`` = ``torch.initial_seed()`` (i.e. ``train.seed``). Each
    mask is a function of (base seed, step, call within the step, view, the sample's position in
    the batch of all processes), so masks do not depend on how the batch is split across processes."""
    lambda_cls: float = 1.0
    lambda_mim: float = 1.0


def teacher_patch_temperature(cfg: IBOTConfig, epoch: float) -> float:
    """Patch teacher temperature (iBOT's ``teacher_temp2_schedule``): ``warmup_teacher_patch_temp``
    for every epoch before ``pred_start_epoch``, then the CLS warm-up's ``linspace`` from
    ``warmup_teacher_patch_temp`` to ``teacher_patch_temp`` over ``warmup_teacher_temp_epochs``
    epochs counted from ``pred_start_epoch``, then ``teacher_patch_temp``."""
    if epoch < cfg.pred_start_epoch:
        return cfg.warmup_teacher_patch_temp
    as_cls = dataclasses.replace(cfg, teacher_temp=cfg.teacher_patch_temp, warmup_teacher_temp=cfg.warmup_teacher_patch_temp)
    return teacher_temperature(as_cls, epoch - cfg.pred_start_epoch)


def mim_loss(
    student_masked: Tensor,
    teacher_patch: Tensor,
    masks: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """iBOT's masked-patch self-distillation loss over a stack of global views.

    Args:
        student_masked: (M, K) student logits at the masked positions, in the row-major order of
            ``masks`` (i.e. ``student_patch[masks]`` for full logits (V·B, N, K)).
        teacher_patch: (V·B, N, K) teacher logits of the same (clean) views.
        masks: (V·B, N) bool, True where the student's patch was masked; ``masks.sum() == M``.
        center: (1, K) patch centre of the teacher.
    Returns:
        scalar: ``mean_i [Σ_{n: masks[i, n]} CE(P_t(i, n), P_s(i, n)) / max(1, Σ_n masks[i, n])]``
        over the V·B images, with ``P_t = softmax((t − c)/τ_t)``, ``P_s = softmax(s/τ_s)`` — equal to
        iBOT's mean over views of the mean over images (every view has the same B).
    """
    pt = teacher_probs(teacher_patch[masks].float(), center, teacher_temp)  # (M, K)
    return masked_cross_entropy(student_masked, pt, masks, student_temp)


def masked_cross_entropy(student_masked: Tensor, teacher_p: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """:func:`mim_loss` from the teacher's probabilities at the masked positions, ``teacher_p`` (M, K)."""
    n_images = masks.shape[0]
    ce = torch.sum(-teacher_p * F.log_softmax(student_masked.float() / student_temp, dim=-1), dim=-1)  # (M,)
    image_of_row = masks.nonzero()[:, 0]  # (M,)
    per_image = torch.zeros(n_images, dtype=ce.dtype, device=ce.device).index_add(0, image_of_row, ce)
    per_image = per_image / masks.sum(dim=1).clamp(min=1).to(ce.dtype)
    return per_image.mean()


def _prototype_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """Weight-normalised linear (bottleneck_dim -> out_dim, no bias), gain 1 (frozen if normalised)."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    gain = layer.parametrizations.weight.original0
    gain.data.fill_(1.0)
    if norm_last_layer:
        gain.requires_grad_(False)
    return layer


class IBOTHead(nn.Module):
    """iBOT's projection head: a :class:`~stratavit.objectives.heads.DINOHead` for the CLS token and
    (shared, or with its own prototype layer) for the patch tokens.

    ``forward(tokens (B, 1 + N, C)) -> (CLS logits (B, K), patch logits (B, N, K_p))``.
    """

    def __init__(self, in_dim: int, cfg: IBOTConfig) -> None:
        super().__init__()
        self.head = DINOHead(
            in_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.use_bn, cfg.norm_last_layer
        )
        patch_dim = cfg.patch_out_dim or cfg.out_dim
        self.patch_last_layer: nn.Module | None = (
            None if cfg.shared_head else _prototype_layer(cfg.bottleneck_dim, patch_dim, cfg.norm_last_layer)
        )

    def last_layers(self) -> list[nn.Module]:
        """The prototype layers (frozen during the first epochs)."""
        return [self.head.last_layer] + ([self.patch_last_layer] if self.patch_last_layer is not None else [])

    def cls(self, x: Tensor) -> Tensor:
        """(M, C) CLS tokens -> (M, K)."""
        return self.head(x)

    def patches(self, x: Tensor) -> Tensor:
        """(M, C) patch tokens -> (M, K_p)."""
        if self.patch_last_layer is None:
            return self.head(x)
        return self.patch_last_layer(F.normalize(self.head.mlp(x), dim=-1, p=2))

    def teacher_outputs(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the teacher side needs, with the prototype layers only where it needs them.

        Args:
            tokens: (V·B, 1 + N, C) tokens; masks: (V·B, N) bool, the student's masked positions.
        Returns:
            ``(CLS logits (V·B, K), patch logits at the masked positions (M, K_p), the sum of every
            patch's logits (1, K_p))``, equal to :meth:`forward`'s outputs, selected and summed: the
            MLP runs on every token (one pass, as :meth:`forward`), and as the prototype layer is
            linear, the sum of its outputs over all patches (the patch centre's input) is its output
            of the summed bottleneck vectors.
        """
        b, t, c = tokens.shape
        z = F.normalize(self.head.mlp(tokens.reshape(b * t, c)), dim=-1, p=2).reshape(b, t, -1)
        patch_layer = self.patch_last_layer if self.patch_last_layer is not None else self.head.last_layer
        patches = z[:, 1:]
        return self.head.last_layer(z[:, 0]), patch_layer(patches[masks]), patch_layer(patches.sum(dim=(0, 1))[None])

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1 + N, C) tokens -> ((B, K) CLS logits, (B, N, K_p) patch logits); one MLP pass over
        all tokens together (batch-norm, if any, sees them all)."""
        b, t, c = tokens.shape
        flat = tokens.reshape(b * t, c)
        if self.patch_last_layer is None:
            out = self.head(flat).reshape(b, t, -1)
            return out[:, 0], out[:, 1:]
        z = F.normalize(self.head.mlp(flat), dim=-1, p=2).reshape(b, t, -1)
        return self.head.last_layer(z[:, 0]), self.patch_last_layer(z[:, 1:])


def _entropy(p: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of ``p`` (..., K); 0 for no rows."""
    if p.numel() == 0:
        return p.new_zeros(())
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


class IBOT(Objective):
    """iBOT: DINO on the CLS token + masked-patch distillation; masks the student's global views.

    Owns the head (:class:`IBOTHead`, whose EMA copy is the teacher's), the CLS centre (1, K), the
    patch centre (1, K_p) and the mask token (C,).
    """

    name = "ibot_mim"
    config_class = IBOTConfig
    reads_local_views = True

    def __init__(self, cfg: IBOTConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: IBOTConfig = cfg
        self.require_one_level("its CLS and patch tokens")
        if cfg.shared_head and cfg.patch_out_dim not in (None, cfg.out_dim):
            raise ConfigError(
                f"objectives.ibot_mim: a shared head has one output size; patch_out_dim={cfg.patch_out_dim} "
                f"!= out_dim={cfg.out_dim} (set shared_head=false or drop patch_out_dim)"
            )
        lo, hi = cfg.mask_ratio
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"objectives.ibot_mim.mask_ratio must satisfy 0 <= low <= high <= 1, got {cfg.mask_ratio}")
        if not 0.0 <= cfg.mask_prob <= 1.0:
            raise ConfigError(f"objectives.ibot_mim.mask_prob must be in [0, 1], got {cfg.mask_prob}")
        if not 0.0 < cfg.mask_min_aspect <= 1.0:
            raise ConfigError(f"objectives.ibot_mim.mask_min_aspect must be in (0, 1], got {cfg.mask_min_aspect}")
        self.head = IBOTHead(backbone.embed_dim, cfg)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        """(C,) learned embedding of a masked patch (zero-initialised, as iBOT's ``masked_embed``)."""
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, cfg.patch_out_dim or cfg.out_dim))
        self._seed_step = -1
        self._seed_calls = 0

    def teacher_head(self) -> nn.Module:
        return self.head

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        check_view_pairs(self.name, views)

    # ------------------------------------------------------------------------------ masks

    def _mask_key(self, step: int) -> str:
        """Key of this call's masks: (base seed, step, call within this step); no process rank."""
        if step != self._seed_step:
            self._seed_step, self._seed_calls = step, 0
        call = self._seed_calls
        self._seed_calls += 1
        base = torch.initial_seed() if self.cfg.mask_seed is None else self.cfg.mask_seed
        return f"ibot_mim:{base}:{step}:{call}"

    def student_masks(
        self, n_views: int, batch_size: int, grid: tuple[int, int], state: StepState, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Blockwise masks for the student's global views (view-major) and the mask token.

        Every mask has its own random source, seeded by (step, call, view, global sample position
        ``rank · B + i``; :func:`stratavit.distributed.sample_seeds`): one process on the batch of
        all processes draws the same masks as the processes that split it.

        Returns:
            ((n_views · B, gh · gw) bool on ``device``, mask token (C,)). Before
            ``pred_start_epoch`` the masks are all False (the token stays in the graph).
        """
        n = n_views * batch_size
        if state.epoch_for(self.cfg.pred_start_epoch) < self.cfg.pred_start_epoch:
            masks = torch.zeros(n, grid[0] * grid[1], dtype=torch.bool)
        else:
            min_patches = self.cfg.mask_min_patches or ibot_min_num_patches(grid)
            lo, hi = self.cfg.mask_ratio
            seeds = sample_seeds(self._mask_key(state.step), n_views, batch_size)
            masks = torch.cat([
                block_masks(1, grid, (lo, hi), self.cfg.mask_prob, self.cfg.mask_min_aspect, min_patches,
                            torch.Generator().manual_seed(seed))
                for seed in seeds
            ])
        return masks.to(device), self.mask_token

    # ------------------------------------------------------------------------------ loss

    def _student_outputs(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """(V·B, 1 + N, C) student tokens -> ((V·B, K) CLS logits, (M, K_p) logits at the masked
        positions, row-major over ``masks`` (V·B, N))."""
        if self.cfg.use_bn:
            cls, patches = self.head(tokens)
            return cls, patches[masks]
        return self.head.cls(tokens[:, 0]), self.head.patches(tokens[:, 1:][masks])

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        cfg = self.cfg
        lv = self.levels[0]
        n_g = student.n_global
        s_tokens = student.global_[lv].tokens  # (V·B, 1 + N, C)
        masks = student.masks
        if masks is None:
            masks = torch.zeros(s_tokens.shape[0], s_tokens.shape[1] - 1, dtype=torch.bool, device=s_tokens.device)
        s_cls, s_masked = self._student_outputs(s_tokens, masks)
        s_local = [self.head.cls(student.local[lv].cls)] if student.local else []
        with torch.no_grad():
            t_cls, t_masked, t_patch_sum = teacher_head.teacher_outputs(teacher.global_[lv].tokens, masks)
            t_cls, t_masked, t_patch_sum = t_cls.float(), t_masked.float(), t_patch_sum.float()  # (V·B, K), (M, K_p), (1, K_p)
        temp = teacher_temperature(cfg, state.epoch_for(cfg.warmup_teacher_temp_epochs))
        patch_temp = teacher_patch_temperature(
            cfg, state.epoch_for(cfg.warmup_teacher_temp_epochs + cfg.pred_start_epoch))
        s_all = torch.cat([s_cls, *s_local]).float()  # (V·B, K), view-major: global views, then local
        b = t_cls.shape[0] // n_g
        pt_cls = teacher_probs(t_cls, self.center, temp)  # (n_g·B, K)
        l_cls = pair_cross_entropy(F.log_softmax(s_all / cfg.student_temp, dim=-1).reshape(-1, b, s_all.shape[-1]),
                                   pt_cls.reshape(n_g, b, -1))
        pt_patch = teacher_probs(t_masked, self.patch_center, patch_temp)  # (M, K_p)
        l_mim = masked_cross_entropy(s_masked, pt_patch, masks, cfg.student_temp)
        loss = cfg.lambda_cls * l_cls + cfg.lambda_mim * l_mim
        with torch.no_grad():
            cls_entropy = _entropy(pt_cls)
            patch_entropy = _entropy(pt_patch)
            if self.training:
                self.center.copy_(updated_center(self.center, t_cls, cfg.center_momentum))
                self.patch_center.copy_(
                    updated_center_from_sum(self.patch_center, t_patch_sum, masks.numel(), cfg.patch_center_momentum)
                )
        metrics: dict[str, Tensor | float] = {
            "ibot/cls": l_cls.detach(),
            "ibot/mim": l_mim.detach(),
            "ibot/mask_ratio": masks.float().mean(),
            "ibot/teacher_temp": temp,
            "ibot/teacher_patch_temp": patch_temp,
            "ibot/teacher_entropy": cls_entropy,
            "ibot/teacher_patch_entropy": patch_entropy,
        }
        return ObjectiveOutput(loss, metrics)

    def on_after_backward(self, state: StepState) -> None:
        if state.epoch_for(self.cfg.freeze_last_layer_epochs) < self.cfg.freeze_last_layer_epochs:
            for layer in self.head.last_layers():
                for p in layer.parameters():
                    p.grad = None
