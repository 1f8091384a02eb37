"""LARS (You et al. 2017) as the SimCLR / BYOL / MoCo v3 / MCL references use it: SGD with momentum
whose update of every weight matrix is rescaled by a layer-wise trust ratio.

For a parameter ``p`` with gradient ``g`` in a group with ``lars_adapt`` (weight matrices):

    d = g + wd · p
    q = η · ‖p‖ / ‖d‖      (1 where either norm is 0)
    v ← μ · v + q · d
    p ← p − lr · v

Groups without ``lars_adapt`` (biases, norms: the references' ``lars_exclude``) take a plain SGD
momentum step with their own weight decay (0 in stratavit's parameter groups).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """LARS with momentum.

    Args:
        params: parameters or groups; a group's ``lars_adapt`` (default True) turns the trust
            ratio on.
        lr: learning rate; weight_decay: ``wd``; momentum: ``μ``; eta: trust coefficient ``η``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr}, weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_adapt=True))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mu, eta, lr = group["weight_decay"], group["momentum"], group["eta"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars_adapt"]:
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm, one)
                    d.mul_(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(d)
                p.add_(buf, alpha=-lr)
        return loss
