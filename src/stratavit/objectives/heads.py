"""Small heads shared by objectives: MoCo v3 MLPs and the DINO head."""

from __future__ import annotations

from dataclasses import dataclass

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


def moco_heads(in_dim: int, cfg: ContrastiveHeadConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """MoCo v3 projector (in_dim -> proj_dim) and predictor (proj_dim -> proj_dim), in that order.

    As in MoCo v3, the projector ends in a batch norm without affine and the predictor does not.
    """
    projector = moco_mlp(in_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
    predictor = moco_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, cfg.pred_layers, last_bn=False)
    return projector, predictor


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

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
