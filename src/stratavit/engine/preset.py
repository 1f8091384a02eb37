"""The small-compute preset: what a recipe becomes on small images and a small budget.

Every recipe ships the paper's sizes (ViT-S/16 at 224 px, heads of 4,096-65,536 units). On
CIFAR-sized images (32 px) and a CPU budget of minutes those sizes cannot run (the views do not
fit the images) or cannot learn (a few hundred steps of a 22M-parameter model). The preset is the
configuration that learned best in a recorded sweep (bench/RESULTS.md, "Small-compute preset"):
a 4-block ViT, heads a quarter of the paper's width, 2 global views of the image's size (+ local
views of half of it where the recipe has them), no blur (a 23-px kernel erases a 32-px image), the
photometric augmentations batched in the training process (``views.photometric=device``: on 32-px
images the per-image PIL calls of one loader worker starve the step), batch 64, and a constant
teacher momentum. The contrastive recipes (MoCo v3, MCVT, CL-EDI) get 4 x 4 tokens per view and a
192-wide ViT (twice the steps of 8 x 8 tokens in the same time, and the better kNN in the sweep);
the others 8 x 8 tokens and 128 wide (local crops of half the size need tokens to match, MCL's
smallest montage tiles are an eighth of the view).

``train.preset``:

* ``auto`` (default): a **new** run gets the preset when its images are small (the median
  smallest side of a sample of them <= :data:`SMALL_IMAGE_MAX` px) and no override names a
  ``backbone.*`` or ``views.*`` key or ``data.allow_upsampling`` (whoever sets sizes keeps them). It is recorded as
  ``train.preset: small`` in the run's ``config.yaml``, and one line says so.
* ``small``: always (the image size sets the view and patch size).
* ``none``: never; the recipe's sizes as written.

Overrides given on the command line always win over the preset's values.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from stratavit.config import Config, ConfigError, to_dict
from stratavit.data.datasets import build_dataset, image_sizes
from stratavit.recipe import resolve_config

__all__ = ["SMALL_IMAGE_MAX", "apply_preset", "auto_applies", "preset_overrides", "small_view_size"]

SMALL_IMAGE_MAX = 64
"""Images whose smallest side is at most this (median of a sample) get the preset under ``auto``."""

TOKENS_PER_SIDE = 8
"""The preset's global view is this many patches across (64 tokens: 32 px with patch 4) ..."""

_COARSE = {"mocov3", "mcvt", "cl-edi"}
"""... except for these recipes: 4 x 4 tokens (32 px with patch 8) and a 192-wide, 3-head ViT."""

_COMMON = [
    "backbone.arch=vit_tiny_patch16_224",
    "backbone.depth=4",
    "backbone.drop_path_rate=0.0",
    "views.resize=null",
    "views.global_blur_p=[0.0]",
    "views.local_blur_p=0.0",
    "views.global_solarize_p=[0.0,0.2]",
    "views.photometric=device",
    "teacher.momentum=0.99",
    "teacher.momentum_end=0.99",
    "data.batch_size=64",
]

_CONTRASTIVE = ["views.global_scale=[0.2,1.0]", "optim.base_lr=8e-3", "optim.weight_decay=0.05"]
_DINO_HEAD = ["out_dim=4096", "hidden_dim=512", "bottleneck_dim=128"]
_DISTILL = ["views.global_scale=[0.25,1.0]", "views.local_crops=4", "views.local_scale=[0.08,0.25]",
            "optim.base_lr=2e-3"]


def _mlp(objective: str) -> list[str]:
    return [f"objectives.{objective}.proj_hidden_dim=1024", f"objectives.{objective}.pred_hidden_dim=1024"]


def _head(objective: str) -> list[str]:
    return [f"objectives.{objective}.{kv}" for kv in _DINO_HEAD]


_PER_RECIPE: dict[str, list[str]] = {
    "mocov3": [*_CONTRASTIVE, *_mlp("infonce")],
    "mcvt": [*_CONTRASTIVE, *_mlp("infonce"), *_mlp("protonce")],
    "cl-edi": [*_CONTRASTIVE, *_mlp("infonce"), *_mlp("patch_aggregate")],
    "mcl": [*_CONTRASTIVE, *_mlp("montage"), "objectives.montage.pyramid_dim=128"],
    "dino": [*_DISTILL, *_head("dino")],
    "local-global": [*_DISTILL, *_head("patch_match")],
    "ibot": [*_DISTILL, *_head("ibot_mim")],
    "sere": [*_DISTILL, *_head("ibot_mim")],
}
"""Per recipe: the optimiser, crops and head widths of the preset (recipes not listed get ``_COMMON`` only)."""

