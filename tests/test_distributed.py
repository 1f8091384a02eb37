"""Two real gloo processes: gathered InfoNCE and all-reduced DINO centre equal one process on the
concatenated batch (losses, DDP-averaged gradients, centre)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stratavit.objectives.dino import dino_loss, updated_center
from stratavit.objectives.infonce import infonce_loss

WORLD = 2
B, D, K = 6, 8, 16


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x1": torch.randn(WORLD * B, D, generator=g),
        "x2": torch.randn(WORLD * B, D, generator=g),
        "w": torch.randn(D, D, generator=g),
        "t1": torch.randn(WORLD * B, K, generator=g),
        "t2": torch.randn(WORLD * B, K, generator=g),
        "c": torch.randn(1, K, generator=g) * 0.1,
        "wd": torch.randn(K, D, generator=g),
    }


def _compute(d: dict[str, torch.Tensor], sl: slice) -> dict[str, torch.Tensor]:
    """Loss and gradients on the rows ``sl`` (the whole batch in one process, or a rank's share)."""
    w = d["w"].clone().requires_grad_(True)
    q1, q2 = d["x1"][sl] @ w, d["x2"][sl] @ w
    k1, k2 = d["x1"][sl] @ d["w"].t(), d["x2"][sl] @ d["w"].t()  # teacher: no grad
    l_nce = infonce_loss(q1, k2, 0.2) + infonce_loss(q2, k1, 0.2)
    (g_nce,) = torch.autograd.grad(l_nce, w)

    wd = d["wd"].clone().requires_grad_(True)
    s1, s2 = d["x1"][sl] @ wd.t(), d["x2"][sl] @ wd.t()
    t1, t2 = d["t1"][sl], d["t2"][sl]
    l_dino = dino_loss([s1, s2], [t1, t2], d["c"], 0.1, 0.04)
    (g_dino,) = torch.autograd.grad(l_dino, wd)
    center = updated_center(d["c"], torch.cat([t1, t2]), 0.9)
    return {"nce": l_nce.detach(), "g_nce": g_nce, "dino": l_dino.detach(), "g_dino": g_dino, "center": center}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = _compute(_data(), slice(rank * B, (rank + 1) * B))
        # DDP averages gradients over processes; do the same here.
        for key in ("g_nce", "g_dino", "nce", "dino"):
            dist.all_reduce(res[key])
            res[key] /= WORLD
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_match_one_process(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = _compute(_data(), slice(0, WORLD * B))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("nce", "dino"):
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6)
        for key in ("g_nce", "g_dino", "center"):
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6)
