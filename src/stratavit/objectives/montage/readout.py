"""Region readout of MCL: RoI-align on a feature pyramid, then a conv neck, one embedding per region.

MCL (Guo et al. 2023) reads montage level ``i`` from pyramid level ``P_{5−i}``, where every tile is
exactly a ``w × w`` window (``w = 7`` at 224 px); a neck shared across levels (4 × conv3x3-BN-ReLU,
``w × w`` average pool, MLP) turns each window into one embedding. Here:

* :func:`roi_features` crops every region with torchvision's ``roi_align`` (``aligned=True``). On
  boxes that fall on the feature grid with ``output = box size in cells`` it returns exactly the
  window (each sample sits on a cell centre); other boxes are resampled bilinearly.
* :class:`SimplePyramid` builds the pyramid of a ViT from its last block (ViTDet's simple feature
  pyramid: strides ``p/4, p/2, p, 2p`` by deconvolution, identity and max-pooling), so a ViT
  gets the same readout. For ViT-S/16 at 224 px: (B, 384, 14, 14) -> (B, 256, 56, 56),
  (B, 256, 28, 28), (B, 256, 14, 14), (B, 256, 7, 7) at strides 4, 8, 16, 32; montage level ``i``
  (tiles of ``224 / 2^i`` px) reads stride ``32 / 2^i``, so every tile is an exact 7 × 7 window, as
  on a ResNet's P5..P2. A CNN backbone (:mod:`stratavit.backbones.pyramid`) brings its own FPN.
* :class:`ConvRegionNeck` is the neck, (M, C, w, w) -> (M, D); :class:`RegionReadout` bundles the
  pyramid (if any) and the neck, so one EMA copy of it is the teacher side.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from stratavit.objectives.heads import moco_mlp


def roi_features(feature: Tensor, boxes: Tensor, stride: int, size: int) -> Tensor:
    """RoI-align every box of every map.

    Args:
        feature: (n, C, h, w) feature maps of stride ``stride`` px.
        boxes: (n, R, 4) ``(x0, y0, x1, y1)`` in input pixels, ``R`` regions per map.
        size: output side (cells).
    Returns:
        (n · R, C, size, size), map-major then region-major.
    """
    n, r = boxes.shape[:2]
    index = torch.arange(n, device=feature.device, dtype=feature.dtype).repeat_interleave(r)[:, None]
    rois = torch.cat([index, boxes.reshape(n * r, 4).to(feature)], dim=1)
    return roi_align(feature, rois, output_size=size, spatial_scale=1.0 / stride, sampling_ratio=-1, aligned=True)


def tile_windows(feature: Tensor, tiles: int) -> Tensor:
    """Cut every map into ``tiles x tiles`` equal windows: (n, C, h, w) -> (n · tiles², C, h / tiles, w / tiles).

    Map-major, then tiles row-major: the order and the values of :func:`roi_features` on the boxes of
    a ``tiles x tiles`` montage when every tile is an exact window (``aligned=True`` RoI-align then
    samples each cell at its centre), without RoI-align's sampling and its scatter in the backward.
    """
    n, c, h, w = feature.shape
    if h % tiles or w % tiles:
        raise ValueError(f"a {h}x{w} map does not split into {tiles}x{tiles} windows")
    x = feature.reshape(n, c, tiles, h // tiles, tiles, w // tiles).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * tiles * tiles, c, h // tiles, w // tiles)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one stride-``p`` map: levels finest first.

    ``num_levels`` levels at strides ``p · 2^(k − num_levels + 2)`` for ``k = 0..num_levels−1``
    (4 levels: ``p/4, p/2, p, 2p``): deconvolutions up, identity, max-pool down; every level then
    gets a 1×1 and a 3×3 convolution with batch norm to ``out_dim`` channels.
    (B, C, gh, gw) -> level ``k``: (B, out_dim, gh · 2^(num_levels − 2 − k), ...).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int, num_levels: int = 4) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError("a pyramid needs at least one level")
        self.scales = [2.0 ** (num_levels - 2 - k) for k in range(num_levels)]  # finest first
        if any(patch_size / s % 1 for s in self.scales):
            raise ValueError(f"patch size {patch_size} cannot be upsampled to {num_levels} pyramid levels")
        self.strides = [int(patch_size / s) for s in self.scales]
        self.levels = nn.ModuleList(self._level(in_dim, out_dim, s) for s in self.scales)

    @staticmethod
    def _level(dim: int, out_dim: int, scale: float) -> nn.Sequential:
        layers: list[nn.Module] = []
        while scale > 1:
            layers += [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
            dim //= 2
            scale /= 2
            if scale > 1:
                layers += [nn.BatchNorm2d(dim), nn.GELU()]
        while scale < 1:
            layers.append(nn.MaxPool2d(2))
            scale *= 2
        layers += [
            nn.Conv2d(dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), nn.BatchNorm2d(out_dim),
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, level: int) -> Tensor:
        """Level ``level`` (0 = finest) of the map ``x`` (B, C, gh, gw)."""
        return self.levels[level](x)


class ConvRegionNeck(nn.Module):
    """MCL's neck: ``convs`` × (conv3x3-BN-ReLU) on each region, average pool, MoCo MLP.

    (M, C, s, s) regions -> (M, out_dim).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, convs: int = 4, mlp_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.mlp = moco_mlp(dim, hidden_dim, out_dim, mlp_layers)

    def forward(self, regions: Tensor) -> Tensor:
        return self.mlp(self.convs(regions).mean(dim=(2, 3)))


