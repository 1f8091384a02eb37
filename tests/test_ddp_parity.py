"""Every recipe under 2 gloo processes equals one process on the concatenated batch.

For each recipe (a tiny ViT, small heads), :class:`~stratavit.engine.module.PretrainModule` is built from
the same seed (a) in one process that trains on a fixed batch of ``2B`` samples and (b) in two
gloo processes that each train on their ``B`` samples and average gradients exactly as DDP does
(all-reduce, divide by the number of processes, before ``on_after_backward`` and the optimiser
step). Batch norms are converted with :func:`~stratavit.engine.sync_batchnorm.convert_sync_batchnorm_cpu`
in both (a plain batch norm in (a)). Each step runs ``compute_losses``, backward, the gradient
averaging, ``on_after_backward``, an SGD step and the engine's EMA update
(``update_teacher``). Compared, per step: the total loss and every logged term (the mean over
processes of the per-process values, which is what equals the single-process value: every
objective is a mean over equally many samples per process, with keys gathered and centres
all-reduced over processes); after the steps, every parameter and buffer of student and teacher
(DINO / iBOT / patch-match centres, InfoNCE queues, batch-norm running statistics).

SGD (momentum 0.9, weight decay 0.01) rather than the engine's AdamW: Adam divides each gradient
coordinate by its own running magnitude, so a coordinate whose true gradient is ~0 moves by ±lr
according to the sign of float round-off, and a parameter comparison would test the rounding, not
the maths. SGD keeps a parameter difference proportional to the gradient difference.

What is *not* split-invariant, by design, and is compared differently:

- ``mcl``: a montage tiles one process's own images into canvases (levels >= 1 see only that
  process's images, drawn with a rank-seeded permutation), so those levels cannot equal a
  single-process run. The parity run uses ``montage_levels=1`` (level 0: each view against the
  gathered targets, deterministic); :func:`test_montage_levels_under_ddp` checks separately that
  with 2 levels the level-0 term still matches, the level-1 term is finite and gradients reach
  level 1's predictor, identically on both processes.
- ``mcvt``'s prototype term: PCL contrasts each query with the prototypes of the samples *in its
  own process's batch* (plus negatives from the clusters no sample of that batch is in), so a
  process's term depends on its share. After the warm-up steps (which are compared fully) and an
  E-step whose k-means must give the same prototypes from embeddings split across processes, one
  more step checks the InfoNCE terms against one process and each process's prototype term
  against one process computing it on that process's share of the (identical) queries.
- ``ibot/teacher_patch_entropy`` is a mean over the masked patches, whose number differs between
  processes; it is not compared.

Per-sample randomness inside a step (iBOT masks, patch-match jitter) is seeded by the sample's
position in the batch of all processes (:func:`stratavit.distributed.sample_seeds`), so the two
runs draw the same values. Drop-path is set to 0: timm draws it from the global generator, which
is per process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from stratavit.config import to_dict
from stratavit.data.views import (
    MultiCropTransform,
    MultiViewBatch,
    collate_views,
    eval_transform,
)
from stratavit.engine.module import PretrainModule
from stratavit.engine.optim import param_groups
from stratavit.engine.sync_batchnorm import convert_sync_batchnorm_cpu
from stratavit.objectives.protonce.objective import protonce_loss
from stratavit.recipe import resolve_config

WORLD = 2
B = 8  # samples per process; the single process trains on WORLD * B. MoCo v3's heads normalise each view's
# batch on its own (16 samples here): with 8 the round-off of a near-dead ReLU channel is amplified past 1e-5
STEPS = 2
LR, MOMENTUM, WD, EMA = 0.1, 0.9, 0.01, 0.9
N_EMBED = 16  # images of mcvt's E-step

COMMON = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=2", "backbone.drop_path_rate=0.0", "views.global_size=32",
    "views.local_size=16", f"data.batch_size={B}", "train.progress_bar=false",
]
NCE = ["proj_hidden_dim=64", "proj_dim=16", "pred_hidden_dim=64"]
DINO_HEAD = ["out_dim=64", "hidden_dim=32", "bottleneck_dim=16", "freeze_last_layer_epochs=0"]


def _obj(name: str, keys: list[str]) -> list[str]:
    return [f"objectives.{name}.{k}" for k in keys]


RECIPES: dict[str, list[str]] = {
    "mocov3": _obj("infonce", NCE),
    "dino": ["views.local_crops=2", *_obj("dino", DINO_HEAD)],
    "mcvt": ["backbone.depth=4", *_obj("infonce", [*NCE, "queue_size=16"]),
             *_obj("protonce", [*NCE, "num_clusters=[3,5]", "warmup_epochs=1", "num_negatives=100"])],
    "cl-edi": [*_obj("infonce", NCE), *_obj("patch_aggregate", NCE)],
    "local-global": ["views.local_crops=2", *_obj("patch_match", [*DINO_HEAD, "patch_jitter_p=0.5"])],
    "ibot": ["views.local_crops=2", *_obj("ibot_mim", DINO_HEAD)],
    "sere": ["views.local_crops=2", *_obj("ibot_mim", DINO_HEAD)],
    "mcl": ["views.local_crops=0", *_obj("montage", [*NCE, "montage_levels=1", "level_weights=[1.0]", "tile_copies=[1]", "pyramid_dim=16"])],
}
MONTAGE2 = ["views.local_crops=2", "views.local_size=32",
            *_obj("montage", [*NCE, "montage_levels=2", "level_weights=[0.5,0.5]", "tile_copies=[1,1]", "pyramid_dim=16"])]
NOT_SPLIT_INVARIANT = {"ibot/teacher_patch_entropy"}  # a mean over a per-process number of masked patches


def _config(recipe: str, extra: list[str]) -> dict[str, Any]:
    return to_dict(resolve_config(recipe, [*COMMON, *extra]))


def _share(x: Any, rank: int, world: int, b: int) -> Any:
    """This process's rows of a batch (every tensor, also inside the view dataclasses)."""
    if world == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x[rank * b : (rank + 1) * b]
    if isinstance(x, list):
        return [_share(v, rank, world, b) for v in x]
    if dataclasses.is_dataclass(x):
        fields = dataclasses.fields(x)
        return dataclasses.replace(x, **{f.name: _share(getattr(x, f.name), rank, world, b) for f in fields})
    return x


