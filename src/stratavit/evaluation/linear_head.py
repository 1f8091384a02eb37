"""The one trainer of linear heads on frozen features (classification probe and dense probe).

Both probes train a single zero-initialised ``nn.Linear`` (a convex problem: no warm-up, no random
init) with AdamW -- decoupled weight decay on the weight matrix, none on the bias -- and a
learning rate cosine-decayed from ``lr`` to 0 over all steps, on shuffled mini-batches drawn by a
private ``torch.Generator``: the result depends only on the inputs and ``seed``, never on the
global RNG state. The probes differ only in what a batch's loss is (:func:`train_linear_head`'s
``batch_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["cosine_lr", "train_linear_head"]


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Learning rate of ``step`` (0-based) of ``total``: ``lr`` cosine-decayed to 0, no warm-up."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total))


def train_linear_head(
    linear: nn.Linear,
    n: int,
    batch_loss: Callable[[Tensor], Tensor | None],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int = 0,
    sorted_batches: bool = False,
) -> None:
    """Zero ``linear`` and train it for ``epochs`` passes over ``n`` samples, in place.

    Args:
        linear: the head's linear layer (its weight and bias are the trained parameters).
        n: number of training samples.
        batch_loss: ``indices (b,) int64 CPU -> loss`` of those samples, or ``None`` to skip the
            batch (it still counts as a step of the schedule).
        epochs, lr, weight_decay, batch_size: see the module docstring; the last partial batch is kept.
        seed: seeds the shuffling generator.
        sorted_batches: sort each batch's indices (sequential reads from memory-mapped features).
    """
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.AdamW(
        [
            {"params": [linear.weight], "weight_decay": weight_decay},
            {"params": [linear.bias], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    total = max(1, epochs * math.ceil(n / batch_size))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                if sorted_batches:
                    idx = idx.sort().values
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, step, total)
                step += 1
                loss = batch_loss(idx)
                if loss is None:
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
