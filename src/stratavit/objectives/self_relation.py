"""``self_relation``: SERE — feature self-relation distillation (Li, Gao, Cheng, TPAMI 2023).

The representation made invariant across views is the *self-relation* of the patch features, not
the features themselves. Input: one level's patch tokens **before** the final norm (the last block
by default), reshaped to a ``(M, C, h, w)`` map. The student's global views are the ones an iBOT
objective masked (this objective never masks); the teacher (EMA) sees clean global views only.

Relation modules (one for the channel relation, one for the spatial relation), each
``projection z = ReLU(BN(x))`` (batch-norm over channels, no linear layer) and, student only,
``predictor p = ReLU(BN(Conv1x1(z)))``. The teacher uses ``z`` from the EMA copy of the
projection; the student uses ``p``. The student's local views have their own pair of modules
(projection and predictor both; ``separate_local_modules``); the teacher only ever uses the global
modules' projections, so only those are EMA-copied (:meth:`SelfRelation.teacher_head`).

- **Channel relation** (:func:`channel_relation`): ``R_ch = U Uᵀ / N`` (C × C), U the C × N
  flattening. Loss: row-wise ``CE(softmax(R_t / τ_ch), softmax(R_s / τ_s))`` averaged over the
  B·C rows, for every pair (teacher global view q, student view v ≠ q), local views included;
  no alignment is needed.
- **Spatial relation** (:func:`spatial_relation`): C split into the backbone's H heads, per head
  ``R_sp = U_hᵀ U_h / sqrt(C / H)`` (N × N). For a pair (teacher global q, student view v) both
  relation maps are resampled onto the two crops' shared overlap: a G × G grid of source points
  spanning the overlap box edge to edge (``linspace``, as the reference ``get_grid``), taken on
  both the query and the key axis with bilinear interpolation, giving G² × G². Loss: row-wise
  ``CE(softmax(R_t / τ_sp), softmax(R_s / τ_s))`` averaged over heads and rows. G = ``grid_global``
  for global–global pairs and ``grid_local`` for local–global pairs.
- Each of the two losses is the mean over its pairs (``n_g (n_g − 1) + n_g n_l`` of them).
  Total of this objective: ``α L_sp + β L_ch`` (the iBOT part is the ``ibot_mim`` objective,
  weighted ``(4 − α − β) / 2`` in the recipe).

Sampling convention (:func:`overlap_points`, :func:`sampling_grid`): the overlap points are
source-image coordinates, row-major (y outer, x inner); each view maps them into its own pixel
coordinates with :func:`stratavit.data.geometry.source_to_view` (flips included) and normalises them
as ``2 x / S − 1`` for ``grid_sample(align_corners=False)``, under which ±1 are the outer edges of
the view and token ``i`` of ``g`` sits at ``(2 i + 1) / g − 1``, i.e. at its patch centre.

Implementation note: bilinear resampling is linear, and a relation is a bilinear form of the
features, so resampling ``R = Uᵀ U`` on both axes equals the relation of the resampled features
``W Uᵀ U Wᵀ = (U Wᵀ)ᵀ (U Wᵀ)``. The objective therefore samples the projected features at the G²
points (``grid_sample`` on ``(M, C, h, w)``) and builds the G² × G² relation from them; the full
N × N relation is never formed. :func:`resample_relation` is the reference's two-axis form of the
same thing (used by the tests to check the identity).

Differences from the reference code (MCG-NKU/SERE), each a config switch where it matters:

- ``padding = "zeros"`` (default, the reference's ``grid_sample`` default): sample points on a
  crop's outer half-patch band blend with zeros, which halves the relation logits sampled at a
  crop edge (a quarter at the corners), so edge rows of the two views of a pair get different
  scalings. ``padding = "border"`` ([inferred], a switch) gives them the nearest patch value
  instead; at 224/16 its gradient differs from the reference's by about its own norm.
- Samples whose crops do not overlap are masked out (zero loss, zero gradient). The reference
  fills their sampling grid with out-of-range points, so their relations are all zeros and they
  contribute the constant ``log G²``. The denominator stays the full batch B, as in the reference,
  so the gradient equals the reference's; only that constant is gone.
- More than two global views are supported (every ordered pair q ≠ v with its own overlap; the
  reference aligns only global views 1 and 2).
- The two grid sizes follow the token grid by default (``tokens-per-side − 1`` for global–global
  pairs, 13 at 224/16; local tokens per side for local–global pairs, 6 at 96/16) instead of being
  fixed at 13 and 6.

Metrics: ``sere/spatial``, ``sere/channel`` (unweighted losses) and ``sere/overlap_frac``
(fraction of (pair, sample) spatial terms whose crops overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone
from stratavit.config import ConfigError
from stratavit.data.geometry import intersect, source_to_view
from stratavit.data.views import ViewBatch
from stratavit.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)

Padding = Literal["border", "zeros"]


@dataclass
class SelfRelationConfig(ObjectiveConfig):
    """SERE's fields. ``alpha`` / ``beta`` weight the spatial / channel losses inside this objective."""

    alpha: float = 0.2
    """Weight of the spatial self-relation loss (README: ``--alpha 0.2``)."""
    beta: float = 0.5
    """Weight of the channel self-relation loss (README: ``--beta 0.5``)."""
    spatial_teacher_temp: float = 0.5
    """Teacher temperature of the spatial relation (reference ``--temperature_pixel``)."""
    channel_teacher_temp: float = 0.1
    """Teacher temperature of the channel relation (reference ``--temperature_channel``)."""
    student_temp: float = 1.0
    """Student temperature of both relations (the reference divides by 1.0)."""
    grid_global: int | None = None
    """G of global–global pairs; ``None`` = global tokens per side − 1 (13 at 224/16)."""
    grid_local: int | None = None
    """G of local–global pairs; ``None`` = local tokens per side (6 at 96/16)."""
    num_heads: int | None = None
    """Heads of the spatial relation; ``None`` = the backbone's."""
    separate_local_modules: bool = True
    """The student's local views use their own channel and spatial modules (reference: yes)."""
    padding: Padding = "zeros"
    """``grid_sample`` padding: ``zeros`` (the reference's) or ``border`` ([inferred], see the module doc)."""