def _mean(x: Any, world: int) -> float:
    """Mean over processes of a per-process scalar."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone()
    if world > 1:
        dist.all_reduce(t)
    return float(t) / world


def _build(config: dict[str, Any]) -> tuple[PretrainModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = PretrainModule(config)
    convert_sync_batchnorm_cpu(module)
    module.train()
    module._schedules = {"lr": np.full(8, LR), "wd": np.full(8, WD), "momentum": np.full(8, EMA)}
    groups = param_groups([module.backbone, module.objectives])
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return module, opt


def _step(module: PretrainModule, opt: torch.optim.Optimizer, batch: MultiViewBatch, world: int) -> dict[str, float]:
    """One training step as Lightning + DDP run it; returns the per-process-mean loss and logs."""
    opt.zero_grad(set_to_none=True)
    total, logs = module.compute_losses(batch)
    total.backward()
    if world > 1:  # DDP: average the gradients over processes
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    module.on_after_backward()
    opt.step()
    module.update_teacher(0)  # the teacher's EMA update (the schedules are constant)
    out = {"loss": _mean(total, world)}
    out.update({k: _mean(v, world) for k, v in logs.items() if k not in NOT_SPLIT_INVARIANT})
    return out


def _estep(module: PretrainModule, images: torch.Tensor, rank: int, world: int) -> dict[str, torch.Tensor]:
    """mcvt's E-step as :class:`~stratavit.engine.callbacks.dataset_pass.DatasetPass` shards it (index ``i``
    on process ``i mod world``)."""
    obj = module.objectives["protonce"]
    shard = torch.arange(rank, images.shape[0], world)
    module.teacher.eval()
    with torch.no_grad():
        feats = module.teacher.backbone(images[shard], obj.teacher_levels())
        emb = obj.embed(feats, module.teacher.heads["protonce"])
    module.teacher.train()
    obj.on_dataset_embeddings(emb, shard, images.shape[0], epoch=1)
    out = {}
    for p in obj.prototypes:
        k = p.centroids.shape[0]
        out.update({f"k{k}.centroids": p.centroids, f"k{k}.assignments": p.assignments, f"k{k}.phi": p.phi})
    return out


def _proto_step(module: PretrainModule, batch: MultiViewBatch, rank: int, world: int) -> dict[str, Any]:
    """One step of mcvt with prototypes: InfoNCE terms (split-invariant) and the prototype term of
    each process's share, computed from the queries this process sees."""
    obj = module.objectives["protonce"]
    seen: dict[str, torch.Tensor] = {}
    contrast = obj.contrast

    def spy(*args: Any, **kwargs: Any) -> Any:
        total, metrics, queries = contrast(*args, **kwargs)
        seen["q"] = queries[obj.levels[0]].detach()
        return total, metrics, queries

    obj.contrast = spy
    _, logs = module.compute_losses(batch)
    del obj.contrast
    out: dict[str, Any] = {k: _mean(logs[k], world) for k in ("loss/infonce", "protonce/infonce")}
    proto = torch.tensor([float(logs["protonce/proto"])], dtype=torch.float64)
    if world > 1:  # each process's own term, not their mean
        parts = [torch.empty_like(proto) for _ in range(world)]
        dist.all_gather(parts, proto)
        out["proto_per_process"] = [float(p) for p in parts]
    else:  # what each of WORLD processes must compute on its share of these queries
        views = seen["q"].chunk(module.cfg.views.global_crops)
        out["proto_per_process"] = [
            float(torch.stack([
                protonce_loss(q[r * B : (r + 1) * B], batch.indices[r * B : (r + 1) * B], p, obj.cfg.num_negatives)
                for q in views for p in obj.prototypes
            ]).mean())
            for r in range(WORLD)
        ]
        out["proto_whole_batch"] = float(logs["protonce/proto"])
    return out


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict (ProtoNCE's prototypes travel as ``_extra_state``, compared by ``_estep``)."""
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _run_all(rank: int, world: int, data: dict[str, Any]) -> dict[str, Any]:
    """Every recipe: parity steps, the final state, and the recipe-specific extra checks."""
    results: dict[str, Any] = {}
    for recipe, extra in RECIPES.items():
        module, opt = _build(_config(recipe, extra))
        initial = _tensors(module)
        batch = _share(data["batches"][recipe], rank, world, B)
        res: dict[str, Any] = {"steps": [_step(module, opt, batch, world) for _ in range(STEPS)]}
        res["state"] = _tensors(module)
        res["initial"] = initial
        if recipe == "mcvt":
            res["estep"] = _estep(module, data["embed_images"], rank, world)
            res["proto_step"] = _proto_step(module, batch, rank, world)
        results[recipe] = res
    # mcl with a real montage level: level 0 is split-invariant, level 1 is not (see the module doc)
    module, opt = _build(_config("mcl", MONTAGE2))
    obj = module.objectives["montage"]
    logs = _step(module, opt, _share(data["batches"]["mcl-2"], rank, world, B), world)
    grad_l1 = [p.grad.clone() for p in obj.predictors[1].parameters() if p.grad is not None]
    results["mcl-2"] = {"logs": logs, "grad_l1": grad_l1}
    return results


def _worker(rank: int, init_file: str, out_dir: str, data: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(_run_all(rank, WORLD, data), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _data(cifar_train: Path) -> dict[str, Any]:
    """Fixed batches of WORLD * B CIFAR images (each recipe's views) and mcvt's E-step images."""
    classes = sorted(d for d in cifar_train.iterdir() if d.is_dir())
    files = [f for d in classes for f in sorted(d.glob("*.jpg"))[:2]][: max(WORLD * B, N_EMBED)]  # mixed classes
    images = [Image.open(f).convert("RGB") for f in files]
    batches = {}
    for name, (recipe, extra) in {**{r: (r, e) for r, e in RECIPES.items()}, "mcl-2": ("mcl", MONTAGE2)}.items():
        cfg = resolve_config(recipe, [*COMMON, *extra])
        tf = MultiCropTransform(cfg.views, cfg.backbone.patch_size)
        torch.manual_seed(1)
        batches[name] = collate_views([(tf(im), 0, i) for i, im in enumerate(images[: WORLD * B])])
    ev = eval_transform(32, cfg.views.mean, cfg.views.std)
    return {"batches": batches, "embed_images": torch.stack([ev(im) for im in images[:N_EMBED]])}


def _close(a: Any, b: Any, atol: float, what: str, rtol: float = 0.0) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process_for_every_recipe(tmp_path: Path, cifar_train: Path):
    data = _data(cifar_train)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), data), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _run_all(0, 1, data)

    for recipe in RECIPES:
        one, ddp = single[recipe], ranks[0][recipe]
        for step, (a, b) in enumerate(zip(one["steps"], ddp["steps"])):
            assert set(a) == set(b), recipe
            assert len(a) >= 2 and np.isfinite(a["loss"]), recipe
            for key in a:  # total loss and every logged term, within 1e-4
                _close(b[key], a[key], 1e-4, f"{recipe} step {step} {key}")
        floats = {k: v for k, v in one["state"].items() if v.is_floating_point() and v.numel()}
        moved = max(float((v - one["initial"][k]).abs().max()) for k, v in floats.items())
        assert moved > 0.1, f"{recipe}: the steps barely changed the model ({moved})"
        # mcl: with the authors' blur (issue 15) the montage neck's batch norms see low-variance tiles that
        # amplify float32 summation-order differences: up to 2.5e-4 on 19 of 2,304 neck weights (measured;
        # 1e-5 held with the old, weaker blur). Without blur mocov3 lands at 1.7e-5 instead: the 1e-5 edge
        # is data-dependent, and machine-dependent: a fresh CI-like VM (2026-12-08) put one of mocov3's 2,048
        # projector weights at 1.12e-5. Hence 5e-5 for the others. A real split error (unsynchronised
        # statistics) moves weights by 1e-2 and more, 200 times that.
        tol = 5e-4 if recipe == "mcl" else 5e-5
        for key, value in one["state"].items():  # student, teacher, centres, queues, BN statistics
            for r in range(WORLD):  # (the DINO-style heads' pre-normalisation biases move by ~100 with SGD)
                _close(ranks[r][recipe]["state"][key], value, tol, f"{recipe} rank {r} {key}", rtol=tol)

    # mcvt: k-means of embeddings split across processes == k-means of all of them in one process
    one, ddp = single["mcvt"], ranks[0]["mcvt"]
    for key, value in one["estep"].items():
        if key.endswith("assignments"):
            assert torch.equal(ddp["estep"][key], value), key
        else:
            _close(ddp["estep"][key], value, 1e-5, f"mcvt E-step {key}")
    assert one["estep"]["k3.assignments"].unique().numel() == 3
    p1, p0 = one["proto_step"], ddp["proto_step"]
    for key in ("loss/infonce", "protonce/infonce"):
        _close(p0[key], p1[key], 1e-4, f"mcvt with prototypes: {key}")
    _close(p0["proto_per_process"], p1["proto_per_process"], 1e-4, "mcvt: each process's prototype term")
    assert ranks[1]["mcvt"]["proto_step"]["proto_per_process"] == p0["proto_per_process"]
    # ... and it is really not the whole-batch term (PCL's per-process prototype set), so this check has teeth
    assert abs(np.mean(p1["proto_per_process"]) - p1["proto_whole_batch"]) > 1e-3

    # mcl with 2 montage levels under DDP
    one, ddp = single["mcl-2"], [ranks[r]["mcl-2"] for r in range(WORLD)]
    _close(ddp[0]["logs"]["montage/level0"], one["logs"]["montage/level0"], 1e-4, "mcl montage level 0")
    for r in range(WORLD):
        assert np.isfinite(ddp[r]["logs"]["montage/level1"]) and ddp[r]["logs"]["montage/level1"] > 0
        assert ddp[r]["grad_l1"] and all(g.abs().sum() > 0 for g in ddp[r]["grad_l1"])
        for g, h in zip(ddp[r]["grad_l1"], ddp[0]["grad_l1"]):
            assert torch.equal(g, h)  # the averaged gradient is the same on both processes
