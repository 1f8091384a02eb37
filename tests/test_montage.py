"""MCL montages: exact tiles of the nearest-downscaled sources, a permutation, patch-aligned tiles."""

from __future__ import annotations

import pytest
import torch

from stratavit.config import ConfigError
from stratavit.montage import check_montage_geometry, make_montage, tile_tokens


def _batch(b: int = 64, s: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_tile_is_its_source_downscaled_exactly(level):
    images = _batch()
    m = make_montage(images, level, torch.Generator().manual_seed(level))
    r = 2**level
    assert m.canvases.shape == (64 // r**2, 3, 32, 32) and m.sources.shape == (64 // r**2, r * r)
    for k in range(m.canvases.shape[0]):
        for t in range(r * r):
            x0, y0, x1, y1 = (int(v) for v in m.boxes[t])
            src = images[m.sources[k, t]]
            # nearest neighbour by r: the top-left pixel of every r x r block
            assert torch.equal(m.canvases[k, :, y0:y1, x0:x1], src[:, ::r, ::r])


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_sources_are_a_permutation_and_boxes_tile_the_canvas(level):
    m = make_montage(_batch(), level, torch.Generator().manual_seed(7))
    assert sorted(m.sources.flatten().tolist()) == list(range(64))
    r = 2**level
    area = ((m.boxes[:, 2] - m.boxes[:, 0]) * (m.boxes[:, 3] - m.boxes[:, 1])).sum()
    assert float(area) == 32 * 32 and m.boxes[0].tolist() == [0, 0, 32 / r, 32 / r]
    # row-major: tile 1 is to the right of tile 0
    if r > 1:
        assert m.boxes[1].tolist() == [32 / r, 0, 64 / r, 32 / r]


def test_level_zero_is_the_plain_batch_in_permuted_order():
    images = _batch()
    m = make_montage(images, 0, torch.Generator().manual_seed(3))
    assert torch.equal(m.canvases, images[m.sources[:, 0]])
    other = make_montage(images, 0, torch.Generator().manual_seed(4))
    assert not torch.equal(m.sources, other.sources)  # a fresh permutation per call


def test_tiles_align_with_the_patch_grid_or_fail_clearly():
    check_montage_geometry(batch_size=64, size=32, patch=4, levels=4)  # tiles of 32, 16, 8, 4 px
    for t in make_montage(_batch(), 3).boxes:
        assert all(float(v) % 4 == 0 for v in t)
    with pytest.raises(ConfigError, match="multiple of 64"):
        check_montage_geometry(batch_size=64, size=32, patch=8, levels=4)  # 4-px tiles < one 8-px patch
    with pytest.raises(ConfigError, match="batch size that is a multiple of 64"):
        check_montage_geometry(batch_size=32, size=64, patch=4, levels=4)
    with pytest.raises(ValueError, match="cannot tile"):
        make_montage(_batch(b=8), 2)


def test_tile_tokens_pool_exactly_the_patches_inside_each_tile():
    # patch tokens that encode their own (row, col): the pooled token of tile (a, b) of a 2x2
    # montage on an 8x8 grid is the mean over rows 4a..4a+3, cols 4b..4b+3
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    patches = torch.stack((rows, cols), -1).reshape(1, 64, 2)
    pooled = tile_tokens(patches, (8, 8), 2)
    assert pooled.tolist() == [[[1.5, 1.5], [1.5, 5.5], [5.5, 1.5], [5.5, 5.5]]]
    with pytest.raises(ValueError, match="does not split"):
        tile_tokens(patches, (8, 8), 3)
