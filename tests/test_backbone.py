from __future__ import annotations

import pytest
import torch

from stratavit.backbones.vit import Backbone, sincos_pos_embed_2d
from stratavit.config import BackboneConfig, ConfigError


def _cfg(**kw) -> BackboneConfig:
    base = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    base.update(kw)
    return BackboneConfig(**base)


def test_levels_pre_and_post_norm_match_timm():
    torch.manual_seed(0)
    bb = Backbone(_cfg()).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = bb(x, [1, 2, -1])
    assert set(feats) == {1, 2, 3, -1}
    f = feats[-1]
    assert f.tokens_pre.shape == (2, 65, 32) and f.grid == (8, 8)
    assert f.cls.shape == (2, 32) and f.patches.shape == (2, 64, 32)
    torch.testing.assert_close(f.tokens, bb.vit.forward_features(x))
    torch.testing.assert_close(f.tokens, bb.vit.norm(f.tokens_pre))
    # level 1 = output of the first block
    vit = bb.vit
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    torch.testing.assert_close(feats[1].tokens_pre, vit.blocks[0](h))


def test_local_crops_use_dynamic_size():
    bb = Backbone(_cfg())
    f = bb(torch.randn(3, 3, 16, 16), [-1])[-1]
    assert f.grid == (4, 4) and f.patches.shape == (3, 16, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb(torch.randn(1, 3, 18, 18))


def test_bad_levels_are_refused():
    bb = Backbone(_cfg())
    with pytest.raises(ConfigError, match="level 4"):
        bb(torch.randn(1, 3, 32, 32), [4])


def test_sincos_position_embedding_is_fixed_and_patch_embed_frozen():
    bb = Backbone(_cfg(pos_embed="sincos", freeze_patch_embed=True))
    pe = bb.vit.pos_embed
    assert not pe.requires_grad
    assert torch.all(pe[0, 0] == 0)  # CLS gets no position
    torch.testing.assert_close(pe[0, 1:], sincos_pos_embed_2d((8, 8), 32))
    assert not any(p.requires_grad for p in bb.vit.patch_embed.parameters())


def test_sincos_table_hand_values():
    t = sincos_pos_embed_2d((2, 3), 4)  # quarter = 1, ω = 1
    # row-major: patch (row 1, col 2) is index 5 -> [sin 2, cos 2, sin 1, cos 1]
    torch.testing.assert_close(t[5], torch.tensor([torch.sin(torch.tensor(2.0)), torch.cos(torch.tensor(2.0)),
                                                   torch.sin(torch.tensor(1.0)), torch.cos(torch.tensor(1.0))]))


def test_non_vit_arch_is_refused():
    with pytest.raises(ConfigError):
        Backbone(BackboneConfig(arch="resnet18"))


def test_mask_replaces_patch_embeddings_through_timm():
    torch.manual_seed(0)
    bb = Backbone(_cfg()).eval()
    x = torch.randn(2, 3, 32, 32)
    n = (32 // bb.patch_size) ** 2
    plain = bb(x, [-1])[-1].tokens_pre
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 3] = mask[1, :5] = True
    # the token equal to the real embedding of patch 3 of image 0 and of patches 0-4 of image 1
    # would change nothing; a zero token changes exactly the masked images' outputs
    with torch.no_grad():
        emb = bb.vit.patch_embed(x).reshape(2, n, -1)
    same = bb(x[:1], [-1], mask=mask[:1], mask_token=emb[0, 3])[-1].tokens_pre
    torch.testing.assert_close(same, plain[:1])
    masked = bb(x, [-1], mask=mask, mask_token=torch.zeros(bb.embed_dim))[-1].tokens_pre
    assert not torch.allclose(masked[0], plain[0]) and not torch.allclose(masked[1], plain[1])
    unmasked = bb(x, [-1], mask=torch.zeros(2, n, dtype=torch.bool), mask_token=torch.zeros(bb.embed_dim))
    torch.testing.assert_close(unmasked[-1].tokens_pre, plain)
    with pytest.raises(ValueError, match="does not match"):
        bb(x, [-1], mask=mask[:, :4], mask_token=torch.zeros(bb.embed_dim))
    # a learned token gets gradients only through masked positions
    token = torch.zeros(bb.embed_dim, requires_grad=True)
    bb(x, [-1], mask=mask, mask_token=token)[-1].tokens_pre.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
