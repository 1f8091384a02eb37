"""A detector on a pre-trained backbone: ViTDet's simple feature pyramid (or a CNN's FPN) + torchvision's Faster R-CNN.

ViT (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"): the
last block's patch tokens after the final norm, ``(B, N, C)`` as a grid ``(B, C, H/p, W/p)`` at
stride ``p`` (the patch size), become pyramid levels at strides ``p/4, p/2, p, 2p`` -- two and one
2x2 stride-2 transposed convolutions (LayerNorm + GELU between), the identity, a 2x2 max-pool --
each then a 1x1 and a 3x3 convolution with LayerNorm to the common ``width``
(:class:`SimpleFeaturePyramid`). Levels finer than :data:`MIN_STRIDE` pixels are left out (a
patch-4 ViT gets strides 4 and 8): they add cost, not boxes.

CNN (the body of ``mcl-resnet``, a plain timm CNN): its feature stages (strides 4..32) through a
torchvision ``FeaturePyramidNetwork`` of ``width`` channels. The run's own FPN is not part of the
exported body, so this one starts from scratch and is trained with the heads.

Detector (:func:`build_detector`): torchvision ``FasterRCNN`` with anchors of sizes ``4s`` and
``8s`` (aspect ratios 1:2, 1:1, 2:1) at each level of stride ``s``, ``MultiScaleRoIAlign`` over
the levels, a two-layer 256-wide box head, and ``fixed_size`` = the detection size, so torchvision
does not rescale the ``S x S`` inputs (to its default 800 px). Images go in as ``[0, 1]`` RGB;
torchvision normalises them with the run's mean and std. Proposal and sampling counts are cut
from torchvision's defaults (:data:`DETECTOR_SETTINGS`) to suit small inputs and CPU budgets.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from stratavit.evaluation.tokens import cnn_stages, depth_of, is_cnn, stride_of

__all__ = [
    "DETECTOR_SETTINGS",
    "MIN_STRIDE",
    "DetectionBackbone",
    "SimpleFeaturePyramid",
    "build_detector",
    "pyramid_strides",
    "required_multiple",
]

MIN_STRIDE = 4
"""No pyramid level finer than this many pixels per cell."""
BOX_HEAD_WIDTH = 256
DETECTOR_SETTINGS = {
    "rpn_pre_nms_top_n_train": 1000, "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_train": 500, "rpn_post_nms_top_n_test": 300,
    "box_batch_size_per_image": 128, "box_detections_per_img": 100,
}
"""Faster R-CNN settings changed from torchvision's defaults (2000 / 1000 proposals, 512 sampled RoIs)."""


def pyramid_strides(model: nn.Module) -> list[int]:
    """Strides of the pyramid levels, finest first: a ViT's ``p/4, p/2, p, 2p`` (those >= :data:`MIN_STRIDE`,
    whole numbers), a CNN's stage strides."""
    if is_cnn(model):
        return [s.stride for s in cnn_stages(model)]
    p = stride_of(model)[0]
    return [s for s in (p / 4, p / 2, p, 2 * p) if s >= MIN_STRIDE and float(s).is_integer()]  # type: ignore[misc]


def _upsampler(dim: int, factor: int) -> tuple[nn.Module, int]:
    """``factor`` (2 or 4) x upsampling by transposed convolutions as in ViTDet; returns (module, out channels)."""
    if factor == 2:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
        nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
    ), dim // 4


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-``patch`` map ``(B, dim, h, w)`` -> ``{name: (B, width, h·p/s, w·p/s)}``
    for each stride ``s`` of ``strides`` (each in ``p/4, p/2, p, 2p``)."""

    def __init__(self, dim: int, patch: int, strides: Sequence[int], width: int) -> None:
        super().__init__()
        self.strides = list(strides)
        self.scales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for s in self.strides:
            if s == patch:
                scale, c = nn.Identity(), dim
            elif s == 2 * patch:
                scale, c = nn.MaxPool2d(2, 2), dim
            elif s * 2 == patch or s * 4 == patch:
                scale, c = _upsampler(dim, patch // s)
            else:
                raise ValueError(f"stride {s} is not one of p/4, p/2, p, 2p for the patch size {patch}")
            self.scales.append(scale)
            self.outputs.append(nn.Sequential(
                nn.Conv2d(c, width, 1, bias=False), LayerNorm2d(width),
                nn.Conv2d(width, width, 3, padding=1, bias=False), LayerNorm2d(width),
            ))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((str(i), out(scale(x))) for i, (scale, out) in enumerate(zip(self.scales, self.outputs)))


class DetectionBackbone(nn.Module):
    """The evaluated backbone (``body``: a plain timm ViT or CNN at the detection size) and its pyramid
    (``neck``): images ``(B, 3, S, S)`` normalised -> ``{"0": finest level, ...}``, ``out_channels`` = ``width``.

    ``frozen``: the body runs without gradients (its weights stay as they are)."""

    def __init__(self, body: nn.Module, width: int, frozen: bool) -> None:
        super().__init__()
        self.body, self.frozen, self.out_channels = body, frozen, width
        self.strides = pyramid_strides(body)
        self.cnn = is_cnn(body)
        if self.cnn:
            stages = cnn_stages(body)
            self.indices = [s.index for s in stages]
            self.neck: nn.Module = FeaturePyramidNetwork([s.channels for s in stages], width)
        else:
            self.indices = [depth_of(body) - 1]
            self.neck = SimpleFeaturePyramid(int(body.num_features), stride_of(body)[0], self.strides, width)  # type: ignore[arg-type]
        for p in body.parameters():
            p.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> DetectionBackbone:
        """The neck follows ``mode``; the body stays in eval mode (no dropout, batch-norm statistics kept)."""
        super().train(mode)
        self.body.eval()
        return self

    def _body(self, x: Tensor) -> list[Tensor]:
        kwargs = {"norm": not self.cnn, "output_fmt": "NCHW", "intermediates_only": True}
        return self.body.forward_intermediates(x, indices=self.indices, **kwargs)  # type: ignore[operator]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self._body(x)
        if self.cnn:
            return self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        return self.neck(maps[-1])


def build_detector(body: nn.Module, num_classes: int, size: int, width: int, frozen: bool,
                   mean: Sequence[float], std: Sequence[float]) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` categories (+ background) on ``body`` (at ``size`` px) for ``S x S`` inputs."""
    backbone = DetectionBackbone(body, width, frozen)
    names = [str(i) for i in range(len(backbone.strides))]
    anchors = AnchorGenerator(tuple((4 * s, 8 * s) for s in backbone.strides), ((0.5, 1.0, 2.0),) * len(names))
    return FasterRCNN(
        backbone, num_classes=None, min_size=size, max_size=size, fixed_size=(size, size),
        size_divisible=max(backbone.strides), image_mean=list(mean), image_std=list(std),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(width * 7 * 7, BOX_HEAD_WIDTH),
        box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes + 1),
        **DETECTOR_SETTINGS,
    )


def required_multiple(body: nn.Module) -> int:
    """Detection sizes must be a multiple of this: the coarsest pyramid stride (a multiple of the patch size)."""
    return math.lcm(max(pyramid_strides(body)), stride_of(body)[0]) if not is_cnn(body) else max(pyramid_strides(body))
