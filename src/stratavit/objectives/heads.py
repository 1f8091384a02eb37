"""Small heads shared by objectives: MoCo v3 MLPs and the DINO head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.objectives.base import ObjectiveConfig


@dataclass
class ContrastiveHeadConfig(ObjectiveConfig):
    """Fields of a MoCo v3-style contrastive objective: temperature, projector and predictor sizes."""

    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    proj_layers: int = 3
    pred_hidden_dim: int = 4096
    pred_layers: int = 2
    pred_last_bn: bool | None = None
    """Whether the predictor ends with BatchNorm (affine=False), like the projector. ``None`` = the
    authors' choice for the backbone: MoCo v3's ``MoCo_ViT`` keeps it (True on a ViT), its ResNet
    variant drops it (False on a CNN backbone)."""


def predictor_last_bn(cfg: ContrastiveHeadConfig, backbone: nn.Module) -> bool:
    """``cfg.pred_last_bn``, or MoCo v3's choice when unset: True on a ViT, False on a CNN pyramid."""
    if cfg.pred_last_bn is not None:
        return cfg.pred_last_bn
    return not backbone.is_pyramid


def moco_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: (Linear no-bias, BN, ReLU) × (num_layers − 1), Linear no-bias, BN without affine.

    (B, in_dim) -> (B, out_dim).
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def moco_predictor(cfg: ContrastiveHeadConfig, last_bn: bool) -> nn.Sequential:
    """MoCo v3 predictor (proj_dim -> pred_hidden_dim -> proj_dim), (B, proj_dim) -> (B, proj_dim)."""
    return moco_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, cfg.pred_layers, last_bn=last_bn)


def moco_heads(in_dim: int, cfg: ContrastiveHeadConfig, pred_last_bn: bool = True) -> tuple[nn.Sequential, nn.Sequential]:
    """MoCo v3 projector (in_dim -> proj_dim) and predictor (proj_dim -> proj_dim), in that order.

    As in MoCo v3, the projector ends in a batch norm without affine; the predictor does too on a
    ViT (``pred_last_bn``, see :func:`predictor_last_bn`), not on a ResNet.
    """
    projector = moco_mlp(in_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
    return projector, moco_predictor(cfg, pred_last_bn)


def per_view(head: Callable[[Tensor], Tensor], x: Tensor, n_views: int) -> Tensor:
    """``head`` applied to each view's rows on their own: (n_views · B, D) view-major -> (n_views · B, D').

    MoCo v3 runs its encoder and heads once per view (``q1 = h(g(f(x1)))``, ``q2 = h(g(f(x2)))``), so
    the heads' batch-norm statistics are those of one view's batch, not of both views together.
    """
    if n_views <= 1:
        return head(x)
    return torch.cat([head(chunk) for chunk in x.chunk(n_views)])


class DINOHead(nn.Module):
    """DINO projection head: MLP (GELU) -> l2-normalise -> weight-normalised linear to K prototypes.

    (B, in_dim) -> (B, out_dim). With ``norm_last_layer`` the weight-norm gain is fixed at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(num_layers, 1) - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(M, in_dim) -> (M, bottleneck_dim): the MLP's output, l2-normalised."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def prototypes(self, z: Tensor, scale: float = 1.0) -> Tensor:
        """(M, bottleneck_dim) -> (M, out_dim) logits times ``scale``.

        The last layer is linear, so ``prototypes(z, 1/τ) == prototypes(z) / τ``; scaling its
        (out_dim, bottleneck_dim) weight instead of the (M, out_dim) logits saves a pass over them.
        """
        if scale == 1.0:
            return self.last_layer(z)
        return F.linear(z, self.last_layer.weight * scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(self.bottleneck(x))