_LOCAL_IS_GLOBAL = {"mcl"}
"""Recipes whose local views are canvases of the global size (MCL's montages)."""


def small_view_size(smallest_side: int, tokens: int = TOKENS_PER_SIDE) -> tuple[int, int]:
    """``(global view size, patch size)`` for images whose smallest side is ``smallest_side`` px: the
    patch is ``smallest_side // tokens`` (at least 1) and the view the largest multiple of it that
    fits, so a view is ``tokens`` x ``tokens`` patches (8: 32 px -> (32, 4), 64 px -> (64, 8),
    40 px -> (40, 5); 4: 32 px -> (32, 8))."""
    patch = max(1, smallest_side // tokens)
    return smallest_side // patch * patch, patch


def preset_overrides(recipe: str, smallest_side: int, local_crops: int) -> list[str]:
    """The preset as ``key=value`` overrides for ``recipe`` on images of ``smallest_side`` px.

    ``local_crops``: the recipe's number of local views (after the preset's own value, if it sets one);
    their size is half the global view (MCL: the global size), at least one patch.
    """
    coarse = recipe in _COARSE
    size, patch = small_view_size(smallest_side, 4 if coarse else TOKENS_PER_SIDE)
    extra = _PER_RECIPE.get(recipe, [])
    local = size if recipe in _LOCAL_IS_GLOBAL else max(patch, size // 2 // patch * patch)
    width = ["backbone.embed_dim=192", "backbone.num_heads=3"] if coarse else ["backbone.embed_dim=128",
                                                                              "backbone.num_heads=4"]
    out = [*_COMMON, *width, f"backbone.img_size={size}", f"backbone.patch_size={patch}",
           f"views.global_size={size}", *extra]
    if local_crops > 0 or any(o.startswith("views.local_crops=") and not o.endswith("=0") for o in extra):
        out.append(f"views.local_size={local}")
    return out


def auto_applies(sizes: Sequence[tuple[int, int]], overrides: Sequence[str]) -> int | None:
    """The median smallest side of ``sizes`` (``(width, height)`` of sampled images) when ``auto``
    gives the preset, else ``None``: no sizes known, images larger than :data:`SMALL_IMAGE_MAX`, or an
    override that sets a ``backbone.*`` / ``views.*`` key or ``data.allow_upsampling``."""
    if not sizes:
        return None
    if any(o.split("=", 1)[0].strip().startswith(("backbone.", "views.", "data.allow_upsampling")) for o in overrides):
        return None
    side = int(statistics.median(min(w, h) for w, h in sizes))
    return side if side <= SMALL_IMAGE_MAX else None


def apply_preset(cfg: Config, recipe: str, overrides: Sequence[str]) -> tuple[Config, str | None]:
    """``cfg`` (a new run's resolved config) with the preset applied where ``train.preset`` asks for it.

    Reads the sizes of a few images of ``cfg.data.path`` (file headers only). Returns the config (with
    ``train.preset`` resolved to ``small`` or ``none``) and the one line to show when the preset was
    applied (``None`` otherwise). Data that cannot be opened is left to the loader's own checks.
    """
    mode = cfg.train.preset
    if mode == "none":
        return cfg, None
    sizes: list[tuple[int, int]] = []
    if cfg.data.path is not None:
        try:
            sizes = image_sizes(build_dataset(cfg.data.path, root=cfg.data.root), n=16)
        except Exception:  # noqa: BLE001 - a missing or unreadable data set is reported by the loader, in one line
            sizes = []
    if mode == "auto":
        side = auto_applies(sizes, overrides)
    elif not sizes:
        raise ConfigError(f"train.preset=small: the image sizes of {cfg.data.path} cannot be read from the file "
                          "headers; set backbone.* and views.* yourself, or train.preset=none")
    else:
        side = int(statistics.median(min(w, h) for w, h in sizes))
    if side is None:
        return (resolve_config(to_dict(cfg), ["train.preset=none"]) if mode == "auto" else cfg), None
    base = resolve_config(recipe, [])
    local_crops = base.views.local_crops
    extra = preset_overrides(cfg.recipe, side, local_crops)
    for o in extra:
        if o.startswith("views.local_crops="):
            local_crops = int(o.split("=", 1)[1])
    small = resolve_config(recipe, [*extra, *overrides, "train.preset=small"])
    b, v = small.backbone, small.views
    local = f" + {v.local_crops} x {v.local_size} px" if v.local_crops else ""
    line = (f"small-compute preset (images {side} px): ViT {b.depth} x {b.embed_dim}, patch {b.patch_size}, views "
            f"{v.global_crops} x {v.global_size} px{local}, batch {small.data.batch_size}; train.preset=none keeps "
            "the recipe's sizes")
    return small, line
