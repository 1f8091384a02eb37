"""The optimiser of a run: parameter groups, the optimiser ``optim.name`` names, per-tensor clipping."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stratavit.config import OptimConfig
from stratavit.engine.lars import LARS


def param_groups(modules: list[nn.Module]) -> list[dict[str, Any]]:
    """Trainable parameters split into weight-decayed (matrices) and not (biases, norms, tokens)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(o: OptimConfig, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimiser ``o.name`` names over stratavit's parameter groups (see :func:`param_groups`).

    LARS adapts (trust ratio) only the weight-decayed group, like the references' ``lars_exclude``
    of biases and norms.
    """
    if o.name == "lars":
        for g in groups:
            g["lars_adapt"] = g["apply_wd"]
        return LARS(groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.lars_eta)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@torch.no_grad()
def clip_per_tensor(params: list[Tensor], max_norm: float, eps: float = 1e-6) -> None:
    """Scale each gradient on its own to L2 norm ≤ ``max_norm`` (DINO's ``clip_gradients``):
    ``g ← g · max_norm / (‖g‖ + eps)`` where that factor is < 1; tensors without a gradient are skipped."""
    for p in params:
        if p.grad is not None:  # the factor stays a tensor: no host sync per parameter on a GPU
            p.grad.mul_((max_norm / (p.grad.norm(2) + eps)).clamp_(max=1.0))
