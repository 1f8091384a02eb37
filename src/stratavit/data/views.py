"""Views: multi-crop augmentation that records every crop's geometry, per sample.

A sample becomes ``global_crops`` global views and ``local_crops`` local views. Each view is an
augmented crop plus its geometry (crop box in source pixels, horizontal flip). The collate
function batches views of the same index into a :class:`ViewBatch`, so a training step sees
boxes ``(B, 4)`` and flips ``(B,)`` as tensors and can compute geometry per sample on the device.

With ``views.resize = R`` every image is first resized to ``R x R`` (aspect ratio not kept) and all
crops are cut from that: boxes and source sizes are then in the resized ``R x R`` frame. Geometry
only ever compares views of the same image, which share that frame.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.geometry import crop_box_from_params


@dataclass
class ViewBatch:
    """Views of one resolution for a batch of ``B`` samples.

    Attributes:
        images: (B, 3, S_h, S_w) normalised images.
        boxes: (B, 4) float32 crop boxes ``(x0, y0, x1, y1)`` in source-image pixels (in the
            ``R x R`` resized image's pixels when ``views.resize = R``).
        flips: (B,) bool, whether the view was mirrored horizontally after cropping.
        source_sizes: (B, 2) float32 source image ``(width, height)``; ``(R, R)`` with ``views.resize = R``.
    """

    images: Tensor
    boxes: Tensor
    flips: Tensor
    source_sizes: Tensor

    @property
    def size(self) -> tuple[int, int]:
        """``(S_h, S_w)`` of the views."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> "ViewBatch":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )


@dataclass
class MultiViewBatch:
    """One training batch: global and local view groups plus labels (unused by training)."""

    global_views: list[ViewBatch]
    local_views: list[ViewBatch]
    labels: Tensor
    indices: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "MultiViewBatch":
        return MultiViewBatch(
            [v.to(device) for v in self.global_views],
            [v.to(device) for v in self.local_views],
            self.labels.to(device),
            self.indices.to(device),
        )


@dataclass
class View:
    """One augmented crop of one image: (3, S, S) tensor, (4,) float32 box ``(x0, y0, x1, y1)``, flip
    flag, source ``(width, height)``. Box and source size are in the frame the crop was cut from:
    the original image, or the ``R x R`` resized one when ``views.resize = R``."""

    image: Tensor
    box: Tensor
    flip: bool
    source_size: tuple[int, int]


def _blur_kernel(size: int) -> int:
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 == 1 else k + 1


class ViewMaker:
    """Makes one kind of view (a size, a scale range, photometric probabilities) from a PIL image."""

    def __init__(
        self,
        cfg: ViewsConfig,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
    ) -> None:
        self.size = size
        self.scale = scale
        self.ratio = cfg.ratio
        self.flip_p = cfg.flip_p
        self.photometric = T.Compose(
            [
                T.RandomApply(
                    [T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                    p=cfg.color_jitter_p,
                ),
                T.RandomGrayscale(p=cfg.grayscale_p),
                T.RandomApply([T.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p),
                T.RandomApply([_Solarize()], p=solarize_p),
            ]
        )
        self.normalize = T.Normalize(cfg.mean, cfg.std)

    def __call__(self, img: Image.Image) -> View:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        out = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        flip = bool(torch.rand(()) < self.flip_p)
        if flip:
            out = F.hflip(out)
        out = self.photometric(out)
        tensor = self.normalize(F.to_tensor(out))
        return View(tensor, crop_box_from_params(top, left, h, w), flip, img.size)


class _Solarize:
    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128)


class MultiCropTransform:
    """PIL image -> (global views, local views), each a :class:`View` with its geometry.

    With ``cfg.resize = R`` the image is first resized to ``R x R`` (bilinear, antialiased, aspect
    ratio not kept) and every view is cropped from that resized image.
    """

    def __init__(self, cfg: ViewsConfig, patch_size: int | None = None) -> None:
        self.resize = cfg.resize
        if patch_size is not None:
            for name, size in (("global_size", cfg.global_size), ("local_size", cfg.local_size)):
                if name == "local_size" and cfg.local_crops == 0:
                    continue
                if size < patch_size:
                    raise ConfigError(
                        f"views.{name}={size} is smaller than one patch ({patch_size} px): "
                        f"raise views.{name} or lower backbone.patch_size"
                    )
                if size % patch_size:
                    raise ConfigError(
                        f"views.{name}={size} is not a multiple of backbone.patch_size={patch_size}; "
                        f"use e.g. {math.ceil(size / patch_size) * patch_size}"
                    )
        self.global_makers = [
            ViewMaker(
                cfg,
                cfg.global_size,
                cfg.global_scale,
                cfg.global_blur_p[i % len(cfg.global_blur_p)] if cfg.global_blur_p else 0.0,
                cfg.global_solarize_p[i % len(cfg.global_solarize_p)] if cfg.global_solarize_p else 0.0,
            )
            for i in range(cfg.global_crops)
        ]
        local = ViewMaker(cfg, cfg.local_size, cfg.local_scale, cfg.local_blur_p, cfg.local_solarize_p)
        self.local_makers = [local] * cfg.local_crops

    def __call__(self, img: Image.Image) -> tuple[list[View], list[View]]:
        img = img.convert("RGB")
        if self.resize is not None and img.size != (self.resize, self.resize):
            img = F.resize(img, [self.resize, self.resize], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        return [m(img) for m in self.global_makers], [m(img) for m in self.local_makers]


def _stack_views(views: Sequence[View]) -> ViewBatch:
    return ViewBatch(
        images=torch.stack([v.image for v in views]),
        boxes=torch.stack([v.box for v in views]),
        flips=torch.tensor([v.flip for v in views], dtype=torch.bool),
        source_sizes=torch.tensor([v.source_size for v in views], dtype=torch.float32),
    )


def collate_views(samples: Sequence[tuple[tuple[list[View], list[View]], int, int]]) -> MultiViewBatch:
    """Collate ``((global_views, local_views), label, index)`` samples into a :class:`MultiViewBatch`."""
    n_global = len(samples[0][0][0])
    n_local = len(samples[0][0][1])
    return MultiViewBatch(
        global_views=[_stack_views([s[0][0][i] for s in samples]) for i in range(n_global)],
        local_views=[_stack_views([s[0][1][i] for s in samples]) for i in range(n_local)],
        labels=torch.tensor([int(s[1]) for s in samples], dtype=torch.long),
        indices=torch.tensor([int(s[2]) for s in samples], dtype=torch.long),
    )


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB")


RESIZE_POLICIES = ("center_crop", "stretch")


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], resize: str = "center_crop") -> Any:
    """Deterministic evaluation transform to ``img_size x img_size``.

    ``resize="center_crop"``: resize the shorter side to ``img_size`` and centre-crop (keeps the
    aspect ratio, loses the borders of non-square images); ``"stretch"``: resize both sides
    (keeps everything, distorts the aspect ratio).
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize policy {resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
    geometry = (
        [T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
        if resize == "center_crop"
        else [T.Resize((img_size, img_size), antialias=True)]
    )
    return T.Compose([_ToRGB(), *geometry, T.ToTensor(), T.Normalize(mean, std)])


def describe_resize(img_size: int, resize: str) -> str:
    """The human-readable resize policy recorded with evaluation results."""
    if resize == "stretch":
        return f"resize to {img_size}x{img_size} (aspect ratio not kept)"
    return f"resize shorter side to {img_size}, centre crop {img_size}x{img_size}"
