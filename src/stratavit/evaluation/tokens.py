"""Frozen token access for evaluation: patch grids per block, CLS attention, other resolutions.

Vocabulary: evaluation speaks of **blocks** everywhere -- block ``i`` (1-based, ``-1`` = last) is
the token sequence after transformer block ``i``, what :mod:`stratavit.backbones.vit` calls *level*
``i`` (its :class:`~stratavit.backbones.vit.LevelFeatures`); a CNN's blocks are its feature stages. The
tokens of one block for a batch are a :class:`BlockTokens`, the pooled features of every block for
a data set a :class:`~stratavit.evaluation.features.BlockFeatures`, and ``results.json`` lists
per-block rows under ``layers`` (``{"block": i, ...}``). Evaluation reads plain timm models (what
``export`` writes), not the training ``Backbone``, hence its own token type.

Every dense evaluation (segmentation probe, correspondence score, PCA / attention pictures) reads
the same things from a plain timm ``VisionTransformer``:

* :func:`block_tokens` -- CLS and patch tokens of chosen blocks (1-based, ``-1`` = last), each
  passed through the model's final norm, patches as a spatial grid ``(B, gh, gw, C)``;
* :func:`cls_attention_maps` -- the last block's CLS -> patch attention per head ``(B, H, gh, gw)``;
* :func:`model_at_size` -- the same weights at another input resolution (position embeddings
  resampled by timm), for transfer evaluation on images of any size.

A plain timm CNN (what ``export`` writes for a ``resnet_fpn`` backbone, e.g.
``timm.create_model("resnet18", num_classes=0)``) is read the same way, with its **stages** as
the blocks (:func:`cnn_stages`: the ``feature_info`` entries at stride >= 4, i.e. ``layer1`` ..
``layer4`` of a ResNet at strides 4, 8, 16, 32; the stride-2 stem is skipped). Each stage has its
own grid ``(H / stride, W / stride)`` and width; there is no class token (``cls`` is ``None``, so
pooled features fall back to the global average pool), no final norm and no attention
(:func:`cls_attention_maps` raises); :func:`model_at_size` returns the model itself for any size
that is a multiple of the coarsest stride.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stratavit.backbones.vit import cls_attention

__all__ = [
    "BlockTokens",
    "Stage",
    "block_tokens",
    "block_dims",
    "cls_attention_maps",
    "cnn_stages",
    "depth_of",
    "figure_block",
    "grid_of",
    "is_cnn",
    "model_at_size",
    "native_size",
    "resolve_blocks",
    "stride_of",
]


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


MIN_STAGE_STRIDE = 4
"""Feature stages of a CNN start at this stride (the stride-2 stem is not a stage)."""


@dataclass(frozen=True)
class Stage:
    """One feature stage of a timm CNN, the CNN's counterpart of a transformer block.

    Attributes:
        index: its position in ``model.feature_info`` (= the index ``forward_intermediates`` takes).
        stride: input pixels per feature-map cell (4, 8, 16, 32 for a ResNet).
        channels: width ``C`` of its feature map.
        module: the module that produces it (``layer1`` ...).
    """

    index: int
    stride: int
    channels: int
    module: str


def is_cnn(model: nn.Module) -> bool:
    """Whether ``model`` is a timm CNN (feature stages, no patch embedding) rather than a ViT."""
    return not hasattr(model, "patch_embed") and getattr(model, "feature_info", None) is not None


def cnn_stages(model: nn.Module) -> list[Stage]:
    """The feature stages of a plain timm CNN, finest first (``feature_info`` at stride >= 4).

    Raises:
        ValueError: ``model`` is a ``features_only`` wrapper (no ``forward_intermediates``) or
            has no stage at stride >= 4.
    """
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates (a features_only model?); evaluate the plain "
            "timm model, e.g. timm.create_model(arch, num_classes=0) with the body's weights"
        )
    info = model.feature_info
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)  # type: ignore[union-attr]
    stages = [
        Stage(i, int(d["reduction"]), int(d["num_chs"]), str(d.get("module", "")))
        for i, d in enumerate(entries)
        if int(d["reduction"]) >= MIN_STAGE_STRIDE
    ]
    if not stages:
        raise ValueError(f"{type(model).__name__} has no feature stage at stride >= {MIN_STAGE_STRIDE}")
    return stages


def depth_of(model: nn.Module) -> int:
    """Number of blocks of a ViT, or of feature stages of a CNN."""
    if is_cnn(model):
        return len(cnn_stages(model))
    return len(model.blocks)  # type: ignore[arg-type]


def block_dims(model: nn.Module) -> list[int]:
    """Token width ``C`` of every block (1-based block ``i`` at index ``i - 1``); a CNN's widths differ."""
    if is_cnn(model):
        return [s.channels for s in cnn_stages(model)]
    return [int(model.num_features)] * depth_of(model)  # type: ignore[arg-type]


