"""Frozen token access for evaluation: patch grids per block, CLS attention, other resolutions.

Every dense evaluation (segmentation probe, correspondence score, PCA / attention pictures) reads
the same things from a plain timm ``VisionTransformer``:

* :func:`block_tokens` -- CLS and patch tokens of chosen blocks (1-based, ``-1`` = last), each
  passed through the model's final norm, patches as a spatial grid ``(B, gh, gw, C)``;
* :func:`cls_attention_maps` -- the last block's CLS -> patch attention per head ``(B, H, gh, gw)``;
* :func:`model_at_size` -- the same weights at another input resolution (position embeddings
  resampled by timm), for transfer evaluation on images of any size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stratavit.backbone import cls_attention

__all__ = ["BlockTokens", "block_tokens", "cls_attention_maps", "model_at_size", "resolve_blocks", "grid_of"]


@dataclass
class BlockTokens:
    """Tokens of one block for a batch.

    Attributes:
        block: 1-based block number.
        cls: ``(B, C)`` class token (``None`` for models without one).
        patches: ``(B, gh, gw, C)`` patch tokens, row-major grid.
    """

    block: int
    cls: Tensor | None
    patches: Tensor

    @property
    def mean_patch(self) -> Tensor:
        """``(B, C)`` mean of the patch tokens."""
        return self.patches.mean(dim=(1, 2))


def depth_of(model: nn.Module) -> int:
    return len(model.blocks)  # type: ignore[arg-type]


def resolve_blocks(model: nn.Module, blocks: Sequence[int] | None) -> list[int]:
    """1-based block numbers (``-1`` = last, ``None`` = all) -> sorted unique 1-based numbers.

    Raises:
        ValueError: a block outside ``1..depth`` (naming the valid range).
    """
    depth = depth_of(model)
    if blocks is None:
        return list(range(1, depth + 1))
    out = []
    for b in blocks:
        n = depth + 1 + b if b < 0 else b
        if not 1 <= n <= depth:
            raise ValueError(f"block {b} does not exist: the backbone has blocks 1..{depth} (or -1 for the last)")
        out.append(n)
    return sorted(set(out))


def grid_of(model: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of an input of size ``(H, W)``."""
    ph, pw = model.patch_embed.patch_size  # type: ignore[union-attr]
    return image_hw[0] // ph, image_hw[1] // pw


def model_at_size(model: nn.Module, size: int | tuple[int, int]) -> nn.Module:
    """``model`` itself if it already takes ``size`` inputs, else a copy with resampled positions.

    Raises:
        ValueError: ``size`` is not a multiple of the patch size.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    patch = tuple(model.patch_embed.patch_size)  # type: ignore[union-attr]
    if hw[0] % patch[0] or hw[1] % patch[1]:
        raise ValueError(
            f"evaluation size {hw[0]}x{hw[1]} is not a multiple of the patch size {patch[0]}x{patch[1]}; "
            f"use e.g. {max(patch[0], hw[0] // patch[0] * patch[0])}"
        )
    if tuple(model.patch_embed.img_size) == hw:  # type: ignore[union-attr]
        return model
    other = copy.deepcopy(model)
    other.set_input_size(img_size=hw)  # type: ignore[operator]
    return other


@torch.inference_mode()
def block_tokens(model: nn.Module, images: Tensor, blocks: Sequence[int] | None = None) -> list[BlockTokens]:
    """CLS and patch tokens of ``blocks`` for ``images`` ``(B, 3, H, W)``, after the final norm.

    ``H, W`` must match the model's input size (see :func:`model_at_size`). Returns one
    :class:`BlockTokens` per requested block, in increasing block order, float32 on the
    images' device.
    """
    numbers = resolve_blocks(model, blocks)
    outs = model.forward_intermediates(  # type: ignore[operator]
        images,
        indices=[n - 1 for n in numbers],
        norm=True,
        return_prefix_tokens=True,
        output_fmt="NCHW",
        intermediates_only=True,
    )
    has_cls = getattr(model, "cls_token", None) is not None
    result = []
    for n, out in zip(numbers, outs):
        spatial, prefix = out if isinstance(out, (tuple, list)) else (out, None)
        cls = prefix[:, 0].float() if has_cls and prefix is not None else None
        result.append(BlockTokens(n, cls, spatial.permute(0, 2, 3, 1).float()))
    return result


@torch.inference_mode()
def cls_attention_maps(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """CLS -> patch attention of ``block`` per head: ``(B, H, gh, gw)``, each map sums to 1."""
    (number,) = resolve_blocks(model, [block])
    target = model.blocks[number - 1]  # type: ignore[index]
    captured: list[Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model.forward_features(images)  # type: ignore[operator]
    finally:
        handle.remove()
    weights = cls_attention(target, captured[0])  # (B, H, prefix + N)
    gh, gw = grid_of(model, tuple(images.shape[-2:]))
    patches = weights[..., weights.shape[-1] - gh * gw :]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    return patches.reshape(*weights.shape[:2], gh, gw).float()
