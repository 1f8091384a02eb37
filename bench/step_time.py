"""Training-step time of recipes on identical batches, interleaved in one process (ratios, not absolutes).

    .venv/bin/python bench/step_time.py --recipes dino local-global ibot sere --steps 30 \\
        [--override backbone.embed_dim=192 ...] [--device cuda]

Every recipe gets the same backbone, views and batch size (the demo's small ViT unless overridden,
with the DINO-family CPU heads of bench/compare_recipes.py); each measured step is forward (student
+ teacher), backward and the optimiser step, on real multi-crop batches of the shipped CIFAR-10
sample. Recipes take turns step by step, so machine noise hits them alike; the table reports the
median seconds per step and its ratio to the first recipe (the base method).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compare_recipes import recipe_overrides  # type: ignore[import-not-found]
from torch.utils.data import DataLoader

from stratavit.config import to_dict
from stratavit.data.datasets import SAMPLE_NAME, Indexed, build_dataset
from stratavit.data.views import MultiCropTransform, collate_views
from stratavit.demo import DEMO_OVERRIDES
from stratavit.engine.module import PretrainModule
from stratavit.recipe import resolve_config


class _FakeTrainer:
    """What the module's optimiser set-up reads from a Lightning trainer."""

    world_size = 1
    estimated_stepping_batches = 10_000
    num_training_batches = 100
    accumulate_grad_batches = 1
    optimizers: list = []
    global_step = 0
    current_epoch = 1  # past DINO's frozen-last-layer epoch: every head trains


def build(recipe: str, extra: list[str], device: torch.device) -> tuple[PretrainModule, torch.optim.Optimizer]:
    base = [o for o in DEMO_OVERRIDES if not o.startswith(("train.epochs", "objectives."))]
    cfg = resolve_config(recipe, [*base, *recipe_overrides(recipe, 10_000), *extra])
    module = PretrainModule(to_dict(cfg)).to(device)
    module._trainer = _FakeTrainer()  # type: ignore[assignment]
    opt = module.configure_optimizers()
    return module, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["dino", "local-global"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[], metavar="key=value")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--views-from", default=None,
                    help="recipe whose view settings make the shared batches (default: the first); e.g. the "
                         "multi-level recipe when it needs crops the base method does not read")
    args = ap.parse_args()
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
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        if device.type != "cpu":
            batch = batch.to(device)
        for recipe, (module, opt) in models.items():
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
            if step >= args.warmup:
                times[recipe].append(time.perf_counter() - t0)
        print(f"step {step + 1}/{args.warmup + args.steps}", end="\r", flush=True)
    base = statistics.median(times[args.recipes[0]])
    print("\n| recipe | median s/step | ratio to " + args.recipes[0] + " |\n|---|---|---|")
    for recipe in args.recipes:
        med = statistics.median(times[recipe])
        print(f"| {recipe} | {med:.3f} | {med / base:.2f}× |")


if __name__ == "__main__":
    main()
