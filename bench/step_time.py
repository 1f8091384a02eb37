"""Training-step time of recipes on identical batches, interleaved in one process (ratios, not absolutes).

    cd bench && PYTHONPATH=../src ../.venv/bin/python step_time.py --recipes dino local-global [lg8=local-global] \\
        --steps 30 [--threads 1] \\
        [--override backbone.embed_dim=192 mcl:objectives.montage.pyramid_dim=96 lg8:objectives.patch_match.max_patch_pairs=8] \\
        [--split] [--device cuda] [--profile 2]

Every recipe gets the same backbone, views and batch size (the demo's small ViT unless overridden,
with the DINO-family CPU heads of bench/compare_recipes.py); each measured step is forward (student
+ teacher), backward and the optimiser step, on real multi-crop batches of the shipped CIFAR-10
sample. Recipes take turns step by step, so machine noise hits them alike; the table reports the
median seconds per step and its ratio to the first recipe (the base method), and the median of
the per-step ratios (each step's time over the base's time in the same round), which cancels
load that changes from round to round. ``--threads N`` sets torch's intra-op threads (1 gives
steadier numbers on a shared machine). ``--split`` also times, each round, every recipe's
objectives alone (forward + backward on the round's features held fixed): what the method adds
on top of the backbone. ``--profile N`` then profiles N more steps of every recipe
(torch profiler, CPU) and prints each one's most expensive operators.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
from compare_recipes import recipe_overrides  # type: ignore[import-not-found]
from torch.utils.data import DataLoader

from stratavit.backbones.features import LevelFeatures
from stratavit.data.datasets import SAMPLE_NAME, Indexed, build_dataset
from stratavit.data.views import MultiCropTransform, MultiViewBatch, collate_views
from stratavit.demo import DEMO_OVERRIDES
from stratavit.engine.module import PretrainModule
from stratavit.engine.standalone import attach
from stratavit.recipe import resolve_config


def build(entry: str, extra: list[str], device: torch.device) -> tuple[PretrainModule, torch.optim.Optimizer]:
    """The recipe's module on the demo backbone with the CPU heads, ``extra`` overrides on top: a plain
    ``key=value`` applies to every recipe, ``LABEL:key=value`` to that entry only. ``entry`` is a recipe
    name (its own label) or ``LABEL=RECIPE`` (the same recipe twice with different overrides)."""
    label, _, recipe = entry.rpartition("=")
    label = label or recipe
    base = [o for o in DEMO_OVERRIDES if not o.startswith(("train.epochs", "objectives.", "views.photometric"))]
    mine = [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in extra
            if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == label]
    cfg = resolve_config(recipe, [*base, *recipe_overrides(recipe, 10_000), *mine])
    module = PretrainModule(cfg).to(device)
    if cfg.train.compile:  # as the engine does: student and teacher backbones (the warm-up steps pay it)
        module.compile_backbones()
    attach(module)
    opt = module.configure_optimizers()
    return module, opt


def train_step(module: PretrainModule, opt: torch.optim.Optimizer, batch: MultiViewBatch, device: torch.device) -> float:
    """One measured step: forward (student + teacher), backward, optimiser step; seconds."""
    module.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, _ = module.compute_losses(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _leaves(feats: dict | None) -> dict | None:
    """The same features as leaf tensors that take gradients: the objectives' backward stops at them."""
    if feats is None:
        return None
    return {lv: LevelFeatures(f.tokens_pre.detach().requires_grad_(), f.grid, f.norm) for lv, f in feats.items()}


def objective_step(module: PretrainModule, batch: MultiViewBatch, device: torch.device) -> float:
    """The objectives' own cost: their forward + backward on this batch's features held fixed (no
    backbone forward or backward, no optimiser); seconds."""
    module.train()
    with torch.no_grad():
        student, teacher = module.compute_features(module.finish_views(batch, 0))
    student = dataclasses.replace(student, global_=_leaves(student.global_), local=_leaves(student.local),
                                  extra={k: _leaves(v) for k, v in student.extra.items()})
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    total, _ = module.objective_losses(student, teacher, module.state())
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return seconds


def profile(models: dict[str, tuple[PretrainModule, torch.optim.Optimizer]], batch: MultiViewBatch,
            device: torch.device, steps: int) -> None:
    """The most expensive operators of ``steps`` steps of every recipe (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for recipe, (module, opt) in models.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(module, opt, batch, device)
        print(f"\n## {recipe}: {steps} steps\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["dino", "local-global"],
                    help="recipe names, or LABEL=RECIPE to time a recipe again under LABEL: overrides")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[], metavar="[RECIPE:]key=value",
                    help="config overrides for every recipe, or with RECIPE: for that recipe only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steps of every recipe")
    ap.add_argument("--split", action="store_true",
                    help="also time every recipe's objectives alone (forward + backward on fixed features) each step")
    ap.add_argument("--views-from", default=None,
                    help="recipe whose view settings make the shared batches (default: the first); e.g. the "
                         "multi-level recipe when it needs crops the base method does not read")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {r: build(r, args.override, device) for r in args.recipes}
    cfg = models[args.views_from or args.recipes[0]][0].cfg
    # the same views for every recipe: the first (or --views-from) recipe's view settings
    transform = MultiCropTransform(cfg.views, cfg.backbone.patch_size)
    data = Indexed(build_dataset(f"{SAMPLE_NAME}:train", transform=transform))
    loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate_views, num_workers=1)
    batches = iter(loader)
    times: dict[str, list[float]] = {r: [] for r in args.recipes}
    own: dict[str, list[float]] = {r: [] for r in args.recipes}
    warm: dict[str, float] = {r: 0.0 for r in args.recipes}  # what the warm-up steps took (with train.compile: the compile)
    batch = None
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        if device.type != "cpu":
            batch = batch.to(device)
        for recipe, (module, opt) in models.items():
            seconds = train_step(module, opt, batch, device)
            if step >= args.warmup:
                times[recipe].append(seconds)
            else:
                warm[recipe] += seconds
            if args.split and step >= args.warmup:
                own[recipe].append(objective_step(module, batch, device))
        print(f"step {step + 1}/{args.warmup + args.steps}", end="\r", flush=True)
    first = args.recipes[0]
    base = statistics.median(times[first])
    print(f"\n{args.steps} steps after {args.warmup} warm-up steps, {torch.get_num_threads()} thread(s), "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"| recipe | median s/step | ratio of medians to {first} | median of per-step ratios | warm-up s |"
          "\n|---|---|---|---|---|")
    for recipe in args.recipes:
        med = statistics.median(times[recipe])
        per_step = statistics.median(t / b for t, b in zip(times[recipe], times[first]))
        print(f"| {recipe} | {med:.3f} | {med / base:.2f}× | {per_step:.2f}× | {warm[recipe]:.1f} |")
    if args.split:
        print("\n| recipe | objectives alone, median s (fwd + bwd on fixed features) | share of its step |\n|---|---|---|")
        for recipe in args.recipes:
            o = statistics.median(own[recipe])
            print(f"| {recipe} | {o:.3f} | {o / statistics.median(times[recipe]):.0%} |")
    if args.profile and batch is not None:
        profile(models, batch, device, args.profile)


if __name__ == "__main__":
    main()
