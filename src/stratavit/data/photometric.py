"""Photometric augmentations on the device, batched, with per-sample random parameters.

With ``views.photometric = "device"`` the loader workers only decode, crop, resize and flip
(:mod:`stratavit.data.views`) and send uint8 crops; :class:`DevicePhotometric` then applies, in the
training step and on the training device, what the loader path applies per image with PIL:

1. colour jitter with probability ``color_jitter_p``: brightness, contrast, saturation and hue,
   each factor uniform in its range, in a random order per sample (torchvision's ``ColorJitter``);
2. grayscale with probability ``grayscale_p`` (three equal channels);
3. Gaussian blur with the view's blur probability, σ ~ U(0.1, 2.0) pixels, computed as PIL's
   ``GaussianBlur(radius=σ)`` in the loader path computes it (:func:`gaussian_blur`);
4. solarize with the view's solarize probability (values ≥ 128/255 become ``1 - value``);
5. normalisation by ``views.mean`` / ``views.std``.

The ops work on float ``(N, 3, H, W)`` images in ``[0, 1]`` with one parameter per sample
(``(N,)``), so a whole view group is one call. Pixel values differ from the PIL path by
rounding: PIL rounds to uint8 after every op (and inside its blur), the device path keeps
float32 throughout.

The random parameters are drawn on the CPU from a ``torch.Generator`` seeded with
:func:`photometric_seed` ``(seed, epoch, batch, rank)``: a step's draws depend only on its
position, so a resumed run draws what the uninterrupted one drew, on any device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stratavit.config import ViewsConfig
from stratavit.data.sampling import mix_seed
from stratavit.data.views import BLUR_SIGMA, SOLARIZE_THRESHOLD, MultiViewBatch, ViewBatch, view_probabilities

__all__ = [
    "DevicePhotometric",
    "Draws",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment",
    "box_kernel",
    "draw",
    "gaussian_blur",
    "grayscale",
    "photometric_seed",
    "separable_blur",
    "solarize",
]

_PHOTOMETRIC = 0xC0  # domain tag of photometric_seed (sampling.py uses 0x0D, 0x5A, 0xBA)

BLUR_PASSES = 3
"""Box blurs per Gaussian blur (PIL's ``GaussianBlur`` uses 3)."""

_BOX_RADIUS = math.floor((math.sqrt(12 * BLUR_SIGMA[1] ** 2 / BLUR_PASSES + 1) - 1) / 2) + 1
BLUR_RADIUS = BLUR_PASSES * _BOX_RADIUS
"""Reach of the blur: 6 px for σ ≤ 2 (three boxes of half-width ≤ 2; also 3σ)."""


def photometric_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of the device photometric draws of training batch ``batch`` of ``epoch`` on ``rank``."""
    return mix_seed(_PHOTOMETRIC, seed, epoch, batch, rank)


# ------------------------------------------------------------------------------------------ ops


def _per_sample(f: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1, 1, 1)``: a per-sample factor that broadcasts over an image batch."""
    return f.reshape(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2, as PIL's "L")."""
    r, g, b = x.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    """``f·x + (1−f)·other`` clamped to ``[0, 1]``; ``f`` is ``(N,)``."""
    f = _per_sample(f)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Scale ``(N, 3, H, W)`` images by ``f`` ``(N,)`` (1 = unchanged), clamped to ``[0, 1]``."""
    return (x * _per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale image by ``f`` ``(N,)`` (1 = unchanged, 0 = flat grey)."""
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Blend each image with its grayscale image by ``f`` ``(N,)`` (1 = unchanged, 0 = grayscale)."""
    return _blend(x, grayscale(x), f)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of ``(N, 3, H, W)`` images by ``shift`` ``(N,)`` turns (in ``[-0.5, 0.5]``; 0 = unchanged).

    Through HSV: value ``v = max(R, G, B)`` and chroma ``c = v − min(R, G, B)`` stay; the hue
    sector ``h ∈ [0, 6)`` moves by ``6·shift``; each channel comes back as
    ``v − c·clamp(min(k, 4 − k), 0, 1)`` with ``k = (n + h) mod 6``, ``n = 5, 3, 1`` for R, G, B.
    """
    r, g, b = x.unbind(dim=1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(c > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 6 * shift.reshape(-1, 1, 1), 6)
    out = [v - c * torch.clamp(torch.minimum(k, 4 - k), 0, 1) for k in (torch.remainder(n + h, 6) for n in (5, 3, 1))]
    return torch.stack(out, dim=1)


def box_kernel(sigma: Tensor) -> Tensor:
    """The extended box filters ``(N, 2·_BOX_RADIUS + 1)`` (float64) whose :data:`BLUR_PASSES`-fold
    repetition is PIL's ``GaussianBlur(radius=σ)`` for ``sigma`` ``(N,)``.

    PIL approximates a Gaussian of standard deviation σ by three *extended box* filters
    (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box
    filtering", SSVM 2011): ``2l + 1`` taps of weight 1 and one tap of weight ``α`` at each end,
    normalised, with the integer ``l`` and ``α ∈ [0, 1)`` chosen so that the box's variance is
    σ²/3; three passes have variance σ² exactly. For σ ≳ 1 that is within 1 % (of the centre
    weight) of a sampled Gaussian; for small σ it blurs as PIL does where a sampled Gaussian
    does nothing (σ = 0.2: 2 % of each pixel goes to each neighbour; a sampled Gaussian: 4e-6).
    """
    s2 = sigma.double().reshape(-1, 1) ** 2 / BLUR_PASSES  # each box's variance
    l = torch.floor((torch.sqrt(12 * s2 + 1) - 1) / 2)  # noqa: E741 (the paper's name)
    alpha = (2 * l + 1) * (s2 - l * (l + 1) / 3) / (2 * ((l + 1) ** 2 - s2))
    x = torch.arange(-_BOX_RADIUS, _BOX_RADIUS + 1, dtype=torch.float64).abs()
    box = torch.where(x <= l, 1.0, torch.where(x == l + 1, alpha, 0.0))
    return box / box.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each of ``(N, C, H, W)`` images as PIL's ``GaussianBlur(radius=sigma[i])`` does:
    :data:`BLUR_PASSES` passes of :func:`box_kernel` along the rows, then along the columns."""
    return separable_blur(x, box_kernel(sigma), passes=BLUR_PASSES)


def separable_blur(x: Tensor, kernel: Tensor, passes: int = 1) -> Tensor:
    """Convolve each of ``(N, C, H, W)`` images ``passes`` times along the rows, then ``passes``
    times along the columns, with its own symmetric 1-D kernel ``(N, K)`` (odd ``K``).

    Each pass is one grouped convolution over all ``N·C`` channels (each channel its sample's
    kernel). Every pass extends the edges with the border pixel, as PIL's box blur does.
    """
    n, ch, h, w = x.shape
    r = kernel.shape[1] // 2
    k = kernel.to(x.device, x.dtype).repeat_interleave(ch, dim=0)  # (N·C, K)
    y = x.reshape(1, n * ch, h, w)
    for pad, weight in (((r, r, 0, 0), k[:, None, None, :]), ((0, 0, r, r), k[:, None, :, None])):
        for _ in range(passes):
            y = F.conv2d(F.pad(y, pad, mode="replicate"), weight, groups=n * ch)
    return y.reshape(n, ch, h, w)


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD / 255) -> Tensor:
    """Invert (``1 − x``) every value ``≥ threshold`` (PIL's ``ImageOps.solarize(img, 128)`` on [0, 1] images)."""
    return torch.where(x >= threshold, 1 - x, x)


def _to_gray3(x: Tensor, _unused: Tensor) -> Tensor:
    return grayscale(x).expand_as(x).contiguous()


def _solarize(x: Tensor, _unused: Tensor) -> Tensor:
    return solarize(x)


JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue,
)
"""The colour jitter ops, indexed as in :attr:`Draws.order`."""


# ------------------------------------------------------------------------------------------ draws


@dataclass
class Draws:
    """The random parameters of ``N`` views (CPU tensors), as the loader path draws them per view."""

    jitter: Tensor
    """(N,) bool: colour jitter applies (probability ``color_jitter_p``)."""
    order: Tensor
    """(N, 4) int64: the jitter ops (indices into :data:`JITTER_OPS`) in the order they apply."""
    factors: Tensor
    """(N, 4) float32: brightness, contrast, saturation factors and the hue shift."""
    gray: Tensor
    """(N,) bool: grayscale (probability ``grayscale_p``)."""
    blur: Tensor
    """(N,) bool: Gaussian blur (the view's blur probability)."""
    sigma: Tensor
    """(N,) float32: the blur's σ in pixels, uniform in :data:`~stratavit.data.views.BLUR_SIGMA`."""
    solarize: Tensor
    """(N,) bool: solarize (the view's solarize probability)."""


def draw(cfg: ViewsConfig, blur_p: Tensor, solarize_p: Tensor, generator: torch.Generator) -> Draws:
    """Draw the parameters of ``N`` views whose blur and solarize probabilities are ``blur_p`` and
    ``solarize_p`` ``(N,)``; the ranges are torchvision ``ColorJitter``'s for ``cfg``'s strengths."""
    n = blur_p.numel()

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    jitter = uniform(n) < cfg.color_jitter_p
    order = uniform(n, 4).argsort(dim=1)
    lo = torch.tensor([max(0.0, 1 - cfg.brightness), max(0.0, 1 - cfg.contrast), max(0.0, 1 - cfg.saturation), -cfg.hue])
    hi = torch.tensor([1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue])
    factors = lo + (hi - lo) * uniform(n, 4)
    gray = uniform(n) < cfg.grayscale_p
    blur = uniform(n) < blur_p
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * uniform(n)
    solar = uniform(n) < solarize_p
    return Draws(jitter, order, factors, gray, blur, sigma, solar)


def _plan(d: Draws) -> list[tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]]:
    """The ops in the order they apply, each with the samples it applies to and their parameter (CPU)."""
    steps = []
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            idx = torch.nonzero(d.jitter & (d.order[:, position] == op_index)).flatten()
            steps.append((op, idx, d.factors[idx, op_index]))
    for op, flags, param in ((_to_gray3, d.gray, d.sigma), (gaussian_blur, d.blur, d.sigma), (_solarize, d.solarize, d.sigma)):
        idx = torch.nonzero(flags).flatten()
        steps.append((op, idx, param[idx]))
    return steps


def augment(images: Tensor, d: Draws, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Apply the draws ``d`` to ``(N, 3, H, W)`` images (uint8, or float in ``[0, 1]``) and normalise.

    Returns float32 ``(N, 3, H, W)``. Each op runs once on the samples it applies to; which
    those are was decided on the CPU, so nothing waits on the device. The indices and
    parameters travel to the device as one tensor each.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clone()
    steps = _plan(d)
    sizes = [len(idx) for _, idx, _ in steps]
    indices = torch.cat([idx for _, idx, _ in steps]).to(x.device, non_blocking=True).split(sizes)
    params = torch.cat([p for _, _, p in steps]).to(x.device, non_blocking=True).split(sizes)
    for (op, _, _), idx, p, size in zip(steps, indices, params, sizes):
        if size:
            x[idx] = op(x[idx], p)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------ batches


class DevicePhotometric:
    """``views.photometric = "device"``: finish a :class:`MultiViewBatch` of uint8 crops on its device.

    The global views (each with its own blur / solarize probability) go through :func:`augment`
    as one group, then the local views as another; parameters are drawn per sample, global
    views first, from one generator seeded per batch (:func:`photometric_seed`).
    """

    def __init__(self, cfg: ViewsConfig) -> None:
        self.cfg = cfg
        self.global_p, self.local_p = view_probabilities(cfg)

    def __call__(self, batch: MultiViewBatch, seed: int, dtype: torch.dtype = torch.float32) -> MultiViewBatch:
        """The batch with normalised ``dtype`` images; boxes, flips, labels and indices unchanged."""
        gen = torch.Generator().manual_seed(seed)
        g = self._group(batch.global_views, [self.global_p[i] for i in range(len(batch.global_views))], gen, dtype)
        loc = self._group(batch.local_views, [self.local_p] * len(batch.local_views), gen, dtype)
        return dataclasses.replace(batch, global_views=g, local_views=loc)

    def _group(
        self, views: list[ViewBatch], probs: list[tuple[float, float]], gen: torch.Generator, dtype: torch.dtype
    ) -> list[ViewBatch]:
        if not views:
            return []
        if views[0].images.dtype != torch.uint8:  # normalised twice otherwise
            raise ValueError(
                f"views.photometric=device finishes the loader's uint8 crops, but this batch holds "
                f"{views[0].images.dtype} images (already augmented?): build the loader from the same config"
            )
        b = views[0].images.shape[0]
        blur_p = torch.tensor([p for p, _ in probs]).repeat_interleave(b)
        solarize_p = torch.tensor([p for _, p in probs]).repeat_interleave(b)
        d = draw(self.cfg, blur_p, solarize_p, gen)
        out = augment(torch.cat([v.images for v in views]), d, self.cfg.mean, self.cfg.std).to(dtype)
        return [dataclasses.replace(v, images=o) for v, o in zip(views, out.split(b))]
