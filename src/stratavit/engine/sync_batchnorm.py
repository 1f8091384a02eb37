"""Batch norm with statistics over all processes, on any device (torch's ``SyncBatchNorm`` needs a GPU).

MoCo v3-style heads (:func:`stratavit.objectives.heads.moco_mlp`) and SERE's relation modules use
batch norm; their reference runs synchronise its statistics across GPUs. For multi-process CPU runs
(gloo), :func:`convert_sync_batchnorm_cpu` swaps every ``BatchNorm1d/2d/3d`` for
:class:`CPUSyncBatchNorm`, which in training mode under ``torch.distributed`` with more than one
process normalises with the mean and (biased) variance of the batch of *all* processes:

    mean = Σ_r Σ x / N,   var = Σ_r Σ (x − mean)² / N,   N = Σ_r n_r

(two all-reduces; ``n_r`` is this process's count of values per channel, so processes may hold
different batch sizes). The all-reduces are differentiable (the backward all-reduces the gradients
of the statistics), so with DDP's gradient averaging every parameter gets exactly the gradient of
one process on the concatenated batch. The running statistics are updated with the same global
mean and unbiased variance ``var · N / (N − 1)`` on every process, as ``nn.BatchNorm`` does on one.

On one process, in eval mode, or without ``torch.distributed`` it *is* ``nn.BatchNorm``
(``F.batch_norm``), so a converted model behaves identically there and its state dict has the
same keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stratavit.distributed import all_reduce_sum_differentiable, is_distributed

__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm_cpu"]


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over inputs ``(N, C, *)`` whose training statistics span all processes.

    Same arguments, parameters and buffers as ``nn.BatchNorm1d/2d/3d``; computes in float32 and
    returns the input's dtype.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        if c != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in dimension 1, got {c}")
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.float()
        n_local = input.numel() // max(c, 1)
        # sums and the count travel in float64 (exact counts beyond 2^24 values per channel)
        local = torch.cat([x.sum(dims).double(), torch.tensor([float(n_local)], dtype=torch.float64, device=x.device)])
        summed = all_reduce_sum_differentiable(local)  # (C + 1,)
        n = int(summed[-1].item())
        if n <= 1:
            raise ValueError(f"expected more than 1 value per channel when training over all processes, got {n}")
        mean = (summed[:c] / n).float()  # (C,)
        centred = x - mean.reshape(shape)
        var = (all_reduce_sum_differentiable((centred * centred).sum(dims).double()) / n).float()  # (C,) biased
        if self.track_running_stats:
            assert self.num_batches_tracked is not None and self.running_mean is not None
            assert self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            out = out * self.weight.float().reshape(shape)
        if self.bias is not None:
            out = out + self.bias.float().reshape(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm_cpu(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`CPUSyncBatchNorm` (in place).

    The new layers take over the old ones' parameters and buffers (the same tensor objects, so an
    optimiser built before keeps working), their ``eps``, ``momentum``, ``affine``,
    ``track_running_stats`` and training mode. Returns ``module``, or the new layer if ``module``
    itself is a batch norm.
    """
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=_device_of(module),
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm_cpu(child))
    return out


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return None