def native_size(model: nn.Module) -> int | None:
    """The input side a ViT was built for; ``None`` for a CNN (it takes any multiple of its stride)."""
    if is_cnn(model):
        return None
    return int(model.patch_embed.img_size[0])  # type: ignore[union-attr, index]


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
            if is_cnn(model):
                raise ValueError(
                    f"block {b} does not exist: the CNN backbone has stages 1..{depth} (or -1 for the last); "
                    "its blocks are its feature stages"
                )
            raise ValueError(f"block {b} does not exist: the backbone has blocks 1..{depth} (or -1 for the last)")
        out.append(n)
    return sorted(set(out))


def stride_of(model: nn.Module, block: int = -1) -> tuple[int, int]:
    """Input pixels ``(sh, sw)`` per token of ``block``: the ViT's patch size, or the CNN stage's stride."""
    if is_cnn(model):
        (number,) = resolve_blocks(model, [block])
        s = cnn_stages(model)[number - 1].stride
        return s, s
    ph, pw = model.patch_embed.patch_size  # type: ignore[union-attr]
    return int(ph), int(pw)


def grid_of(model: nn.Module, image_hw: tuple[int, int], block: int = -1) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of ``block`` for an input of size ``(H, W)`` (every ViT block has the
    same grid; a CNN stage's grid is the input over its stride)."""
    sh, sw = stride_of(model, block)
    return image_hw[0] // sh, image_hw[1] // sw


def figure_block(model: nn.Module, size: int, min_side: int = 7) -> int:
    """The block the report's pictures show: a ViT's last block; a CNN's deepest stage whose grid at
    ``size`` has at least ``min_side`` cells a side (ResNet at 224 px: stage 4, 7x7), else stage 1."""
    depth = depth_of(model)
    if not is_cnn(model):
        return depth
    fine_enough = [n for n in range(1, depth + 1) if min(grid_of(model, (size, size), n)) >= min_side]
    return fine_enough[-1] if fine_enough else 1


def model_at_size(model: nn.Module, size: int | tuple[int, int]) -> nn.Module:
    """``model`` itself if it already takes ``size`` inputs, else a copy with resampled positions.

    A CNN takes any size that is a multiple of its coarsest stride: it is returned as it is.

    Raises:
        ValueError: ``size`` is not a multiple of the patch size (of a CNN's coarsest stride).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if is_cnn(model):
        s = cnn_stages(model)[-1].stride
        if hw[0] % s or hw[1] % s:
            raise ValueError(
                f"evaluation size {hw[0]}x{hw[1]} is not a multiple of the CNN's coarsest stride {s} "
                f"(stage {depth_of(model)}); use e.g. {max(s, hw[0] // s * s)}"
            )
        return model
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
    images' device. For a CNN the blocks are its stages: ``patches`` is the stage's feature map
    ``(B, H / stride, W / stride, C_stage)`` as ``forward_intermediates`` returns it (a CNN has no
    final norm) and ``cls`` is ``None``.
    """
    numbers = resolve_blocks(model, blocks)
    if is_cnn(model):
        stages = cnn_stages(model)
        maps = model.forward_intermediates(  # type: ignore[operator]
            images,
            indices=[stages[n - 1].index for n in numbers],
            norm=False,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return [BlockTokens(n, None, m.permute(0, 2, 3, 1).float()) for n, m in zip(numbers, maps)]
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
    """CLS -> patch attention of ``block`` per head: ``(B, H, gh, gw)``, each map sums to 1.

    Raises:
        ValueError: ``model`` is a CNN (no class token, no attention).
    """
    if is_cnn(model):
        raise ValueError("CLS attention maps need a ViT: a CNN backbone has neither a class token nor attention")
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
