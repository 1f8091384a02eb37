"""Views: multi-crop augmentation that records every crop's geometry, per sample.

A sample becomes ``global_crops`` global views and ``local_crops`` local views. Each view is an
augmented crop plus its geometry (crop box in source pixels, horizontal flip). The collate
function batches views of the same index into a :class:`ViewBatch`, so a training step sees
boxes ``(B, 4)`` and flips ``(B,)`` as tensors and can compute geometry per sample on the device.

With ``views.resize = R`` every image is first resized to ``R x R`` (aspect ratio not kept) and all
crops are cut from that: boxes and source sizes are then in the resized ``R x R`` frame. Geometry
only ever compares views of the same image, which share that frame.

Each view is made in two parts: its geometry (crop box, resize, flip), drawn for every view of a
sample first, then its photometric augmentation (colour jitter, grayscale, blur, solarize) and
normalisation. With ``views.photometric = "device"`` the loader stops after the geometry and
sends uint8 crops; :mod:`stratavit.data.photometric` does the rest in the training step. The crops
and flips are then the same as the loader path's for the same seed.

**Blur.** The loader path blurs as the authors' code does (DINO's and iBOT's ``GaussianBlur``,
LightlySSL's): PIL's ``ImageFilter.GaussianBlur(radius=σ)`` with σ ~ U(0.1, 2.0). PIL's
``radius`` is the Gaussian's standard deviation σ in pixels, not a kernel radius; Pillow
approximates the Gaussian with three box blurs, extending the edges. torchvision's
``GaussianBlur(kernel_size, sigma)`` takes the same σ but computes the Gaussian exactly inside a
fixed ``kernel_size`` window (the older stratavit views used ``kernel_size = 0.1·view size``,
23 px at 224, with reflected edges); the results look the same, but on a PIL image it is ~30×
slower (74 ms against 2.3 ms per 224-px view on one core). ``MultiCropTransform(...,
blur=torchvision_blur)`` still builds that blur (benchmarks, comparisons).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.geometry import crop_box_from_params


@dataclass
class ViewBatch:
    """Views of one resolution for a batch of ``B`` samples.

    Attributes:
        images: (B, 3, S_h, S_w) normalised float images; with ``views.photometric = "device"``,
            uint8 crops from the loader until the training step finishes them
            (:class:`stratavit.data.photometric.DevicePhotometric`).
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
    """One augmented crop of one image: (3, S, S) tensor (normalised float, or uint8 with
    ``views.photometric = "device"``), (4,) float32 box ``(x0, y0, x1, y1)``, flip
    flag, source ``(width, height)``. Box and source size are in the frame the crop was cut from:
    the original image, or the ``R x R`` resized one when ``views.resize = R``."""

    image: Tensor
    box: Tensor
    flip: bool
    source_size: tuple[int, int]


BLUR_SIGMA = (0.1, 2.0)
"""Range of the blur's σ in pixels (DINO, iBOT, MoCo v3, SimCLR)."""

SOLARIZE_THRESHOLD = 128
"""Values ``>= 128`` (of 255) are inverted (PIL's ``ImageOps.solarize`` default)."""

PILImageOp = Callable[[Image.Image], Image.Image]


class PILGaussianBlur:
    """Blur a PIL image with PIL's ``GaussianBlur(radius=σ)``, σ ~ U(``sigma``), drawn from torch's RNG."""

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def pil_blur(size: int) -> PILImageOp:
    """The default blur of a ``size``-px view: :class:`PILGaussianBlur` (the authors' choice; any size)."""
    return PILGaussianBlur(BLUR_SIGMA)


def torchvision_blur(size: int) -> PILImageOp:
    """The blur stratavit's views used before: torchvision's ``GaussianBlur`` with a kernel of
    ``0.1·size`` px (odd, ≥ 3), σ ~ U(0.1, 2.0). Same σ, ~30× slower on PIL images."""
    k = max(3, int(round(0.1 * size)))
    return T.GaussianBlur(k if k % 2 == 1 else k + 1, sigma=BLUR_SIGMA)


