"""CPU SyncBatchNorm: a plain batch norm on one process; with 2 gloo processes, outputs, gradients
and running statistics equal one process's ``nn.BatchNorm`` on the concatenated batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stratavit.engine.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm_cpu

WORLD = 2


def _net(seed: int = 0) -> nn.Sequential:
    """Linear -> BN1d (affine) -> ReLU -> Linear -> BN1d (no affine, momentum None)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5, bias=False),
        nn.BatchNorm1d(5, affine=False, momentum=None),
    )


def _conv(seed: int = 1) -> nn.Sequential:
    """BN2d (as SERE's relation modules) -> 1x1 conv -> BN2d."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))


def _data(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(8, 6, generator=g) * 3 + 1,  # 8 rows: 4 per process (equal split)
        "w": torch.randn(8, 5, generator=g),  # loss weights per output value
        "m": torch.randn(8, 4, 3, 3, generator=g) - 2,  # feature maps
        "wm": torch.randn(8, 4, 3, 3, generator=g),
    }


def test_convert_keeps_parameters_buffers_and_mode():
    net = _net()
    bn = net[1]
    bn.running_mean.fill_(0.5)
    net.eval()
    out = convert_sync_batchnorm_cpu(net)
    assert out is net and isinstance(net[1], CPUSyncBatchNorm) and isinstance(net[4], CPUSyncBatchNorm)
    assert net[1].weight is bn.weight and net[1].bias is bn.bias  # the same Parameter objects
    assert net[1].running_mean is bn.running_mean and not net[1].training
    assert net[4].weight is None and net[4].momentum is None and net[4].eps == bn.eps
    assert list(net.state_dict()) == list(_net().state_dict())  # same keys: checkpoints load both ways
    single = convert_sync_batchnorm_cpu(nn.BatchNorm2d(3))  # a batch norm at the root is replaced
    assert isinstance(single, CPUSyncBatchNorm) and single.num_features == 3


def test_without_distributed_it_is_a_plain_batch_norm():
    d = _data()
    ref, conv = _net(), convert_sync_batchnorm_cpu(_net())
    for _ in range(2):  # two training passes: running statistics, momentum 0.1 and cumulative (None)
        xr, xc = d["x"].clone().requires_grad_(), d["x"].clone().requires_grad_()
        (ref(xr) * d["w"]).sum().backward()
        (conv(xc) * d["w"]).sum().backward()
        torch.testing.assert_close(xc.grad, xr.grad)
    for (name, a), b in zip(ref.state_dict().items(), conv.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(conv[1].weight.grad, ref[1].weight.grad)
    ref.eval(), conv.eval()
    torch.testing.assert_close(conv(d["x"]), ref(d["x"]))


def test_train_uses_it_for_multi_process_cpu_runs_only():
    from stratavit.engine.train import (
        _sync_batchnorm,  # imported here: the spawned workers need not load Lightning
    )
    from stratavit.recipe import resolve_config

    def cfg(*over: str):
        return resolve_config("mocov3", ["train.accelerator=cpu", *over])

    assert _sync_batchnorm(cfg("train.devices=2"), on_cpu=True)
    assert not _sync_batchnorm(cfg("train.devices=2"))  # not torch's (CUDA-only) SyncBatchNorm on CPU
    assert not _sync_batchnorm(cfg("train.devices=1"), on_cpu=True)
    assert not _sync_batchnorm(cfg("train.devices=2", "train.sync_batchnorm=false"), on_cpu=True)


def _reference(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One process, plain ``nn.BatchNorm`` on all 8 rows: outputs, input and parameter gradients."""
    net, conv = _net(), _conv()
    x = d["x"].clone().requires_grad_()
    m = d["m"].clone().requires_grad_()
    out = {}
    for step in range(2):
        y, z = net(x), conv(m)
        loss = (y * d["w"]).sum() + (z * d["wm"]).sum()
        loss.backward()
        out[f"y{step}"], out[f"z{step}"] = y.detach(), z.detach()
    out["gx"], out["gm"] = x.grad, m.grad
    out.update({f"net.{k}": v.clone() for k, v in net.state_dict().items()})
    out.update({f"conv.{k}": v.clone() for k, v in conv.state_dict().items()})
    out.update({f"gnet.{k}": p.grad for k, p in net.named_parameters()})
    out.update({f"gconv.{k}": p.grad for k, p in conv.named_parameters()})
    net.eval(), conv.eval()
    out["y_eval"], out["z_eval"] = net(d["x"]).detach(), conv(d["m"]).detach()
    # a DDP-style step: loss = mean over rows, gradient of the batch mean
    torch.manual_seed(5)
    mlp = _net(3)
    (mlp(d["x"]) * d["w"]).sum(1).mean().backward()
    out.update({f"gmean.{k}": p.grad for k, p in mlp.named_parameters()})
    return out


def _worker(rank: int, init_file: str, out_dir: str, rows: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        d = _data()
        lo = sum(rows[:rank])
        sl = slice(lo, lo + rows[rank])  # unequal shares: the counts are all-reduced too
        net, conv = convert_sync_batchnorm_cpu(_net()), convert_sync_batchnorm_cpu(_conv())
        x = d["x"][sl].clone().requires_grad_()
        m = d["m"][sl].clone().requires_grad_()
        out = {}
        for step in range(2):
            y, z = net(x), conv(m)
            # the sum over processes of these losses is the reference's loss
            ((y * d["w"][sl]).sum() + (z * d["wm"][sl]).sum()).backward()
            out[f"y{step}"], out[f"z{step}"] = y.detach(), z.detach()
        out["gx"], out["gm"] = x.grad, m.grad
        out.update({f"net.{k}": v.clone() for k, v in net.state_dict().items()})
        out.update({f"conv.{k}": v.clone() for k, v in conv.state_dict().items()})
        for prefix, mod in (("gnet", net), ("gconv", conv)):
            for k, p in mod.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g)  # parameter gradient of the summed loss
                out[f"{prefix}.{k}"] = g
        net.eval(), conv.eval()
        out["y_eval"], out["z_eval"] = net(d["x"][sl]).detach(), conv(d["m"][sl]).detach()
        # torch's DDP wrapper (its own gradient all-reduce hooks run beside ours), equal halves
        torch.manual_seed(5)
        ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm_cpu(_net(3)))
        half = slice(rank * 4, rank * 4 + 4)
        (ddp(d["x"][half]) * d["w"][half]).sum(1).mean().backward()
        out.update({f"gmean.{k}": p.grad.clone() for k, p in ddp.module.named_parameters()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # release DDP's reducer and let both ranks finish their collectives before the group goes:
        # destroying it under a live reducer can abort a gloo process at exit
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path: Path):
    rows = [5, 3]
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), rows), nprocs=WORLD, join=True)
    ref = _reference(_data())
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in ("y0", "z0", "y1", "z1", "gx", "gm", "y_eval", "z_eval"):  # per row: concatenate the shares
        torch.testing.assert_close(torch.cat([g[key] for g in got]), ref[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in ref:
        if key.startswith(("net.", "conv.", "gnet.", "gconv.", "gmean.")):  # running stats and gradients
            for g in got:
                torch.testing.assert_close(g[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    assert int(got[0]["net.4.num_batches_tracked"]) == 2
    # the statistics really are global: per-process statistics would give a different output
    alone = _net()(_data()["x"][:5]).detach()
    assert (alone - got[0]["y0"]).abs().max() > 1e-2
