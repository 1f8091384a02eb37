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
    out = extract_block_features(model, data, batch_size=4)  # 4 + 4 + 2: partial batch
    feats, labels = out.cls, out.labels
    assert model.training  # mode restored
    assert feats.shape == (DEPTH, N, DIM) and feats.dtype == torch.float32
    assert out.patch.shape == (DEPTH, N, DIM)
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels

    model.eval()
    with torch.no_grad():
        last = model.forward_features(data.images)
        # block 1 by hand: embed, first block, final norm
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(data.images))))
        first = model.norm(model.blocks[0](x))
    torch.testing.assert_close(feats[-1], last[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[0], first[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch[-1], last[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch[0], first[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[0], feats[1])
    assert out.pooled("mean_patch") is out.patch
    with pytest.raises(ValueError, match="pooling"):
        out.pooled("max")


def test_cache_is_written_and_reused(model, tmp_path, monkeypatch):
    data = _RandomImages()
    cache = tmp_path / "sub" / "feats"
    calls = {"n": 0}
    original = model.forward_intermediates

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_intermediates", counting)
    memory = extract_block_features(model, data, batch_size=5)
    calls["n"] = 0
    out = extract_block_features(model, data, batch_size=5, cache_dir=cache)
    assert calls["n"] == 2 and (cache / "meta.json").is_file()
    assert not list(cache.parent.glob("*.tmp"))  # temp folder replaced atomically
    assert torch.equal(out.cls, memory.cls) and torch.equal(out.patch, memory.patch)

    out2 = extract_block_features(model, data, batch_size=5, cache_dir=cache)
    assert calls["n"] == 2  # served from the cache, model not run
    assert torch.equal(out.cls, out2.cls) and torch.equal(out.labels, out2.labels)

    # a cache for a different dataset size is ignored (and rewritten)
    with pytest.warns(UserWarning):
        out3 = extract_block_features(model, _RandomImages(n=6), batch_size=5, cache_dir=cache)
    assert out3.cls.shape == (DEPTH, 6, DIM) and calls["n"] == 4


def test_interrupted_extraction_leaves_no_cache(model, tmp_path):
    class _Broken(_RandomImages):
        def __getitem__(self, i):
            if i == 7:
                raise OSError("disk went away")
            return super().__getitem__(i)

    cache = tmp_path / "feats"
    with pytest.raises(OSError):
        extract_block_features(model, _Broken(), batch_size=4, cache_dir=cache)
    assert not cache.exists() and not list(tmp_path.iterdir())  # no partial store left behind
    assert extract_block_features(model, _RandomImages(), batch_size=4, cache_dir=cache).cls.shape == (DEPTH, N, DIM)


def test_raw_pixel_features(tmp_path):
    data = _RandomImages()
    feats, labels = raw_pixel_features(data, batch_size=3, cache_path=tmp_path / "raw.pt")
    assert feats.shape == (N, 3 * 32 * 32) and feats.dtype == torch.float32
    assert torch.equal(feats, data.images.reshape(N, -1))
    assert labels.tolist() == data.labels
    feats2, _ = raw_pixel_features(data, cache_path=tmp_path / "raw.pt")
    assert torch.equal(feats, feats2)
