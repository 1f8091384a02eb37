"""One backbone for every recipe of an ablation on small images.

The small-compute preset (:mod:`stratavit.engine.preset`) gives recipe families different
backbones (MoCo v3's 4 x 4 tokens, 192 wide; DINO's 8 x 8 tokens, 128 wide). An ablation that let
each recipe take its own would compare backbones, not levels: a coarser token grid alone changes
every patch-level number (correspondence, dense probe, retrieval, detection). So when the preset
applies to the base recipe, every run gets the **base's** backbone (``backbone.*`` of its preset)
with ``train.preset=small``: the rest of the preset (heads, crops, learning rate) stays each recipe's.
"""

from __future__ import annotations

from stratavit.ablation.plan import Plan
from stratavit.engine.preset import apply_preset
from stratavit.recipe import resolve_config

__all__ = ["BACKBONE_KEYS", "shared_backbone_overrides"]

BACKBONE_KEYS = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
"""The backbone fields held fixed across the recipes."""

_OWN_SIZES = ("backbone.", "views.", "data.allow_upsampling", "train.preset")


def shared_backbone_overrides(plan: Plan, base: str) -> tuple[list[str], str | None]:
    """``(overrides, line)``: the base recipe's preset backbone as overrides for every run, and one line
    saying so; ``([], None)`` when the preset does not apply (large images, or the plan's overrides
    set sizes or ``train.preset`` themselves: then they are already the same for every run)."""
    if any(o.split("=", 1)[0].strip().startswith(_OWN_SIZES) for o in plan.overrides):
        return [], None
    given = [*plan.overrides, f"data.path={plan.data}"]
    cfg, line = apply_preset(resolve_config(base, given), base, given)
    if line is None:
        return [], None
    b = cfg.backbone
    overrides = [f"backbone.{k}={getattr(b, k)}" for k in BACKBONE_KEYS] + ["train.preset=small"]
    return overrides, (f"small images: every recipe gets the small-compute preset with {base}'s backbone "
                       f"(ViT {b.depth} x {b.embed_dim}, patch {b.patch_size}), so the comparison holds it fixed")
