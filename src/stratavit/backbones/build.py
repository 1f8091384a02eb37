"""``build_backbone``: the backbone a config names."""

from __future__ import annotations

from torch import nn

from stratavit.backbones.pyramid import PyramidBackbone
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone ``cfg.type`` names: :class:`Backbone` (ViT) or a CNN feature pyramid
    (:class:`~stratavit.backbones.pyramid.PyramidBackbone`); both return :data:`Features`."""
    if cfg.type == "resnet_fpn":
        return PyramidBackbone(cfg)
    return Backbone(cfg)
