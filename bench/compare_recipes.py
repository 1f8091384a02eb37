"""Compare recipes at an equal wall-clock budget on CIFAR-10 (shared JPEGs), on this machine.

    .venv/bin/python bench/compare_recipes.py --cifar DIR --out /tmp/cmp --budget 240 \\
        --recipes mocov3 mcvt cl-edi --train-images 10000 1000

DIR holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (the unpacked shared CIFAR-10).
For every training-set size and recipe:

1. probe: a short run (``--probe-steps`` steps) estimates the seconds per training step and,
   for ProtoNCE, the seconds of one E-step (the table's s/step and overhead are measured again
   in the real run: its wall time minus its E-steps, over its steps);
2. run: the schedule is laid out over the number of steps that fits the budget (E-steps
   included) and ``train.max_time_s`` caps the wall clock at the budget;
3. evaluate: kNN (k 20, T 0.07) and linear probe at every block (CLS and mean patch), the
   correspondence score per block and, with ``--dense``, the dense probe on the shipped horses
   sample, with a fixed labelled bank (``--eval-train`` images of the train split) and test set.

The first recipe listed is the base of the step-overhead column.

Every run uses the same backbone, views, batch and optimiser (the demo's small ViT, see
``stratavit.demo``); only the objectives differ. Prints a Markdown table and writes it to
OUT/compare.md (and the raw numbers to OUT/compare.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from stratavit.demo import DEMO_OVERRIDES
from stratavit.engine.train import pretrain
from stratavit.evaluation.run import evaluate_run


def recipe_overrides(recipe: str, n_images: int) -> list[str]:
    """Small heads for a CPU budget; cluster counts scaled with the data set (PCL: ~N/100..N/25)."""
    small = ["proj_hidden_dim=1024", "pred_hidden_dim=1024"]
    if recipe == "mocov3":
        return [f"objectives.infonce.{s}" for s in small]
    if recipe == "mcvt":
        ks = [max(2, n_images // 100), max(4, n_images // 50), max(8, n_images // 25)]
        return [f"objectives.infonce.{s}" for s in small] + [f"objectives.protonce.{s}" for s in small] + [
            f"objectives.protonce.num_clusters=[{','.join(map(str, ks))}]",
        ]
    if recipe == "cl-edi":
        return [f"objectives.infonce.{s}" for s in small] + [f"objectives.patch_aggregate.{s}" for s in small]
    if recipe == "mcl-resnet":
        return [f"objectives.montage.{s}" for s in small] + ["views.local_blur_p=0.0"]
    if recipe == "mcl":
        return [f"objectives.montage.{s}" for s in small] + [
            "views.local_crops=6", "views.local_size=32", "views.local_scale=[0.2,1.0]", "views.local_blur_p=0.0",
        ]
    dino_small = ["out_dim=4096", "hidden_dim=512", "bottleneck_dim=128"]
    dino_views = ["views.local_crops=4", "views.local_size=16", "views.local_scale=[0.1,0.4]"]
    if recipe == "dino":
        return dino_views + [f"objectives.dino.{s}" for s in dino_small]
    if recipe == "local-global":  # crops of the original 32-px images, like dino (the recipe resizes to 256 first)
        return dino_views + ["views.resize=null"] + [f"objectives.patch_match.{s}" for s in dino_small]
    if recipe == "ibot":
        return dino_views + [f"objectives.ibot_mim.{s}" for s in dino_small]
    if recipe == "sere":
        return dino_views + [f"objectives.ibot_mim.{s}" for s in dino_small]
    return []


def _metric_values(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    out = []
    with metrics_csv.open() as fh:
        for row in csv.DictReader(fh):
            if row.get(key):
                out.append((int(float(row["step"])), float(row[key])))
    return out


def per_block(rows: list[dict[str, Any]], key: str) -> str:
    """``a / b / c`` of one per-block metric (``–`` when absent)."""
    return " / ".join(f"{r[key]:.1f}" for r in rows) if rows else "–"


def probe(recipe: str, common: list[str], out: Path, steps: int) -> dict[str, float]:
    """Seconds per step (median over logged steps) and seconds per E-step (0 if none)."""
    run = out / "probe"
    started = time.time()
    over = [*common, f"train.max_steps={steps}", "train.log_every_n_steps=1", "train.epochs=100"]
    if recipe == "mcvt":
        over.append("objectives.protonce.warmup_epochs=0")
    pretrain(recipe, None, run, over)
    wall = time.time() - started
    estep = [v for _, v in _metric_values(run / "metrics.csv", "estep/seconds")]
    info = json.loads((run / "run.json").read_text())
    step_s = (info["wall_time_s"] - sum(estep)) / steps
    return {"step_s": step_s, "estep_s": max(estep) if estep else 0.0, "probe_wall_s": wall}


def _budget_run(recipe: str, common: list[str], out: Path, p: dict[str, float], budget: float,
                steps_per_epoch: int) -> tuple[int, int, float]:
    """Train ``recipe`` for the steps that fit ``budget`` seconds at the probed step time."""
    # budget = steps * step_s + (E-steps) * estep_s, one E-step per epoch after warm-up
    steps = int(budget / p["step_s"])
    if p["estep_s"] > 0:
        for _ in range(3):
            epochs = max(1, math.ceil(steps / steps_per_epoch))
            warm = max(1, round(0.1 * epochs))
            steps = int((budget - max(0, epochs - warm) * p["estep_s"]) / p["step_s"])
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    t0 = time.time()
    pretrain(recipe, None, out / "run", [*common, f"train.epochs={epochs}", f"train.max_steps={steps}",
                                         f"train.max_time_s={budget}"])
    return steps, epochs, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per run")
    ap.add_argument("--recipes", nargs="+", default=["mocov3", "mcvt", "cl-edi"])
    ap.add_argument("--train-images", type=int, nargs="+", default=[10000, 1000])
    ap.add_argument("--eval-train", type=int, default=10000)
    ap.add_argument("--eval-test", type=int, default=2000)
    ap.add_argument("--probe-steps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="train.seed (also picks the data.limit subset)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="key=value", help="overrides added to every run")
    ap.add_argument("--dense", action="store_true",
                    help="also run the dense probe (shipped Weizmann Horses sample at 64 px) and report it")
    ap.add_argument("--correspondence", type=int, default=200, help="held-out images for the correspondence score")
    ap.add_argument("--steps", nargs="*", default=[], metavar="recipe=N",
                    help="train these recipes for exactly N steps instead of probing the budget (e.g. to repeat "
                         "a quiet-machine run's step counts with another seed on a busy machine)")
    args = ap.parse_args()
    fixed_steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.steps)}
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = args.cifar / "train", args.cifar / "test"
    base = [o for o in DEMO_OVERRIDES if not o.startswith(("train.epochs", "objectives."))]
    base += ["train.progress_bar=false", "train.log_every_n_steps=5"]
    batch = int(next(o for o in base if o.startswith("data.batch_size=")).split("=")[1])
    results: list[dict[str, Any]] = []
    table = [
        "| train images (seed) | recipe | s/step | step overhead | E-steps s (total) | steps done/planned | epochs | wall s "
        "| kNN | linear | kNN per block | linear per block | kNN mean-patch per block | correspondence per block "
        "| dense mIoU per block |",
        "|" + "---|" * 15,
    ]
    for n in args.train_images:
        base_step = None
        for recipe in args.recipes:
            out = args.out / f"{recipe}-{n}"
            common = [*base, f"data.path={train_dir}", f"data.limit={n}", f"train.seed={args.seed}", *recipe_overrides(recipe, n), *args.extra]
            steps_per_epoch = n // batch
            if recipe in fixed_steps:
                steps = fixed_steps[recipe]
                epochs = max(1, math.ceil(steps / steps_per_epoch))
                run = out / "run"
                t0 = time.time()
                pretrain(recipe, None, run, [*common, f"train.epochs={epochs}", f"train.max_steps={steps}"])
                wall = time.time() - t0
                p = {"step_s": None, "estep_s": 0.0, "fixed_steps": steps}
            else:
                p = probe(recipe, common, out, args.probe_steps)
                steps, epochs, wall = _budget_run(recipe, common, out, p, args.budget, steps_per_epoch)
            run = out / "run"
            res = evaluate_run(run, str(train_dir), str(test_dir), train_limit=args.eval_train,
                               test_limit=args.eval_test, out=out / "eval", visuals=False,
                               correspondence_images=args.correspondence,
                               dense_train="horses-sample:train" if args.dense else None,
                               dense_val="horses-sample:val" if args.dense else None, dense_size=64)
            info = json.loads((run / "run.json").read_text())
            estep_total = sum(v for _, v in _metric_values(run / "metrics.csv", "estep/seconds"))
            step_s = (info["wall_time_s"] - estep_total) / max(1, info["global_step"])  # measured in the run itself
            if base_step is None:
                base_step = step_s  # the first recipe is the base of the overhead column
            overhead = f"{step_s / base_step:.2f}×" if base_step else "–"
            row = (f"| {n} ({args.seed}) | {recipe} | {step_s:.3f} | {overhead} | {estep_total:.1f} | {info['global_step']}/{steps} | "
                   f"{info['epochs_completed']} | {wall:.0f} | {res['knn']['top1']:.2f} | {res['linear']['top1']:.2f} | "
                   f"{per_block(res['layers'], 'knn_top1')} | {per_block(res['layers'], 'linear_top1')} | "
                   f"{per_block(res['layers'], 'knn_top1_patch')} | "
                   f"{per_block(res.get('correspondence', {}).get('layers', []), 'top1')} | "
                   f"{per_block(res.get('dense', {}).get('layers', []), 'miou')} |")
            print(row, flush=True)
            table.append(row)
            results.append({"train_images": n, "recipe": recipe, "probe": p, "planned_steps": steps, "run": info,
                            "step_s": step_s, "estep_total_s": estep_total,
                            "wall_s": wall, "knn": res["knn"], "linear": res["linear"], "layers": res["layers"],
                            "dense": res.get("dense"), "correspondence": res.get("correspondence")})
            (args.out / "compare.md").write_text("\n".join(table) + "\n")
            (args.out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
