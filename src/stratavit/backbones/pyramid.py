"""PyramidBackbone: a timm CNN (``features_only``) + torchvision's FPN, for MCL's original setting.

Levels are the pyramid outputs, finest first: level ``i`` (1-based) is ``P_{i+1}`` of a ResNet
(level 1 = P2 at stride 4, level 4 = P5 at stride 32); ``-1`` is the coarsest. Each level is
returned as :class:`~stratavit.backbones.features.LevelFeatures` so objectives read it like a ViT level:

* ``patches`` (B, h·w, C): the FPN map flattened row-major over ``grid = (h, w)``;
* ``cls`` (B, C): the global average of that map (a CNN has no class token);
* ``norm`` is the identity (pre- and post-norm tokens are the same).

``patch_size`` is the coarsest stride (32 for a ResNet): views must be a multiple of it so that
every level's grid is whole. ViT-only features (masked image modelling, attention heads) raise a
:class:`~stratavit.config.ConfigError` naming the ViT alternative.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import timm
import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from stratavit.backbones.features import (
    Features,
    LevelFeatures,
    resolve_level,
)
from stratavit.config import BackboneConfig, ConfigError

VIT_ONLY_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def pyramid_timm_kwargs(cfg: BackboneConfig) -> dict[str, object]:
    """Keyword arguments that rebuild the exported body as a plain timm model (no classifier)."""
    return {"num_classes": 0}


class PyramidBackbone(nn.Module):
    """timm CNN body + FPN: ``forward(x, levels)`` -> :data:`~stratavit.backbones.features.Features`.

    Args:
        cfg: ``cfg.type == "resnet_fpn"``; ``cfg.arch`` any timm CNN with 4 feature stages after
            the stem (``resnet50``, ``resnet18``, ...); ``cfg.fpn_dim`` the FPN width.
    Attributes:
        body: the timm ``features_only`` model; its state dict loads into
            ``timm.create_model(cfg.arch, num_classes=0)`` (what ``export`` writes).
        fpn: torchvision ``FeaturePyramidNetwork`` with batch norm (MCL's neck).
        strides: the stride of every level, finest first.
    """

    is_pyramid = True  # levels are pyramid levels with their own strides (see FeatureBackbone)

    teacher_batch_stats = True
    """The EMA teacher runs this backbone in training mode (batch statistics), as MoCo's key encoder."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        wrong = [n for n in VIT_ONLY_FIELDS if getattr(cfg, n) is not None]
        if cfg.pos_embed != "learned":
            wrong.append("pos_embed")
        if cfg.freeze_patch_embed:
            wrong.append("freeze_patch_embed")
        if wrong:
            raise ConfigError(
                f"backbone.type=resnet_fpn has no {', '.join('backbone.' + w for w in wrong)} "
                "(those are ViT settings); remove them or use backbone.type=vit"
            )
        try:
            self.body = timm.create_model(
                cfg.arch, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4),
                drop_path_rate=cfg.drop_path_rate,
            )
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(
                f"backbone.arch={cfg.arch!r} cannot be built as a CNN feature pyramid ({e}); "
                "use a timm CNN with 4 stages such as resnet50 or resnet18"
            ) from None
        info = self.body.feature_info
        self.strides = [int(r) for r in info.reduction()]
        if any(b != 2 * a for a, b in zip(self.strides, self.strides[1:])):
            raise ConfigError(
                f"backbone.arch={cfg.arch!r}: feature strides {self.strides} do not double from level to "
                "level; a feature pyramid needs strides like 4, 8, 16, 32"
            )
        self.fpn = FeaturePyramidNetwork(list(info.channels()), cfg.fpn_dim, norm_layer=nn.BatchNorm2d)
        self._identity = nn.Identity()

    @property
    def embed_dim(self) -> int:
        return int(self.cfg.fpn_dim)

    @property
    def depth(self) -> int:
        """Number of pyramid levels."""
        return len(self.strides)

    @property
    def patch_size(self) -> int:
        """The coarsest stride: input sizes must be a multiple of it."""
        return self.strides[-1]

    @property
    def img_size(self) -> int:
        return 224

    @property
    def num_heads(self) -> int:
        raise ConfigError("this objective reads attention heads, which a CNN backbone has not; use backbone.type=vit")

    def resolve_level(self, level: int) -> int:
        """Map a level (1..depth, or negative from the end) to 1..depth, or raise ConfigError."""
        return resolve_level(level, self.depth, "level feature pyramid")

    def forward(
        self,
        x: Tensor,
        levels: Sequence[int] = (-1,),
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> Features:
        """Images (B, 3, H, W) -> the requested pyramid levels, ``tokens_pre`` (B, 1 + h·w, C).

        ``H`` and ``W`` must be multiples of :attr:`patch_size`.
        """
        if mask is not None:
            raise ConfigError("masked image modelling needs a ViT backbone (backbone.type=vit)")
        s = self.patch_size
        if x.shape[-1] % s or x.shape[-2] % s:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the coarsest stride {s}")
        wanted = {self.resolve_level(lv) for lv in levels}
        maps = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x), start=1)))
        out: Features = {}
        for lv in sorted(wanted):
            m = maps[str(lv)]  # (B, C, h, w)
            flat = m.flatten(2).transpose(1, 2)  # (B, h·w, C)
            tokens = torch.cat([flat.mean(dim=1, keepdim=True), flat], dim=1)
            out[lv] = LevelFeatures(tokens, (int(m.shape[-2]), int(m.shape[-1])), self._identity)
        for lv in levels:
            out[lv] = out[self.resolve_level(lv)]
        return out

