from __future__ import annotations

import pytest
import torch
from PIL import Image

from stratavit.config import ConfigError, ViewsConfig
from stratavit.views import MultiCropTransform, collate_views


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
