"""Backbone: a timm Vision Transformer that returns Features at the requested levels.

A **level** is a 1-based block number: level ``i`` is the token sequence after block ``i``
(level ``depth`` = the last block). Negative levels count from the end (-1 = last block).
One forward returns, for every requested level, the CLS token and the patch tokens with their
grid shape, both before the final LayerNorm (``*_pre``) and after it.
"""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import Tensor, nn

from stratavit.backbones.features import Features, LevelFeatures, resolve_level
from stratavit.config import BackboneConfig, ConfigError


def timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(cfg.arch, **kwargs)`` (also stored in exports)."""
    kw: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, name)
        if value is not None:
            kw[name] = value
    return kw


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MoCo v3): (gh * gw, dim), row-major.

    The first half of the channels encodes the column (x), the second half the row (y); each half
    is ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 1 / temperature^(k / (dim/4))``.
    """
    if dim % 4:
        raise ConfigError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ox = xx.reshape(-1, 1) * omega
    oy = yy.reshape(-1, 1) * omega
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1).float()


def cls_attention(block: nn.Module, tokens_in: Tensor) -> Tensor:
    """Attention of the CLS query over all tokens in a timm ViT ``Block``, per head.

    Args:
        block: the timm ``Block`` whose attention is read (its ``norm1``, ``attn.qkv``,
            ``attn.q_norm`` / ``attn.k_norm`` and ``attn.scale`` are used).
        tokens_in: ``(B, T, C)`` tokens entering that block (pre-norm), CLS first.
    Returns:
        ``(B, H, T)`` softmax weights of token 0's query; each row sums to 1.
    """
    attn = block.attn
    x = block.norm1(tokens_in)
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale  # (B, H, 1, T)
    return logits.softmax(dim=-1)[:, :, 0]


def _apply_mask(embedded: Tensor, mask: Tensor, token: Tensor) -> Tensor:
    """Patch embeddings (B, N, C) or (B, gh, gw, C) with masked positions replaced by ``token`` (C,)."""
    m = mask.reshape(*embedded.shape[:-1], 1)
    return torch.where(m, token.to(embedded.dtype).expand_as(embedded), embedded)


class Backbone(nn.Module):
    """timm ViT wrapper: ``forward(x, levels)`` -> :data:`Features`.

    Args:
        cfg: the backbone config; ``None`` fields take the defaults of ``cfg.arch``.
    Attributes:
        vit: the plain timm ``VisionTransformer`` (what ``export`` writes).
    """

    is_pyramid = False  # a ViT: levels are blocks (see FeatureBackbone)

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        try:
            self.vit = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate, **timm_kwargs(cfg))
        except AssertionError as e:  # timm asserts its shapes, e.g. embed_dim % num_heads == 0
            raise ConfigError(
                f"backbone settings do not fit together ({e}): with backbone.embed_dim set, make it a multiple "
                "of backbone.num_heads (e.g. embed_dim=384 num_heads=6)"
            ) from None
        except (RuntimeError, TypeError) as e:
            raise ConfigError(
                f"backbone.arch={cfg.arch!r} cannot be built as a ViT with these settings ({e}); "
                "use a timm VisionTransformer such as vit_small_patch16_224"
            ) from None
        if not hasattr(self.vit, "forward_intermediates") or not hasattr(self.vit, "cls_token"):
            raise ConfigError(f"backbone.arch={cfg.arch!r} is not a timm VisionTransformer with a CLS token")
        if self.vit.cls_token is None:
            raise ConfigError(f"backbone.arch={cfg.arch!r} has no CLS token; pick a ViT that has one")
        if cfg.pos_embed == "sincos":
            self._fix_sincos_pos_embed()
        if cfg.freeze_patch_embed:
            for p in self.vit.patch_embed.parameters():
                p.requires_grad_(False)

    def _fix_sincos_pos_embed(self) -> None:
        pe = self.vit.pos_embed
        grid = tuple(self.vit.patch_embed.grid_size)
        table = sincos_pos_embed_2d(grid, self.embed_dim)
        n_prefix = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        with torch.no_grad():
            pe.zero_()
            pe[0, n_prefix:] = table
        pe.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[0].attn.num_heads)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def img_size(self) -> int:
        return int(self.vit.patch_embed.img_size[0])

    def resolve_level(self, level: int) -> int:
        """Map a level (1..depth, or negative from the end) to 1..depth, or raise ConfigError."""
        return resolve_level(level, self.depth, "block backbone")

    def forward(
        self,
        x: Tensor,
        levels: Sequence[int] = (-1,),
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> Features:
        """Run the ViT on images (B, 3, H, W) and collect the requested levels.

        Args:
            mask: optional (B, N) bool, True where a patch embedding is replaced by ``mask_token``
                (C,) before the position embedding is added (masked image modelling, iBOT); the
                timm model itself runs unchanged.
        Returns:
            dict level -> :class:`LevelFeatures` with ``tokens_pre`` (B, 1 + N, C) and the grid
            ``(H / p, W / p)``. Only the blocks up to the deepest requested level are run.
        """
        wanted = sorted({self.resolve_level(lv) for lv in levels})
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        handle = None
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token")
            if mask.shape != (x.shape[0], grid[0] * grid[1]):
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {x.shape[0]} images of {grid} patches")
            handle = self.vit.patch_embed.register_forward_hook(
                lambda _m, _i, out: _apply_mask(out, mask, mask_token)
            )
        try:
            taken = self._intermediates(x, wanted)
        finally:
            if handle is not None:
                handle.remove()
        out: Features = {}
        for lv, (patches, prefix) in zip(wanted, taken):
            out[lv] = LevelFeatures(torch.cat([prefix[:, :1], patches], dim=1), grid, self.vit.norm)
        for lv in levels:
            out[lv] = out[self.resolve_level(lv)]
        return out

    def _intermediates(self, x: Tensor, wanted: list[int]) -> list:
        return self.vit.forward_intermediates(
            x,
            indices=[lv - 1 for lv in wanted],
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