class RegionReadout(nn.Module):
    """Pyramid (ViT only) + RoI-align + conv neck: regions of montage canvases -> embeddings.

    Args:
        pyramid: a :class:`SimplePyramid` for a ViT, ``None`` when the backbone is a pyramid.
        strides: stride of every pyramid level, finest first.
        size: RoI output side; ``None`` = the coarsest level's map side of a full view (exact
            windows: MCL's 7 × 7 at 224 px).
    """

    def __init__(self, pyramid: SimplePyramid | None, strides: list[int], neck: ConvRegionNeck, size: int | None) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.strides = list(strides)
        self.neck = neck
        self.size = size

    def window(self, image_size: int) -> int:
        """RoI output side for views of ``image_size`` px."""
        return self.size if self.size is not None else max(1, image_size // self.strides[-1])

    def forward(
        self, maps: list[Tensor] | Tensor, montage_level: int, boxes: Tensor, image_size: int, tiles: int | None = None
    ) -> Tensor:
        """Embeddings of the regions ``boxes`` (n, R, 4) of montage level ``montage_level``.

        Args:
            maps: a ViT's last-block map (n, C, gh, gw), or the pyramid levels of a CNN backbone
                (finest first, each (n, C, h_k, w_k)).
            montage_level: ``i``; it reads pyramid level ``−(i + 1)`` (level 0 the coarsest).
            tiles: ``r`` when ``boxes`` are the ``r x r`` tiling of the whole ``image_size`` view (a
                montage's tiles; 1 = the whole view). Where each tile is then an exact window of the
                read map (the RoI side equals the tile's side in cells), the windows are cut out
                directly (:func:`tile_windows`): RoI-align would return the same values.
        Returns:
            (n · R, out_dim).
        """
        k = len(self.strides) - 1 - montage_level
        if k < 0:
            raise ValueError(f"montage level {montage_level} needs {montage_level + 1} pyramid levels, there are {len(self.strides)}")
        feature = self.pyramid(maps, k) if self.pyramid is not None else maps[k]  # type: ignore[index]
        size, stride = self.window(image_size), self.strides[k]
        h, w = feature.shape[-2:]
        if tiles and h * stride == image_size == w * stride and h % tiles == 0 and h // tiles == size:
            regions = tile_windows(feature, tiles)
        else:
            regions = roi_features(feature, boxes, stride, size)
        return self.neck(regions)
