"""The GPU suite: one command, ≤ 8 minutes on one GPU, results to ``OUT/gpu_suite.{json,md}``.

    bench/gpu_suite.sh                 # on the device machine (unpacks the data it carries, runs this)
    python bench/gpu_suite.py --tiny --out /tmp/suite --data-root DIR   # CPU, tiny sizes (the test)

Parts, in the order they run (each part is skipped, and says so, once the time limit is near):

1. **Training throughput** of ViT-S/16 at 224 per recipe (``mocov3 dino ibot local-global sere mcl``,
   each at its shipped views, heads and batch per GPU ``--batch``), in bf16 autocast: images per
   second over ``--steps`` timed steps after warm-up (forward of student and teacher, every
   objective, backward, optimiser step, EMA), on one fixed batch of real multi-crop views already
   on the device (the loader is measured separately). Model-FLOP utilisation = FLOPs of one step
   (counted by ``torch.utils.flop_counter`` on the uncompiled step) / step time / the device's
   peak dense bf16 FLOP/s (``--peak-tflops``, default from the device name).
2. **Loader** images/s with all CPU cores for DINO's views (2 × 224 + 8 × 96) of the horse photos,
   ``views.photometric=loader`` and ``=device`` (then also the batched device ops' own time).
3. **CIFAR-10, ViT-T/4 ``dino``**: ``pretrain`` for ``--cifar-seconds`` on the 50k train set, then
   kNN (k = 20) of the teacher's CLS on the 10k test set (``stratavit evaluate`` protocol).
4. The same throughput with ``train.compile=true`` (``torch.compile`` of the backbones), recipe by
   recipe while time is left (compilation takes tens of seconds each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from stratavit.data.datasets import Indexed, build_dataset
from stratavit.data.views import MultiCropTransform, collate_views
from stratavit.engine.standalone import attach
from stratavit.engine.train import build_module
from stratavit.recipe import resolve_config

RECIPES = ["mocov3", "dino", "ibot", "local-global", "sere", "mcl"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (vendor data sheets, SXM parts; no sparsity)."""

TINY = ["backbone.depth=2", "backbone.embed_dim=48", "backbone.num_heads=2", "backbone.img_size=32",
        "backbone.patch_size=8", "views.global_size=32"]
"""Overrides of ``--tiny`` (a CPU checks the suite end to end); local crops 16 px, where a recipe has them."""


