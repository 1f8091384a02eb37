"""Teacher: the EMA copy of the backbone and of every objective head that has a teacher side."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Teacher(nn.Module):
    """EMA teacher. A ViT backbone always runs in eval mode (no drop-path); a CNN backbone with
    ``teacher_batch_stats`` (batch norm) and the heads stay in training mode like MoCo's momentum
    encoder. Parameters never receive gradients.

    Args:
        backbone: the student backbone (copied).
        heads: objective name -> the student module whose EMA copy is that objective's teacher side.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.heads = nn.ModuleDict({k: copy.deepcopy(v) for k, v in heads.items()})
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        if not getattr(self.backbone, "teacher_batch_stats", False):
            self.backbone.eval()
        return self

    @torch.no_grad()
    def update(self, backbone: nn.Module, heads: dict[str, nn.Module], momentum: float) -> None:
        """``θ_t ← m θ_t + (1 − m) θ_s`` for every parameter; buffers are copied."""
        pairs = [(self.backbone, backbone)] + [(self.heads[k], heads[k]) for k in self.heads]
        t_params, s_params = [], []
        for t_mod, s_mod in pairs:
            t_params += list(t_mod.parameters())
            s_params += [p.detach() for p in s_mod.parameters()]
            for tb, sb in zip(t_mod.buffers(), s_mod.buffers()):
                tb.copy_(sb)
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
