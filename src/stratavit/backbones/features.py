"""Features: what a backbone returns, the vocabulary every objective and evaluation reads.

A **level** is a 1-based block number (for a CNN feature pyramid: a pyramid level, finest first);
negative levels count from the end (-1 = the last). :data:`Features` maps each requested level to
its :class:`LevelFeatures`: the CLS token and the patch tokens with their grid, before and after the
final norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from torch import Tensor, nn

from stratavit.config import ConfigError


@dataclass
class LevelFeatures:
    """Tokens of one level for a batch of ``B`` views.

    Attributes:
        tokens_pre: (B, 1 + N, C) CLS + patch tokens before the final norm.
        grid: ``(gh, gw)`` patch grid, ``N = gh * gw``.
        norm: the backbone's final norm layer, applied lazily for the post-norm tokens.
    """

    tokens_pre: Tensor
    grid: tuple[int, int]
    norm: nn.Module
    _post: Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> Tensor:
        """(B, 1 + N, C) tokens after the final norm."""
        if self._post is None:
            self._post = self.norm(self.tokens_pre)
        return self._post

    @property
    def cls(self) -> Tensor:
        """(B, C) CLS token after the final norm."""
        return self.tokens[:, 0]

    @property
    def patches(self) -> Tensor:
        """(B, N, C) patch tokens after the final norm, row-major over ``grid``."""
        return self.tokens[:, 1:]

    @property
    def cls_pre(self) -> Tensor:
        """(B, C) CLS token before the final norm."""
        return self.tokens_pre[:, 0]

    @property
    def patches_pre(self) -> Tensor:
        """(B, N, C) patch tokens before the final norm."""
        return self.tokens_pre[:, 1:]


Features = dict[int, LevelFeatures]
"""Level (1-based block number) -> :class:`LevelFeatures`."""


def resolve_level(level: int, depth: int, kind: str) -> int:
    """A level (1..depth, or negative from the end) of a ``depth``-level ``kind`` -> 1..depth, or ConfigError."""
    resolved = level + depth + 1 if level < 0 else level
    if not 1 <= resolved <= depth:
        raise ConfigError(f"level {level} does not exist in a {depth}-{kind} (use 1..{depth} or -1)")
    return resolved


def level_map(level: LevelFeatures) -> Tensor:
    """The patch tokens of a level as a feature map: (B, N, C) -> (B, C, gh, gw)."""
    b, _, c = level.patches.shape
    return level.patches.transpose(1, 2).reshape(b, c, *level.grid)


class FeatureBackbone(Protocol):
    """What objectives may rely on, whichever backbone runs: a ViT
    (:class:`~stratavit.backbones.vit.Backbone`) or a CNN feature pyramid
    (:class:`~stratavit.backbones.pyramid.PyramidBackbone`). Objectives read this interface and
    ``is_pyramid``; they never import or test the concrete classes."""

    is_pyramid: bool
    """True for a CNN feature pyramid (levels are pyramid levels with their own ``strides``)."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def depth(self) -> int: ...

    @property
    def patch_size(self) -> int:
        """A ViT's patch; a pyramid's coarsest stride."""
        ...

    @property
    def img_size(self) -> int: ...

    def resolve_level(self, level: int) -> int: ...

    def __call__(self, x: Tensor, levels: Sequence[int], **kwargs: object) -> Features: ...