class Suite:
    """Runs the parts while time is left and collects their rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.began = time.monotonic()
        self.results: dict[str, Any] = {"throughput": [], "loader": [], "cifar_dino": None, "skipped": []}

    def left(self) -> float:
        return self.args.limit_s - (time.monotonic() - self.began)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f} s] {text}", flush=True)

    # ------------------------------------------------------------------ 1 and 4: throughput

    def overrides(self, recipe: str, compile_: bool) -> list[str]:
        a = self.args
        out = [f"data.batch_size={a.batch}", f"train.compile={str(compile_).lower()}", "data.num_workers=0"]
        if recipe == "mcl":
            out.append(f"data.batch_size={max(32, a.batch // 32 * 32)}")  # montages need multiples of 32
        if not a.tiny:
            return out
        local = [] if recipe == "mcl" else ["views.local_size=16"]  # MCL's fresh crops are montage canvases
        return out + TINY + local

    def batch_for(self, cfg: Any) -> Any:
        """One collated multi-crop batch of the recipe's views of real images, on the device."""
        transform = MultiCropTransform(cfg.views, cfg.backbone.patch_size)
        data = Indexed(build_dataset(str(self.args.images), transform=transform))
        loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate_views,
                            num_workers=min(8, os.cpu_count() or 1), drop_last=True)
        return next(iter(loader)).to(self.device)

    def step(self, module: Any, opt: torch.optim.Optimizer, batch: Any, n: int) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=not self.args.fp32):
            loss, _ = module.compute_losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.update_teacher(n)

    def throughput(self, recipe: str, compile_: bool) -> None:
        a = self.args
        cfg = resolve_config(recipe, self.overrides(recipe, compile_))
        module = build_module(cfg).to(self.device)
        attach(module)
        opt = module.configure_optimizers()
        batch = self.batch_for(cfg)
        images = batch.batch_size
        flops = None
        if not compile_:
            with FlopCounterMode(display=False) as counter:
                self.step(module, opt, batch, 0)
            flops = counter.get_total_flops()
        t_compile = time.perf_counter()
        for n in range(a.warmup):
            self.step(module, opt, batch, n)
        self.sync()
        warm_s = time.perf_counter() - t_compile
        times = []
        for n in range(a.steps):
            t0 = time.perf_counter()
            self.step(module, opt, batch, n)
            self.sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row = {"recipe": recipe, "compile": compile_, "batch": images, "views": len(batch.global_views) + len(batch.local_views),
               "s_per_step": round(med, 4), "images_per_s": round(images / med, 1), "warmup_s": round(warm_s, 1),
               "steps": a.steps, "flops_per_step": flops}
        if flops is not None and self.peak:
            row["mfu_pct"] = round(100 * flops / med / (self.peak * 1e12), 1)
        self.results["throughput"].append(row)
        self.log(f"{recipe:<13} compile={compile_!s:<5} {row['images_per_s']:>8} img/s  MFU {row.get('mfu_pct', '–')} %")
        del module, opt, batch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def peak(self) -> float | None:
        if self.args.peak_tflops:
            return self.args.peak_tflops
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    # ------------------------------------------------------------------ 2: loader

    def loader(self, photometric: str) -> None:
        a = self.args
        extra = ["views.global_size=32", "views.local_size=16", "backbone.patch_size=8"] if a.tiny else []
        cfg = resolve_config("dino", [f"views.photometric={photometric}", *extra])
        transform = MultiCropTransform(cfg.views, cfg.backbone.patch_size)
        data = Indexed(build_dataset(str(a.images), transform=transform))
        workers = os.cpu_count() or 1
        loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate_views, num_workers=workers,
                            persistent_workers=False, drop_last=True)
        seen, t0, first = 0, None, True
        for batch in loader:
            if first:  # worker start-up is not throughput
                t0, first = time.perf_counter(), False
                continue
            seen += batch.batch_size
            if time.perf_counter() - t0 > a.loader_seconds:
                break
        elapsed = time.perf_counter() - t0 if t0 else float("nan")
        row: dict[str, Any] = {"photometric": photometric, "workers": workers, "images": seen,
                               "images_per_s": round(seen / elapsed, 1), "per_core": round(seen / elapsed / workers, 1)}
        if photometric == "device":
            row["device_ops_images_per_s"] = self.device_ops(cfg, batch)
        self.results["loader"].append(row)
        self.log(f"loader photometric={photometric}: {row['images_per_s']} img/s on {workers} workers")

    def device_ops(self, cfg: Any, batch: Any) -> float:
        from stratavit.data.photometric import DevicePhotometric

        ops = DevicePhotometric(cfg.views)
        batch = batch.to(self.device)
        ops(batch, 0)
        self.sync()
        t0 = time.perf_counter()
        for seed in range(5):
            ops(batch, seed)
        self.sync()
        return round(5 * batch.batch_size / (time.perf_counter() - t0), 1)

    # ------------------------------------------------------------------ 3: CIFAR-10 dino

    def cifar_dino(self) -> None:
        from stratavit.engine.train import pretrain
        from stratavit.evaluation.run import evaluate_run

        a = self.args
        run = Path(a.out) / "cifar-dino"
        size = ["backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4",
                "views.global_size=32", "views.local_size=16", "views.global_scale=[0.14,1.0]",
                "views.local_scale=[0.05,0.14]", "views.photometric=device"]
        if a.tiny:
            size += ["backbone.depth=2", "backbone.embed_dim=48", "backbone.num_heads=2", "data.limit=256"]
        cfg = [*size, "data.batch_size=256" if not a.tiny else "data.batch_size=32",
               f"data.num_workers={min(12, os.cpu_count() or 1)}", "train.progress_bar=false",
               f"train.max_time_s={a.cifar_seconds}", "train.epochs=100", "optim.warmup_epochs=2",
               "train.precision=bf16-mixed" if self.device.type == "cuda" else "train.precision=32-true"]
        t0 = time.perf_counter()
        pretrain("dino", str(a.cifar_train), run, cfg)
        trained = time.perf_counter() - t0
        summary = json.loads((run / "run.json").read_text())
        res = evaluate_run(run, str(a.cifar_train), str(a.cifar_test), run / "eval", k=20, linear_epochs=1,
                           correspondence_images=0, visuals=False, batch_size=512,
                           train_limit=512 if a.tiny else None, test_limit=256 if a.tiny else None)
        knn = res["knn"]["top1"]
        self.results["cifar_dino"] = {"train_s": round(trained, 1), "steps": summary.get("global_step"),
                                      "images_per_s": summary.get("images_per_s"), "knn_top1": knn}
        self.log(f"CIFAR-10 ViT-T/4 dino: {summary.get('global_step')} steps in {trained:.0f} s, kNN {knn:.2f} %")

    # ------------------------------------------------------------------ driver

    def run_part(self, name: str, need_s: float, fn: Any, *args: Any) -> None:
        if self.left() < need_s:
            self.results["skipped"].append(f"{name} (time limit: {self.left():.0f} s left, needs ~{need_s:.0f} s)")
            self.log(f"skipped {name}: time limit")
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  # a suite records a failed part and goes on
            self.results["skipped"].append(f"{name} (failed: {type(e).__name__}: {str(e)[:300]})")
            self.log(f"FAILED {name}: {type(e).__name__}: {e}")

    def run(self) -> dict[str, Any]:
        a = self.args
        for recipe in a.recipes:
            self.run_part(f"throughput {recipe}", 15, self.throughput, recipe, False)
        for photometric in ("loader", "device"):
            self.run_part(f"loader {photometric}", a.loader_seconds + 10, self.loader, photometric)
        if not a.skip_cifar:
            self.run_part("cifar10 dino", a.cifar_seconds + 60, self.cifar_dino)
        if not a.no_compile:
            for recipe in a.recipes:
                self.run_part(f"throughput {recipe} compiled", 60, self.throughput, recipe, True)
        self.results["meta"] = self.meta()
        return self.results

    def meta(self) -> dict[str, Any]:
        dev = torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu"
        return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": dev,
                "torch": torch.__version__, "cpus": os.cpu_count(), "peak_bf16_tflops": self.peak,
                "wall_s": round(time.monotonic() - self.began, 1), "argv": sys.argv[1:], "tiny": self.args.tiny}


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables bench/RESULTS.md records."""
    m = results["meta"]
    lines = [f"GPU suite, {m['date']}, {m['device']}, torch {m['torch']}, {m['cpus']} CPUs, {m['wall_s']} s", "",
             "| recipe | compile | batch | views | s/step | img/s | MFU % |", "|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        lines.append(f"| {r['recipe']} | {r['compile']} | {r['batch']} | {r['views']} | {r['s_per_step']} | "
                     f"{r['images_per_s']} | {r.get('mfu_pct', '–')} |")
    lines += ["", "| loader photometric | workers | img/s | per core | device ops img/s |", "|---|---|---|---|---|"]
    for r in results["loader"]:
        lines.append(f"| {r['photometric']} | {r['workers']} | {r['images_per_s']} | {r['per_core']} | "
                     f"{r.get('device_ops_images_per_s', '–')} |")
    c = results["cifar_dino"]
    if c:
        lines += ["", f"CIFAR-10 ViT-T/4 dino: {c['steps']} steps in {c['train_s']} s ({c['images_per_s']} img/s), "
                      f"kNN (k=20, 50k → 10k) {c['knn_top1']:.2f} %"]
    lines += [f"skipped: {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--data-root", type=Path, required=True,
                    help="folder with cifar10/{train,_test/test} and weizmann-horses/train (unpacked)")
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--batch", type=int, default=64, help="images per step for the throughput part")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loader-seconds", type=float, default=20.0)
    ap.add_argument("--cifar-seconds", type=float, default=120.0)
    ap.add_argument("--limit-s", type=float, default=450.0, help="stop starting parts after this (default 7.5 min)")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for the MFU (default from the name)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the suite end to end on a CPU in about a minute")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (CPUs without fast bf16)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    args = ap.parse_args(argv)
    args.images = args.data_root / "weizmann-horses" / "train" / "images"
    args.cifar_train = args.data_root / "cifar10" / "train"
    args.cifar_test = args.data_root / "cifar10" / "_test" / "test"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = Suite(args).run()
    (Path(args.out) / "gpu_suite.json").write_text(json.dumps(results, indent=2))
    (Path(args.out) / "gpu_suite.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
