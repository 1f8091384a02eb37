"""Device-side photometric augmentation (views.photometric=device) against the loader path and the references."""

from __future__ import annotations

import colorsys
import csv
import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF1
import torchvision.transforms.v2.functional as TF
from conftest import TINY
from PIL import Image, ImageFilter, ImageOps

from stratavit.config import ViewsConfig
from stratavit.data import photometric as P
from stratavit.data.sampling import sample_seed, seeded_rng
from stratavit.data.views import BLUR_SIGMA, MultiCropTransform, MultiViewBatch, collate_views

HORSES = Path.home() / ".cache" / "stratavit-tests" / "weizmann-horses" / "train" / "images"


@pytest.fixture(scope="module")
def photo(horses_dir) -> Image.Image:
    """A real photograph (a Weizmann horse), 64 x 64."""
    path = sorted((horses_dir / "train" / "images").iterdir())[3]
    return Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR)


def _unit(img: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float in [0, 1]."""
    return TF1.pil_to_tensor(img)[None].float() / 255


def _levels(x: torch.Tensor, ref: Image.Image) -> torch.Tensor:
    """|x·255 − ref| in uint8 levels, (3, H, W)."""
    return (x[0] * 255 - TF1.pil_to_tensor(ref).float()).abs()


# ----------------------------------------------------------------------------------------- ops


def test_ops_match_torchvision_tensor_ops_per_sample():
    """Each op on a batch with one parameter per sample equals torchvision's op image by image.

    Tolerances: 1e-5 where the formulas are the same; 2e-4 where torchvision's luma weights
    (0.2989, 0.587, 0.114) differ from PIL's (0.299, 0.587, 0.114) that stratavit uses.
    """
    torch.manual_seed(0)
    x = torch.rand(4, 3, 24, 30)
    f = torch.tensor([0.6, 1.0, 1.3, 0.0])
    shift = torch.tensor([-0.5, -0.1, 0.0, 0.37])
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    cases = [
        (P.adjust_brightness(x, f), [TF.adjust_brightness(x[i], float(f[i])) for i in range(4)], 1e-6),
        (P.adjust_contrast(x, f), [TF.adjust_contrast(x[i], float(f[i])) for i in range(4)], 2e-4),
        (P.adjust_saturation(x, f), [TF.adjust_saturation(x[i], float(f[i])) for i in range(4)], 2e-4),
        (P.adjust_hue(x, shift), [TF.adjust_hue(x[i], float(shift[i])) for i in range(4)], 1e-5),
        (P.grayscale(x), [TF.rgb_to_grayscale(x[i]) for i in range(4)], 2e-4),
        (P.solarize(x), [TF.solarize(x[i], 128 / 255) for i in range(4)], 0.0),
    ]
    for mine, ref, tol in cases:
        assert torch.allclose(mine, torch.stack(ref), atol=tol, rtol=0)
    # the separable per-sample convolution, given torchvision's sampled 13-tap Gaussians: the same
    # away from the border (torchvision reflects the edges, stratavit extends them as PIL does)
    r = P.BLUR_RADIUS
    t = torch.arange(-r, r + 1.0)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    blurred = P.separable_blur(x, kernel / kernel.sum(1, keepdim=True))
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [2 * r + 1] * 2, [float(sigma[i])] * 2)
        assert torch.allclose(blurred[i, :, r:-r, r:-r], ref[:, r:-r, r:-r], atol=1e-5, rtol=0)
    # PIL's kernel: variance σ² exactly; per sample, the batched call is each image's call on its own
    box = P.box_kernel(sigma)
    offsets = torch.arange(-(box.shape[1] // 2), box.shape[1] // 2 + 1.0).double()
    assert torch.allclose((box * offsets**2).sum(1) * P.BLUR_PASSES, sigma.double() ** 2, atol=1e-9)
    blurred = P.gaussian_blur(x, sigma)
    for i in range(4):
        assert torch.allclose(P.gaussian_blur(x[i : i + 1], sigma[i : i + 1]), blurred[i : i + 1], atol=1e-6)
        assert torch.allclose(P.adjust_hue(x[i : i + 1], shift[i : i + 1]), P.adjust_hue(x, shift)[i : i + 1], atol=1e-6)


def test_ops_match_pil_on_a_photograph(photo):
    """Against the PIL ops the loader path runs (torchvision's functional ops on PIL images).

    PIL rounds to uint8 inside every op: brightness, contrast, saturation and grayscale agree to
    ≤ 1 level; PIL's hue works on uint8 HSV (hue in 1/256 turns): ≤ 8 levels, ≤ 1 on average;
    solarize is exact. The blur computes PIL's three extended box blurs (PIL rounds its
    fixed-point sums in each): ≤ 3.5 levels, ≤ 1 on average, for σ across the range.
    """
    x = _unit(photo)
    for f in (0.6, 1.4):
        t = torch.tensor([f])
        assert _levels(P.adjust_brightness(x, t), TF1.adjust_brightness(photo, f)).max() <= 1.0
        assert _levels(P.adjust_contrast(x, t), TF1.adjust_contrast(photo, f)).max() <= 1.0
        assert _levels(P.adjust_saturation(x, t), TF1.adjust_saturation(photo, f)).max() <= 1.0
    for shift in (-0.1, 0.05, 0.5):
        d = _levels(P.adjust_hue(x, torch.tensor([shift])), TF1.adjust_hue(photo, shift))
        assert d.max() <= 8 and d.mean() <= 1.0
    assert _levels(P.grayscale(x).expand(1, 3, 64, 64), photo.convert("L").convert("RGB")).max() <= 0.5 + 1e-4
    assert _levels(P.solarize(x), ImageOps.solarize(photo, 128)).max() <= 1e-3
    for sigma in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0):
        d = _levels(P.gaussian_blur(x, torch.tensor([sigma])), photo.filter(ImageFilter.GaussianBlur(radius=sigma)))
        assert d.max() <= 3.5 and d.mean() <= 1.0, sigma


def _draws(n: int, **fields) -> P.Draws:
    none = torch.zeros(n, dtype=torch.bool)
    base = P.Draws(none, torch.arange(4).repeat(n, 1), torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
                   none, none, torch.ones(n), none)
    return dataclasses.replace(base, **fields)


def test_augment_applies_exactly_the_draws_in_their_order():
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16)
    x[1] = x[0]  # the same image in two orders
    u8 = (x * 255).round().to(torch.uint8)
    xf = u8.float() / 255
    identity = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.equal(P.augment(u8, _draws(3), **identity), xf)  # nothing drawn: the crops, scaled
    factors = torch.tensor([[1.5, 0.5, 1.0, 0.0]] * 3)
    on = torch.tensor([True, True, False])
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 2, 3]])  # sample 1: contrast before brightness
    out = P.augment(u8, _draws(3, jitter=on, order=order, factors=factors), **identity)
    one = torch.ones(1)
    assert torch.allclose(out[0:1], P.adjust_contrast(P.adjust_brightness(xf[0:1], 1.5 * one), 0.5 * one))
    assert torch.allclose(out[1:2], P.adjust_brightness(P.adjust_contrast(xf[1:2], 0.5 * one), 1.5 * one))
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the order matters
    assert torch.equal(out[2], xf[2])  # jitter off
    # grayscale, then blur, then solarize; then normalisation
    d = _draws(3, gray=torch.tensor([True, False, True]), blur=torch.tensor([True, True, False]),
               sigma=torch.tensor([0.5, 2.0, 1.0]), solarize=torch.tensor([False, True, True]))
    out = P.augment(u8, d, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    m, s = torch.tensor([0.5, 0.4, 0.3]).reshape(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).reshape(3, 1, 1)
    expected = [
        P.gaussian_blur(P.grayscale(xf[0:1]).expand(1, 3, 16, 16), torch.tensor([0.5]))[0],
        P.solarize(P.gaussian_blur(xf[1:2], torch.tensor([2.0])))[0],
        P.solarize(P.grayscale(xf[2:3]).expand(1, 3, 16, 16))[0],
    ]
    for i in range(3):
        assert torch.allclose(out[i], (expected[i] - m) / s, atol=1e-5)


def test_draws_are_a_function_of_the_seed_and_the_position():
    cfg = ViewsConfig()
    p = torch.full((64,), 0.5)
    a = P.draw(cfg, p, p, torch.Generator().manual_seed(P.photometric_seed(0, 1, 2, 0)))
    b = P.draw(cfg, p, p, torch.Generator().manual_seed(P.photometric_seed(0, 1, 2, 0)))
    c = P.draw(cfg, p, p, torch.Generator().manual_seed(P.photometric_seed(0, 1, 3, 0)))
    assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    assert not torch.equal(a.factors, c.factors)
    assert len({P.photometric_seed(0, 0, 0, 0), P.photometric_seed(0, 0, 0, 1), P.photometric_seed(0, 1, 0, 0),
                P.photometric_seed(1, 0, 0, 0), P.photometric_seed(0, 0, 1, 0)}) == 5
    assert sorted(a.order[0].tolist()) == [0, 1, 2, 3]
    many = P.draw(cfg, torch.zeros(4000), torch.zeros(4000), torch.Generator().manual_seed(0))
    first = torch.bincount(many.order[:, 0], minlength=4) / 4000  # each op comes first a quarter of the time
    assert (first - 0.25).abs().max() < 5 * (0.25 * 0.75 / 4000) ** 0.5
    assert (many.order.sort(dim=1).values == torch.arange(4)).all()  # every row a permutation
    lo, hi = a.factors.min(0).values, a.factors.max(0).values
    assert (lo >= torch.tensor([0.6, 0.6, 0.8, -0.1])).all() and (hi <= torch.tensor([1.4, 1.4, 1.2, 0.1])).all()
    assert (a.sigma >= BLUR_SIGMA[0]).all() and (a.sigma <= BLUR_SIGMA[1]).all()


# ----------------------------------------------------------------------------------------- both paths


_WHOLE = dict(global_size=16, local_size=16, local_crops=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
              ratio=(1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
"""Every view is the whole 16 x 16 image (only the flip varies); values stay in [0, 1]."""


def _batch(cfg: ViewsConfig, img: Image.Image, n: int, seed: int = 5) -> MultiViewBatch:
    """``n`` samples of ``img`` through the training transform, each under its own sample seed;
    with ``photometric=device`` then through :class:`DevicePhotometric` (one batch)."""
    tf = MultiCropTransform(cfg, patch_size=4)
    samples = []
    for i in range(n):
        with seeded_rng(sample_seed(seed, 0, i)):
            samples.append((tf(img), 0, i))
    batch = collate_views(samples)
    if cfg.photometric == "device":
        assert batch.global_views[0].images.dtype == torch.uint8  # what the loader sends
        batch = P.DevicePhotometric(cfg)(batch, seed=P.photometric_seed(seed, 0, 0, 0))
    return batch


def _views(batch: MultiViewBatch) -> list[torch.Tensor]:
    """(n, 3, 16, 16) images in uint8 levels, by view index: global 0, global 1, local 0, local 1."""
    return [v.images * 255 for v in batch.global_views + batch.local_views]


N = 2000
"""Samples per path; a fraction's standard error is at most 0.5 / sqrt(N) = 0.011."""


def _within(fraction: float, p: float, n: int = N) -> bool:
    """``fraction`` of ``n`` draws is within 5 standard errors of ``p`` (or 0.005 where p is 0 or 1)."""
    return abs(fraction - p) <= max(5 * (p * (1 - p) / n) ** 0.5, 0.005)


@pytest.mark.parametrize("where", ["loader", "device"])
def test_both_paths_grayscale_and_solarize_at_the_configured_rates(where):
    """A flat (200, 60, 120) image, no colour jitter: a grayscale view has equal channels; a
    solarized colour view has R = 255 − 200 = 55 (G and B stay below the threshold)."""
    cfg = ViewsConfig(**_WHOLE, color_jitter_p=0.0, photometric=where)  # grayscale 0.2; solarize 0, 0.2, local 0
    views = _views(_batch(cfg, Image.new("RGB", (16, 16), (200, 60, 120)), N))
    for i, solarize_p in enumerate([0.0, 0.2, 0.0, 0.0]):
        v = views[i][:, :, 8, 8]  # (N, 3); blur leaves a flat image flat
        gray = (v.max(1).values - v.min(1).values) < 1
        assert _within(float(gray.float().mean()), 0.2), (where, i)
        solarized = (v[~gray, 0] - 55).abs() < 1
        assert (solarized | ((v[~gray, 0] - 200).abs() < 1)).all()
        assert _within(float(solarized.float().mean()), solarize_p), (where, i)


@pytest.mark.parametrize("where", ["loader", "device"])
def test_both_paths_blur_at_the_configured_rates(where):
    """A black | white edge: a view is visibly blurred (a pixel more than 2 levels from 0 and 255)
    when the blur applied with σ above about 0.15. The expected rate is the view's blur
    probability times P(σ > σ₀), σ₀ measured with :func:`gaussian_blur`; PIL's rounding may move
    σ₀ a little: ±0.02 allowed on top of 5 standard errors."""
    cfg = ViewsConfig(**_WHOLE, color_jitter_p=0.0, grayscale_p=0.0, global_solarize_p=[0.0], photometric=where)
    edge = Image.new("RGB", (16, 16))
    edge.paste((255, 255, 255), (8, 0, 16, 16))
    sigmas = torch.linspace(*BLUR_SIGMA, 1901)
    x = _unit(edge).expand(len(sigmas), 3, 16, 16)
    level = P.gaussian_blur(x, sigmas) * 255
    visible = (torch.minimum(level, 255 - level).flatten(1).max(1).values > 2).float().mean()
    views = _views(_batch(cfg, edge, N))
    for i, blur_p in enumerate([1.0, 0.1, 0.5, 0.5]):
        v = views[i]
        rate = float((torch.minimum(v, 255 - v).flatten(1).max(1).values > 2).float().mean())
        expected = blur_p * float(visible)
        assert abs(rate - expected) <= 5 * (expected * (1 - expected) / N) ** 0.5 + 0.02, (where, i, rate, expected)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _jitter_effects(where: str) -> dict[str, torch.Tensor]:
    """Every jitter parameter, read back from the views of two flat test images (no clamping occurs).

    Grey halves 100 | 140, full jitter: saturation and hue leave grey alone; brightness ``b`` and
    contrast ``c`` (in either order) give halves ``120·b ∓ 20·b·c``. A flat colour (150, 100, 80),
    saturation and hue only: the hue moves by the hue shift, the chroma (max − min) scales by the
    saturation factor (in either order: a hue rotation keeps max and min).
    """
    cfg = ViewsConfig(**_WHOLE, grayscale_p=0.0, global_blur_p=[0.0], local_blur_p=0.0, global_solarize_p=[0.0],
                      photometric=where)
    halves = Image.new("RGB", (16, 16), (100, 100, 100))
    halves.paste((140, 140, 140), (8, 0, 16, 16))
    v = torch.cat(_views(_batch(cfg, halves, 600)))[:, 0]  # (2400, 16, 16): one channel of every view
    sides = torch.stack([v[:, :, :8].mean((1, 2)), v[:, :, 8:].mean((1, 2))], dim=1).sort(dim=1).values
    brightness = sides.mean(1) / 120
    contrast = (sides[:, 1] - sides[:, 0]) / 40 / brightness
    colour_only = dataclasses.replace(cfg, brightness=0.0, contrast=0.0)
    c = torch.cat(_views(_batch(colour_only, Image.new("RGB", (16, 16), (150, 100, 80)), 600)))[:, :, 8, 8] / 255
    hue = torch.tensor([colorsys.rgb_to_hsv(*px)[0] for px in c.tolist()])
    shift = torch.remainder(hue - colorsys.rgb_to_hsv(150 / 255, 100 / 255, 80 / 255)[0] + 0.5, 1) - 0.5
    saturation = (c.max(1).values - c.min(1).values) * 255 / 70
    return {"brightness": brightness, "contrast": contrast, "hue": shift, "saturation": saturation}


def test_both_paths_jitter_alike():
    """Colour jitter (p 0.8; brightness and contrast U(0.6, 1.4), saturation U(0.8, 1.2), hue
    U(−0.1, 0.1)) read back per view from 2 × 2,400 views per path: each path matches the
    configured distribution (rates within 5 standard errors; means and standard deviations of
    the jittered views within 0.02 of U(0.6, 1.4)'s 1 and 0.231, 0.01 of U(0.8, 1.2)'s 1 and
    0.115, 0.006 of U(−0.1, 0.1)'s 0 and 0.058), and the two paths match each other (two-sample
    KS statistic ≤ 0.07; 0.056 is the 0.1 % critical value)."""
    effects = {where: _jitter_effects(where) for where in ("loader", "device")}
    for where, e in effects.items():
        on = (e["brightness"] - 1).abs() > 0.6 / 120
        assert _within(float(on.float().mean()), 0.8 - 0.6 / 120 / 0.8 * 0.8, len(on)), where
        for key in ("brightness", "contrast"):
            x = e[key][on]
            assert abs(float(x.mean()) - 1) < 0.02 and abs(float(x.std()) - 0.8 / 12**0.5) < 0.02, (where, key)
        colour_on = ((e["saturation"] - 1).abs() > 1.5 / 70) | (e["hue"].abs() > 0.004)
        assert _within(float(colour_on.float().mean()), 0.8, len(on)), where
        s, h = e["saturation"][colour_on], e["hue"][colour_on]
        assert abs(float(s.mean()) - 1) < 0.01 and abs(float(s.std()) - 0.4 / 12**0.5) < 0.01, where
        assert abs(float(h.mean())) < 0.006 and abs(float(h.std()) - 0.2 / 12**0.5) < 0.006, where
        assert float(e["hue"].abs().max()) < 0.1 + 0.005 and float((s - 1).abs().max()) < 0.2 + 0.02, where
    for key in ("brightness", "contrast", "hue", "saturation"):
        assert _ks(effects["loader"][key], effects["device"][key]) <= 0.07, key


def test_geometry_is_the_same_in_both_paths(photo):
    """The same sample seeds give the same boxes and flips with ``photometric=loader`` and
    ``device``; without photometric changes the device path's crops are the loader's pixels."""
    cfg = ViewsConfig(global_size=32, local_size=16, local_crops=3, global_scale=(0.3, 1.0))
    loader = _batch(cfg, photo, 12)
    device = _batch(dataclasses.replace(cfg, photometric="device"), photo, 12)
    for a, b in zip(loader.global_views + loader.local_views, device.global_views + device.local_views):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
        assert torch.equal(a.source_sizes, b.source_sizes) and a.images.shape == b.images.shape
        assert a.images.dtype == b.images.dtype == torch.float32
    assert len({tuple(b.tolist()) for b in loader.global_views[0].boxes}) > 1 and loader.global_views[0].flips.any()
    plain = dict(color_jitter_p=0.0, grayscale_p=0.0, global_blur_p=[0.0], global_solarize_p=[0.0],
                 local_blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    a = _batch(dataclasses.replace(cfg, **plain), photo, 6)
    b = _batch(dataclasses.replace(cfg, **plain, photometric="device"), photo, 6)
    for va, vb in zip(a.global_views + a.local_views, b.global_views + b.local_views):
        assert torch.allclose(va.images, vb.images, atol=1e-6)


# ----------------------------------------------------------------------------------------- runs


def test_the_module_finishes_device_views_before_the_forward(photo):
    """``PretrainModule.finish_views``: uint8 crops in, normalised float32 views out (the same for
    the same batch position, other draws at another), geometry untouched; ``compute_losses`` takes
    such a batch as the loader sends it."""
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import resolve_config

    cfg = resolve_config("dino", [*TINY, *DINO_SMALL, "views.photometric=device"])
    module = PretrainModule(cfg)
    batch = _batch(dataclasses.replace(cfg.views, photometric="loader"), photo, 4)  # as the loader path sends it
    raw = collate_views([(MultiCropTransform(cfg.views, 4)(photo), 0, i) for i in range(4)])
    a, b, c = module.finish_views(raw, 3), module.finish_views(raw, 3), module.finish_views(raw, 4)
    for va, vb, vc, vr, vl in zip(a.global_views + a.local_views, b.global_views + b.local_views,
                                  c.global_views + c.local_views, raw.global_views + raw.local_views,
                                  batch.global_views + batch.local_views):
        assert vr.images.dtype == torch.uint8 and va.images.dtype == torch.float32
        assert va.images.shape == vl.images.shape and torch.equal(va.images, vb.images)
        assert torch.equal(va.boxes, vr.boxes) and torch.equal(va.flips, vr.flips)
    assert not torch.equal(a.global_views[0].images, c.global_views[0].images)
    with pytest.raises(ValueError, match="uint8 crops, but this batch holds torch.float32 images"):
        module.finish_views(batch, 0)  # a loader-path batch is never augmented twice
    total, _ = module.compute_losses(raw)
    assert torch.isfinite(total)


DINO_SMALL = ["objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
              "views.local_crops=2"]
# 48 images: 3 steps per epoch, 6 in all; a step checkpoint every 2 steps
RUN = [*TINY, *DINO_SMALL, "data.limit=48", "train.epochs=2", "train.checkpoint_every_n_steps=2", "views.photometric=device"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r.get("loss")]


@pytest.mark.slow
def test_device_photometric_pretrains_and_resumes_exactly(tmp_path, cifar_train, monkeypatch, capsys):
    """A run that crashes in its 5th step (the last checkpoint: step 4, epoch 1 batch 1) and is
    continued with ``pretrain --out RUN --resume`` draws the uninterrupted run's photometric
    seeds step by step and logs the same metrics (1e-6: bitwise on one machine and thread count)."""
    from stratavit.cli import main

    calls: list[int] = []
    crash_at = [None]
    real = P.DevicePhotometric.__call__

    def spy(self, batch, seed, dtype=torch.float32):
        assert batch.global_views[0].images.dtype == torch.uint8  # the loader sent plain crops
        if len(calls) == crash_at[0]:
            raise RuntimeError("simulated crash")
        calls.append(seed)
        return real(self, batch, seed, dtype)

    monkeypatch.setattr(P.DevicePhotometric, "__call__", spy)
    data = ["--data", str(cifar_train)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pretrain", "--recipe", "dino", *data, "--out", str(full), *RUN]) == 0
    assert len(calls) == 6 and len(set(calls)) == 6
    uninterrupted, calls[:] = list(calls), []
    crash_at[0] = 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["pretrain", "--recipe", "dino", *data, "--out", str(cut), *RUN])
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    crash_at[0] = None
    assert main(["pretrain", "--out", str(cut), "--resume"]) == 0
    assert calls == uninterrupted[:4] + uninterrupted[4:]  # steps 0-3, then 4-5 after the restart
    assert "Traceback" not in capsys.readouterr().err
    a, b = _rows(full / "metrics.csv"), _rows(cut / "metrics.csv")
    assert [int(r["step"]) for r in a] == [int(r["step"]) for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/dino", "lr", "wd", "momentum"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6, abs=1e-9), (ra["step"], key)


def test_a_bad_photometric_value_is_one_line(tmp_path, capsys):
    from stratavit.cli import main

    code = main(["pretrain", "--recipe", "dino", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "views.photometric=gpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "views.photometric: 'gpu' is not allowed; choose one of ['loader', 'device']" in err
    assert not (tmp_path / "r").exists()
