from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.views import MultiCropTransform, collate_views


def test_multicrop_shapes_and_collate():
    cfg = ViewsConfig(global_crops=2, global_size=32, local_crops=3, local_size=16)
    tf = MultiCropTransform(cfg, patch_size=4)
    img = Image.new("RGB", (40, 30), (120, 30, 200))
    samples = [(tf(img), 7, i) for i in range(5)]
    batch = collate_views(samples)
    assert len(batch.global_views) == 2 and len(batch.local_views) == 3
    assert batch.global_views[0].images.shape == (5, 3, 32, 32)
    assert batch.local_views[2].images.shape == (5, 3, 16, 16)
    assert batch.global_views[1].boxes.shape == (5, 4) and batch.global_views[1].flips.dtype == torch.bool
    assert batch.global_views[0].source_sizes[0].tolist() == [40.0, 30.0]
    assert batch.indices.tolist() == [0, 1, 2, 3, 4] and batch.labels.tolist() == [7] * 5
    boxes = batch.local_views[0].boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 30).all()
    # per-sample geometry: boxes differ between samples of the same view index
    assert len({tuple(b.tolist()) for b in batch.global_views[0].boxes}) > 1


def test_crop_smaller_than_patch_is_refused():
    with pytest.raises(ConfigError, match="smaller than one patch"):
        MultiCropTransform(ViewsConfig(global_size=8, local_crops=0), patch_size=16)
    with pytest.raises(ConfigError, match="multiple of backbone.patch_size"):
        MultiCropTransform(ViewsConfig(global_size=32, local_crops=2, local_size=18), patch_size=4)


def _pattern(w: int = 300, h: int = 200) -> Image.Image:
    """A non-square image whose every pixel is distinct enough to reveal a wrong crop or frame."""
    x = torch.arange(w)[None, :].expand(h, w)
    y = torch.arange(h)[:, None].expand(h, w)
    rgb = torch.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 13) % 256], dim=-1)
    return Image.fromarray(rgb.to(torch.uint8).numpy(), "RGB")


_PLAIN = dict(  # geometry only: no photometric change, identity normalisation
    color_jitter_p=0.0, grayscale_p=0.0, global_blur_p=[0.0], global_solarize_p=[0.0], local_blur_p=0.0,
    local_solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
)


def _recrop(frame: Image.Image, box: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """The view a box describes, rebuilt by hand from ``frame``: (3, size, size) in [0, 1]."""
    x0, y0, x1, y1 = (int(round(float(c))) for c in box)
    out = frame.crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("resize", [256, None])
def test_resize_puts_every_box_in_the_resized_frame(resize):
    torch.manual_seed(0)
    cfg = ViewsConfig(resize=resize, global_size=32, local_crops=2, local_size=16, **_PLAIN)
    tf = MultiCropTransform(cfg, patch_size=4)
    img = _pattern()
    frame = img.resize((256, 256), Image.BILINEAR) if resize else img
    w, h = frame.size
    bottoms = []
    for _ in range(10):
        globals_, locals_ = tf(img)
        for view in globals_ + locals_:
            x0, y0, x1, y1 = view.box.tolist()
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert view.source_size == (w, h)
            bottoms.append(y1)
            size = view.image.shape[-1]
            assert torch.allclose(view.image, _recrop(frame, view.box, size, view.flip), atol=1e-6)
    if resize:
        assert max(bottoms) > 200  # boxes reach below the original height: they are in the 256x256 frame
    batch = collate_views([(tf(img), 0, 0)])
    assert batch.global_views[0].source_sizes[0].tolist() == [float(w), float(h)]


def test_resize_applies_before_every_view_and_keeps_the_view_size():
    cfg = ViewsConfig(resize=64, global_size=32, local_crops=1, local_size=16)
    g, loc = MultiCropTransform(cfg, patch_size=8)(_pattern())
    assert g[0].image.shape == (3, 32, 32) and loc[0].image.shape == (3, 16, 16)
    assert g[0].source_size == loc[0].source_size == (64, 64)


def _resolve(*overrides: str):
    from stratavit.recipe import resolve_config

    return resolve_config("dino", list(overrides))


def test_local_crops_larger_than_global_ones_are_refused():
    with pytest.raises(ConfigError, match=r"views.local_size=128 is larger than views.global_size=96.*views.local_size <= 96"):
        _resolve("views.global_size=96", "views.local_size=128")
    assert _resolve("views.global_size=96", "views.local_size=96").views.local_size == 96  # MCL's equal sizes
    assert _resolve("views.local_crops=0", "views.global_size=96", "views.local_size=128").views.local_crops == 0


def test_resize_smaller_than_the_crops_is_refused():
    with pytest.raises(ConfigError, match=r"views.resize=200 is smaller than views.global_size=224.*views.resize=224"):
        _resolve("views.resize=200")
    with pytest.raises(ConfigError, match="views.resize"):
        _resolve("views.resize=[1, 2]")  # type-checked like every key
    assert _resolve("views.resize=224").views.resize == 224
    assert _resolve("views.resize=null").views.resize is None


def test_every_shipped_recipe_resolves_and_local_global_resizes_to_256():
    from stratavit.recipe import recipe_names, resolve_config

    for name in recipe_names():
        v = resolve_config(name).views
        assert v.local_crops == 0 or v.local_size <= v.global_size, name
    assert resolve_config("local-global").views.resize == 256
    assert resolve_config("dino").views.resize is None


def test_the_default_blur_is_pils_gaussian_blur_with_sigma_in_0_1_to_2():
    """DINO's / iBOT's / LightlySSL's blur: PIL ``GaussianBlur(radius=σ)``, σ ~ U(0.1, 2.0); the old
    torchvision blur (kernel 0.1 · size) stays reachable as ``blur=torchvision_blur``."""
    from PIL import ImageFilter
    from torchvision import transforms as T

    from stratavit.data.views import PILGaussianBlur, ViewMaker, torchvision_blur

    img = _pattern(64, 48)
    blur = ViewMaker(ViewsConfig(), 32, (0.5, 1.0), blur_p=1.0, solarize_p=0.0).photometric.transforms[2].transforms[0]
    assert isinstance(blur, PILGaussianBlur) and blur.sigma == (0.1, 2.0)
    torch.manual_seed(4)
    out = blur(img)
    torch.manual_seed(4)
    sigma = float(torch.empty(1).uniform_(0.1, 2.0))
    assert 0.1 <= sigma <= 2.0
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))
    old = torchvision_blur(224)
    assert isinstance(old, T.GaussianBlur) and list(old.kernel_size) == [23, 23] and list(old.sigma) == [0.1, 2.0]
    tf = MultiCropTransform(ViewsConfig(global_size=32, local_crops=0), patch_size=4, blur=torchvision_blur)
    assert isinstance(tf.global_makers[0].photometric.transforms[2].transforms[0], T.GaussianBlur)


def test_device_photometric_views_are_the_plain_uint8_crops():
    """``views.photometric=device``: the loader sends each crop as (3, S, S) uint8, un-normalised,
    with the same geometry draws as the loader path."""
    cfg = ViewsConfig(global_size=32, local_crops=2, local_size=16, photometric="device")
    torch.manual_seed(0)
    g, loc = MultiCropTransform(cfg, patch_size=4)(_pattern())
    assert [v.image.dtype for v in g + loc] == [torch.uint8] * 4
    assert g[0].image.shape == (3, 32, 32) and loc[0].image.shape == (3, 16, 16)
    for view in g + loc:
        size = view.image.shape[-1]
        assert torch.allclose(view.image.float() / 255, _recrop(_pattern(), view.box, size, view.flip), atol=1e-6)