# ---------------------------------------------------------------------------------- relations


def tokens_to_map(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """(M, N, C) row-major patch tokens -> (M, C, h, w) feature map, ``N = h · w``."""
    m, n, c = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
    return patches.transpose(1, 2).reshape(m, c, h, w)


def channel_relation(u: Tensor, scale: float | None = None) -> Tensor:
    """Channel self-relation ``U Uᵀ / N``: (..., C, N) -> (..., C, C).

    ``scale`` replaces the ``1 / N`` (e.g. ``1 / (N τ)`` gives the relation divided by a
    temperature); it is applied inside the matrix product, not as a pass over the result.
    """
    scale = 1.0 / u.shape[-1] if scale is None else scale
    flat = u.reshape(-1, *u.shape[-2:])
    rel = torch.baddbmm(u.new_zeros(()), flat, flat.transpose(-2, -1), beta=0.0, alpha=scale)
    return rel.reshape(*u.shape[:-1], u.shape[-2])


def spatial_relation(u: Tensor, num_heads: int, scale: float = 1.0) -> Tensor:
    """Per-head spatial self-relation ``U_hᵀ U_h / sqrt(C / H)``: (M, C, N) -> (M, H, N, N).

    Head ``h`` holds channels ``[h C/H, (h + 1) C/H)`` (the split of the backbone's attention).
    ``scale`` multiplies the result (e.g. ``1 / τ``), inside the matrix product.
    """
    m, c, n = u.shape
    if c % num_heads:
        raise ValueError(f"{c} channels do not split into {num_heads} heads")
    d = c // num_heads
    uh = u.reshape(m * num_heads, d, n)
    rel = torch.baddbmm(u.new_zeros(()), uh.transpose(-2, -1), uh, beta=0.0, alpha=scale * d**-0.5)
    return rel.reshape(m, num_heads, n, n)


def relation_cross_entropy(teacher: Tensor, student: Tensor, teacher_temp: float, student_temp: float) -> Tensor:
    """Row-wise ``CE(softmax(teacher / τ_t), softmax(student / τ_s))``: (..., K) x2 -> (...).

    The teacher side is detached.
    """
    pt = F.softmax(teacher.detach() / teacher_temp, dim=-1)
    return -(pt * F.log_softmax(student / student_temp, dim=-1)).sum(dim=-1)


# ---------------------------------------------------------------------------------- geometry


def overlap_points(boxes_a: Tensor, boxes_b: Tensor, grid_size: int) -> tuple[Tensor, Tensor]:
    """A G × G grid of source points spanning the overlap of two box batches, edges included.

    Args:
        boxes_a, boxes_b: (..., 4) broadcastable crop boxes ``(x0, y0, x1, y1)`` in source pixels.
        grid_size: G. Points are ``lo + i (hi − lo) / (G − 1)``, ``i = 0 … G − 1`` on each axis
            (the overlap's centre when G = 1).
    Returns:
        ``(points, valid)``: (..., G², 2) source points ``(x, y)``, row-major (y outer, x inner),
        and (...) bool, true where the boxes overlap with positive area (elsewhere the points lie
        on a degenerate box and mean nothing).
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    inter, valid = intersect(boxes_a, boxes_b)
    if grid_size == 1:
        t = torch.full((1,), 0.5, dtype=inter.dtype, device=inter.device)
    else:
        t = torch.linspace(0.0, 1.0, grid_size, dtype=inter.dtype, device=inter.device)
    lo, hi = inter[..., None, :2], inter[..., None, 2:]  # (..., 1, 2)
    xs = lo[..., 0] + t * (hi[..., 0] - lo[..., 0])  # (..., G)
    ys = lo[..., 1] + t * (hi[..., 1] - lo[..., 1])
    g = grid_size
    xx = xs[..., None, :].expand(*xs.shape[:-1], g, g)
    yy = ys[..., :, None].expand(*ys.shape[:-1], g, g)
    points = torch.stack((xx, yy), dim=-1).reshape(*xs.shape[:-1], g * g, 2)
    return points, valid


def sampling_grid(points: Tensor, boxes: Tensor, flips: Tensor, view_size: tuple[int, int]) -> Tensor:
    """Source points -> ``grid_sample`` coordinates (align_corners=False) in each view.

    Args:
        points: (..., P, 2) source points ``(x, y)``.
        boxes: (..., 4) crop boxes of the views; flips: (...) bool; view_size: ``(S_h, S_w)``.
    Returns:
        (..., P, 2) ``(2 x_v / S_w − 1, 2 y_v / S_h − 1)`` with ``(x_v, y_v)`` the view pixel
        position of each point (mirrored for flipped views).
    """
    s_h, s_w = view_size
    v = source_to_view(points, boxes, flips, view_size)
    return torch.stack((2.0 * v[..., 0] / s_w - 1.0, 2.0 * v[..., 1] / s_h - 1.0), dim=-1)


def sample_maps(maps: Tensor, grids: Tensor, padding: Padding = "border") -> Tensor:
    """Bilinear samples of feature maps at K point sets each.

    Args:
        maps: (M, C, h, w) feature maps.
        grids: (M, K, P, 2) ``grid_sample`` coordinates (see :func:`sampling_grid`).
    Returns:
        (M, K, C, P) sampled features.
    """
    out = F.grid_sample(maps, grids, mode="bilinear", padding_mode=padding, align_corners=False)  # (M, C, K, P)
    return out.permute(0, 2, 1, 3)


def resample_relation(relation: Tensor, grid: tuple[int, int], grids: Tensor, padding: Padding = "border") -> Tensor:
    """The reference's form: resample an (M, H, N, N) relation on its key axis, then its query axis.

    Args:
        relation: (M, H, N, N) spatial relation, ``N = h · w`` row-major on both axes.
        grid: ``(h, w)``.
        grids: (M, P, 2) ``grid_sample`` coordinates of the P target points.
    Returns:
        (M, H, P, P): entry ``[i, j]`` = the relation bilinearly interpolated at (point i, point j).
        Equal to ``spatial_relation`` of :func:`sample_maps` output (a relation is bilinear in the
        features), which is what :class:`SelfRelation` computes.
    """
    m, nh, n, _ = relation.shape
    h, w = grid
    p = grids.shape[1]
    g = grids[:, None]  # (M, 1, P, 2)
    keys = F.grid_sample(relation.reshape(m, nh * n, h, w), g, mode="bilinear", padding_mode=padding, align_corners=False)
    keys = keys.reshape(m, nh, n, p).transpose(-2, -1)  # (M, H, P_k, N_q)
    both = F.grid_sample(keys.reshape(m, nh * p, h, w), g, mode="bilinear", padding_mode=padding, align_corners=False)
    return both.reshape(m, nh, p, p).transpose(-2, -1)  # (M, H, P_q, P_k)


def aligned_samples(
    t_maps: Tensor,
    t_boxes: Tensor,
    t_flips: Tensor,
    t_size: tuple[int, int],
    s_maps: Tensor,
    s_boxes: Tensor,
    s_flips: Tensor,
    s_size: tuple[int, int],
    grid_size: int,
    padding: Padding = "border",
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher and student features sampled at the same overlap points, for every view pair.

    Each teacher map is sampled once for all its partners (the point sets are stacked along
    ``grid_sample``'s output height), and likewise each student map.

    Args:
        t_maps: (Vt, B, C, h, w) teacher maps; t_boxes (Vt, B, 4); t_flips (Vt, B); t_size (S_h, S_w).
        s_maps: (Vs, B, C, h', w') student maps, with s_boxes (Vs, B, 4), s_flips (Vs, B), s_size.
        grid_size: G.
    Returns:
        ``(t, s, valid)``: (Vt, Vs, B, C, G²) teacher samples of view q at the overlap of
        (q, v), the same for student view v, and (Vt, Vs, B) bool overlap flags. Where a pair
        does not overlap both are sampled at their view's centre (finite, meaningless).
    """
    vt, b = t_boxes.shape[:2]
    vs = s_boxes.shape[0]
    points, valid = overlap_points(t_boxes[:, None], s_boxes[None], grid_size)  # (Vt, Vs, B, P, 2)
    p = points.shape[-2]
    keep = valid[..., None, None]
    t_grid = torch.where(keep, sampling_grid(points, t_boxes[:, None], t_flips[:, None], t_size), 0.0)
    s_grid = torch.where(keep, sampling_grid(points, s_boxes[None], s_flips[None], s_size), 0.0)
    c = t_maps.shape[2]
    t_grid = t_grid.permute(0, 2, 1, 3, 4).reshape(vt * b, vs, p, 2).to(t_maps.dtype)
    t = sample_maps(t_maps.flatten(0, 1), t_grid, padding)  # (Vt·B, Vs, C, P)
    t = t.reshape(vt, b, vs, c, p).transpose(1, 2)
    s_grid = s_grid.permute(1, 2, 0, 3, 4).reshape(vs * b, vt, p, 2).to(s_maps.dtype)
    s = sample_maps(s_maps.flatten(0, 1), s_grid, padding)  # (Vs·B, Vt, C, P)
    s = s.reshape(vs, b, vt, c, p).permute(2, 0, 1, 3, 4)
    return t, s, valid


def spatial_pair_losses(
    t_samples: Tensor, s_samples: Tensor, valid: Tensor, num_heads: int, teacher_temp: float, student_temp: float
) -> Tensor:
    """Spatial loss of each pair: ``Σ_b valid_b · mean_{h, i} CE_row / B``.

    Args:
        t_samples, s_samples: (P, B, C, G²) aligned teacher / student features of P pairs.
        valid: (P, B) bool; samples without overlap contribute zero loss and zero gradient
            but still count in the denominator B (as in the reference).
    Returns:
        (P,) per-pair losses.
    """
    npairs, b, c, g2 = s_samples.shape
    with torch.no_grad():
        pt = F.softmax(spatial_relation(t_samples.reshape(npairs * b, c, g2), num_heads, 1.0 / teacher_temp), dim=-1)
    log_ps = F.log_softmax(spatial_relation(s_samples.reshape(npairs * b, c, g2), num_heads, 1.0 / student_temp), dim=-1)
    ce = -(pt * log_ps).sum(dim=-1)  # (P·B, H, G²)
    per_sample = ce.mean(dim=(1, 2)).reshape(npairs, b)
    per_sample = torch.where(valid, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum(dim=1) / b


def channel_pair_cross_entropy(t_logits: Tensor, s_logits: list[Tensor]) -> Tensor:
    """Channel loss of every (teacher view q, student view v) pair, diagonal included, from logits
    already divided by their temperatures.

    Args:
        t_logits: (Vt, B, C, C) teacher channel relations / τ_t.
        s_logits: student channel relations / τ_s of each student view group, (V_g, B, C, C) each
            (global views, then local ones: no copy of them into one tensor).
    Returns:
        (Vt, Σ V_g): ``mean_{b, i} CE(softmax(t_logits[q, b, i]), softmax(s_logits[v, b, i]))``, one
        matrix product per group over the flattened (B · C · C) relations.
    """
    vt, b, c, _ = t_logits.shape
    with torch.no_grad():
        pt = F.softmax(t_logits, dim=-1).reshape(vt, -1)
    sums = [pt @ F.log_softmax(s, dim=-1).reshape(s.shape[0], -1).t() for s in s_logits]  # (Vt, V_g) each
    return -torch.cat(sums, dim=1) / (b * c)


# ---------------------------------------------------------------------------------- modules


class RelationModule(nn.Module):
    """SERE's relation module on (M, C, h, w) maps: ``z = ReLU(BN(x))``, ``p = ReLU(BN(Conv1x1(z)))``.

    ``forward(x) -> (z, p)``, both (M, C, h, w). The teacher uses the EMA copy of ``projection``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU())
        self.predictor = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projection(x)
        return z, self.predictor(z)


def _default_grid(grid: tuple[int, int], minus: int) -> int:
    return max(1, min(grid) - minus)


def _per_view(maps: Tensor, n_views: int) -> Tensor:
    """(V·B, C, h, w) view-major maps -> (V, B, C, h, w) float32."""
    return maps.float().reshape(n_views, maps.shape[0] // n_views, *maps.shape[1:])


def _channel_logits(maps: Tensor, n_views: int, temp: float) -> Tensor:
    """(V·B, C, h, w) view-major maps -> (V, B, C, C) channel relations divided by ``temp`` (one product)."""
    u = _per_view(maps, n_views).flatten(-2)  # (V, B, C, N)
    return channel_relation(u, 1.0 / (u.shape[-1] * temp))


def _geometry(views: list[ViewBatch], device: torch.device) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """ViewBatches -> boxes (V, B, 4) float32, flips (V, B) bool, view size (S_h, S_w)."""
    boxes = torch.stack([v.boxes for v in views]).to(device=device, dtype=torch.float32)
    flips = torch.stack([v.flips for v in views]).to(device=device, dtype=torch.bool)
    return boxes, flips, views[0].size


class SelfRelation(Objective):
    """SERE's spatial and channel self-relation losses (see the module doc).

    Owns ``channel`` and ``spatial`` :class:`RelationModule` s (global views; their projections are
    the teacher side) and ``channel_local`` / ``spatial_local`` for the student's local views
    (``None`` when ``separate_local_modules`` is off).
    """

    name = "self_relation"
    config_class = SelfRelationConfig
    reads_local_views = True

    def __init__(self, cfg: SelfRelationConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: SelfRelationConfig = cfg
        self.require_one_level("its pre-norm patch tokens")
        dim = backbone.embed_dim
        self.num_heads = cfg.num_heads or backbone.num_heads
        if dim % self.num_heads:
            raise ConfigError(f"objectives.self_relation: {dim} channels do not split into num_heads={self.num_heads}")
        for name in ("grid_global", "grid_local"):
            value = getattr(cfg, name)
            if value is not None and value < 1:
                raise ConfigError(f"objectives.self_relation.{name} must be >= 1 (or null), got {value}")
        for name in ("spatial_teacher_temp", "channel_teacher_temp", "student_temp"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"objectives.self_relation.{name} must be > 0, got {getattr(cfg, name)}")
        self.channel = RelationModule(dim)
        self.spatial = RelationModule(dim)
        self.channel_local: RelationModule | None = RelationModule(dim) if cfg.separate_local_modules else None
        self.spatial_local: RelationModule | None = RelationModule(dim) if cfg.separate_local_modules else None

    def teacher_head(self) -> nn.Module:
        """The global modules' projections, ``{"channel", "spatial"}`` (the teacher uses nothing else)."""
        return nn.ModuleDict({"channel": self.channel.projection, "spatial": self.spatial.projection})

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        cfg = self.cfg
        lv = self.levels[0]
        n_g = student.n_global
        sg = student.global_[lv]
        x_g = tokens_to_map(sg.patches_pre, sg.grid)  # (n_g·B, C, h, w)
        _, p_ch_g = self.channel(x_g)
        _, p_sp_g = self.spatial(x_g)
        with torch.no_grad():
            tg = teacher.global_[lv]
            x_t = tokens_to_map(tg.patches_pre, tg.grid)
            z_ch_t = teacher_head["channel"](x_t)  # type: ignore[index]
            z_sp_t = teacher_head["spatial"](x_t)  # type: ignore[index]
        has_local = student.local is not None and student.n_local > 0
        n_l = student.n_local if has_local else 0
        if has_local:
            sl = student.local[lv]  # type: ignore[index]
            x_l = tokens_to_map(sl.patches_pre, sl.grid)
            _, p_ch_l = (self.channel_local or self.channel)(x_l)
            _, p_sp_l = (self.spatial_local or self.spatial)(x_l)

        device = x_g.device
        with torch.autocast(device_type=device.type, enabled=False):
            # ---- channel: every (teacher global q, student view v != q), locals included
            with torch.no_grad():
                t_ch = _channel_logits(z_ch_t, n_g, cfg.channel_teacher_temp)  # (n_g, B, C, C)
            s_ch = [_channel_logits(p_ch_g, n_g, cfg.student_temp)]
            if has_local:
                s_ch.append(_channel_logits(p_ch_l, n_l, cfg.student_temp))
            ch = channel_pair_cross_entropy(t_ch, s_ch)  # (n_g, n_g + n_l)
            off_diag = ~torch.eye(n_g, n_g + n_l, dtype=torch.bool, device=device)
            n_terms = n_g * (n_g + n_l) - n_g  # counted on the host: no device sync

            # ---- spatial: aligned on each pair's overlap
            g_boxes, g_flips, g_size = _geometry(student.batch.global_views, device)
            t_maps = _per_view(z_sp_t, n_g)
            grid_g = cfg.grid_global or _default_grid(sg.grid, 1)
            t_s, s_s, valid = aligned_samples(
                t_maps, g_boxes, g_flips, g_size, _per_view(p_sp_g, n_g), g_boxes, g_flips, g_size, grid_g, cfg.padding
            )
            pairs = [(q, v) for q in range(n_g) for v in range(n_g) if v != q]  # on the host: no device sync
            qi, vi = (torch.tensor([p[i] for p in pairs], dtype=torch.long, device=device) for i in (0, 1))
            sp_terms = [
                spatial_pair_losses(t_s[qi, vi], s_s[qi, vi], valid[qi, vi], self.num_heads, cfg.spatial_teacher_temp, cfg.student_temp)
            ]
            valid_all = [valid[qi, vi].flatten()]
            if has_local:
                l_boxes, l_flips, l_size = _geometry(student.batch.local_views[:n_l], device)
                grid_l = cfg.grid_local or _default_grid(sl.grid, 0)
                t_s, s_s, valid = aligned_samples(
                    t_maps, g_boxes, g_flips, g_size, _per_view(p_sp_l, n_l), l_boxes, l_flips, l_size, grid_l, cfg.padding
                )
                sp_terms.append(
                    spatial_pair_losses(
                        t_s.flatten(0, 1), s_s.flatten(0, 1), valid.flatten(0, 1), self.num_heads, cfg.spatial_teacher_temp, cfg.student_temp
                    )
                )
                valid_all.append(valid.flatten())
            sp = torch.cat(sp_terms)
            if n_terms == 0:  # one global view and no locals: nothing to compare
                zero = p_ch_g.float().sum() * 0.0 + p_sp_g.float().sum() * 0.0
                l_ch, l_sp = zero, zero
            else:
                l_ch = torch.where(off_diag, ch, 0.0).sum() / n_terms
                l_sp = sp.sum() / n_terms
            loss = cfg.alpha * l_sp + cfg.beta * l_ch
            valid_cat = torch.cat(valid_all)
            overlap = valid_cat.float().mean() if valid_cat.numel() else torch.zeros((), device=device)
        metrics: dict[str, Tensor | float] = {
            "sere/spatial": l_sp.detach(),
            "sere/channel": l_ch.detach(),
            "sere/overlap_frac": overlap,
        }
        return ObjectiveOutput(loss, metrics)


__all__ = [
    "RelationModule",
    "SelfRelation",
    "SelfRelationConfig",
    "aligned_samples",
    "channel_pair_cross_entropy",
    "channel_relation",
    "overlap_points",
    "relation_cross_entropy",
    "resample_relation",
    "sample_maps",
    "sampling_grid",
    "spatial_pair_losses",
    "spatial_relation",
    "tokens_to_map",
]