def view_probabilities(cfg: ViewsConfig) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """``(blur_p, solarize_p)`` of every global view (``cfg.global_blur_p`` / ``global_solarize_p``
    cycled; empty lists mean 0) and of the local views."""
    def cycled(ps: list[float], i: int) -> float:
        return ps[i % len(ps)] if ps else 0.0

    globals_ = [(cycled(cfg.global_blur_p, i), cycled(cfg.global_solarize_p, i)) for i in range(cfg.global_crops)]
    return globals_, (cfg.local_blur_p, cfg.local_solarize_p)


@dataclass
class Crop:
    """A view's geometry and its pixels before any photometric change: the resized, flipped crop
    (PIL), its (4,) float32 box ``(x0, y0, x1, y1)``, flip flag and source ``(width, height)``."""

    image: Image.Image
    box: Tensor
    flip: bool
    source_size: tuple[int, int]


class ViewMaker:
    """Makes one kind of view (a size, a scale range, photometric probabilities) from a PIL image.

    ``blur`` builds the blur for the view size (default :func:`pil_blur`, the authors' blur;
    :func:`torchvision_blur` is the older, slower one). With ``cfg.photometric = "device"`` the
    view is the uint8 crop: no photometric change, no normalisation.
    """

    def __init__(
        self,
        cfg: ViewsConfig,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        blur: Callable[[int], PILImageOp] = pil_blur,
    ) -> None:
        self.size = size
        self.scale = scale
        self.ratio = cfg.ratio
        self.flip_p = cfg.flip_p
        self.on_device = cfg.photometric == "device"
        self.photometric = T.Compose(
            [
                T.RandomApply(
                    [T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                    p=cfg.color_jitter_p,
                ),
                T.RandomGrayscale(p=cfg.grayscale_p),
                T.RandomApply([blur(size)], p=blur_p),
                T.RandomApply([_Solarize()], p=solarize_p),
            ]
        )
        self.normalize = T.Normalize(cfg.mean, cfg.std)

    def crop(self, img: Image.Image) -> Crop:
        """The view's geometry (draws the crop box and the flip) and its resized, flipped crop."""
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        out = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        flip = bool(torch.rand(()) < self.flip_p)
        if flip:
            out = F.hflip(out)
        return Crop(out, crop_box_from_params(top, left, h, w), flip, img.size)

    def finish(self, crop: Crop) -> View:
        """The view of a crop: photometric augmentation (draws) and normalisation, or, with
        ``photometric = "device"``, the (3, S, S) uint8 crop as it is."""
        if self.on_device:
            return View(F.pil_to_tensor(crop.image), crop.box, crop.flip, crop.source_size)
        tensor = self.normalize(F.to_tensor(self.photometric(crop.image)))
        return View(tensor, crop.box, crop.flip, crop.source_size)

    def __call__(self, img: Image.Image) -> View:
        return self.finish(self.crop(img))


class _Solarize:
    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, SOLARIZE_THRESHOLD)


class MultiCropTransform:
    """PIL image -> (global views, local views), each a :class:`View` with its geometry.

    With ``cfg.resize = R`` the image is first resized to ``R x R`` (bilinear, antialiased, aspect
    ratio not kept) and every view is cropped from that resized image. The geometry of every
    view is drawn before any photometric draw, so the crops and flips do not depend on
    ``cfg.photometric``. ``blur``: see :class:`ViewMaker`.
    """

    def __init__(
        self, cfg: ViewsConfig, patch_size: int | None = None, blur: Callable[[int], PILImageOp] = pil_blur
    ) -> None:
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
        global_p, (local_blur_p, local_solarize_p) = view_probabilities(cfg)
        self.global_makers = [
            ViewMaker(cfg, cfg.global_size, cfg.global_scale, blur_p, solarize_p, blur)
            for blur_p, solarize_p in global_p
        ]
        local = ViewMaker(cfg, cfg.local_size, cfg.local_scale, local_blur_p, local_solarize_p, blur)
        self.local_makers = [local] * cfg.local_crops

    def __call__(self, img: Image.Image) -> tuple[list[View], list[View]]:
        img = img.convert("RGB")
        if self.resize is not None and img.size != (self.resize, self.resize):
            img = F.resize(img, [self.resize, self.resize], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        makers = self.global_makers + self.local_makers
        crops = [m.crop(img) for m in makers]  # every view's geometry first: the same in both photometric modes
        views = [m.finish(c) for m, c in zip(makers, crops)]
        n = len(self.global_makers)
        return views[:n], views[n:]


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
