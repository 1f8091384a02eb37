"""The few collective calls the losses need, on ``torch.distributed`` (no-ops on one process),
and per-sample seeds that do not depend on how a batch is split across processes."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def gather_concat(x: Tensor) -> Tensor:
    """All-gather ``x`` (B, ...) from every process and concatenate: (world · B, ...), no gradient.

    Every process must pass the same shape (true for equal per-process batches).
    """
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over processes (a new tensor; ``x`` is left unchanged)."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its backward is again the sum over processes of the incoming gradients.

    Every process uses the sum in its own loss ``L_r``, so ``∂(Σ_r L_r)/∂x_r = Σ_r ∂L_r/∂sum``.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def all_reduce_sum_differentiable(x: Tensor) -> Tensor:
    """Sum of ``x`` over processes with gradient (``x`` itself on one process).

    Every process must call it, and later run backward through it, in the same order (true when all
    processes run the same graph, as under DDP). With DDP's gradient averaging the parameters then
    get the gradient of the mean over processes of their losses.
    """
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x)


def sample_seeds(key: str, n_views: int, batch_size: int) -> list[int]:
    """63-bit seeds for this process's rows of a view-major batch of ``n_views · batch_size`` rows.

    Row ``v · B + i`` gets the seed of ``(key, v, rank · B + i)``: its view and the sample's position
    in the batch of all processes. One process holding the concatenated batch (``world · B``
    samples) therefore draws the same per-sample values as the processes that split it, so random
    choices made inside a training step do not depend on the number of processes. Assumes every
    process holds ``B`` samples (DDP with ``drop_last``).
    """
    offset = rank() * batch_size
    seeds = []
    for v in range(n_views):
        for i in range(batch_size):
            digest = hashlib.blake2b(f"{key}:{v}:{offset + i}".encode(), digest_size=8).digest()
            seeds.append(int.from_bytes(digest, "little") & (2**63 - 1))
    return seeds
