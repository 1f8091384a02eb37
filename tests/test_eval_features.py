"""Tests for frozen-feature extraction (stratavit.evaluation.features)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import Dataset

from stratavit.evaluation.features import extract_block_features, raw_pixel_features

DEPTH, DIM, N = 3, 64, 10


class _RandomImages(Dataset):
    def __init__(self, n: int = N, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = [i % 4 for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
    )


def test_shapes_and_last_block_matches_forward_features(model):
    data = _RandomImages()
    model.train()
    feats, labels = extract_block_features(model, data, batch_size=4)  # 4 + 4 + 2: partial batch
    assert model.training  # mode restored
    assert feats.shape == (DEPTH, N, DIM) and feats.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels

    model.eval()
    with torch.no_grad():
        ref_last = model.forward_features(data.images)[:, 0]
        # block 1 by hand: embed, first block, final norm, CLS
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(data.images))))
        ref_first = model.norm(model.blocks[0](x))[:, 0]
    torch.testing.assert_close(feats[-1], ref_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[0], ref_first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


def test_cache_is_written_and_reused(model, tmp_path, monkeypatch):
    data = _RandomImages()
    cache = tmp_path / "sub" / "feats.pt"
    calls = {"n": 0}
    original = model.forward_intermediates

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_intermediates", counting)
    feats, labels = extract_block_features(model, data, batch_size=5, cache_path=cache)
    assert calls["n"] == 2 and cache.is_file()
    assert not list(cache.parent.glob("*.tmp"))  # temp file replaced atomically

    feats2, labels2 = extract_block_features(model, data, batch_size=5, cache_path=cache)
    assert calls["n"] == 2  # served from the cache, model not run
    assert torch.equal(feats, feats2) and torch.equal(labels, labels2)

    # a cache for a different dataset size is ignored (and rewritten)
    with pytest.warns(UserWarning):
        feats3, _ = extract_block_features(model, _RandomImages(n=6), batch_size=5, cache_path=cache)
    assert feats3.shape == (DEPTH, 6, DIM) and calls["n"] == 4


def test_raw_pixel_features(tmp_path):
    data = _RandomImages()
    feats, labels = raw_pixel_features(data, batch_size=3, cache_path=tmp_path / "raw.pt")
    assert feats.shape == (N, 3 * 32 * 32) and feats.dtype == torch.float32
    assert torch.equal(feats, data.images.reshape(N, -1))
    assert labels.tolist() == data.labels
    feats2, _ = raw_pixel_features(data, cache_path=tmp_path / "raw.pt")
    assert torch.equal(feats, feats2)
