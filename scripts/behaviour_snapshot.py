"""Fingerprint what stratavit writes, to check that a refactor changed no behaviour.

Runs, through the command line a user calls (so it works on any layout of the package):

* the demo (``stratavit demo``, at its shipped settings unless ``--quick``);
* every recipe for 2 steps at its shipped defaults (depth 2 for ViTs, a ResNet-18 body for
  ``mcl-resnet``) on the Weizmann horse photos with a shorter side of at least 224 px;
* ``stratavit evaluate`` of one ViT run (dino) and the CNN run (mcl-resnet) on small limits, with
  the dense probe, the correspondence score and the baselines;
* ``stratavit export`` of one run;

then writes one JSON of fingerprints: ``results.json`` without timings and paths, ``metrics.csv``
rows, every tensor of every checkpoint (model, optimiser, and the other saved states) and every
export (tensors and metadata), each as a SHA-1 of its bytes. Two snapshots are compared with
``--compare``::

    .venv/bin/python scripts/behaviour_snapshot.py --out /tmp/snap-before   # on the old commit
    .venv/bin/python scripts/behaviour_snapshot.py --out /tmp/snap-after    # on the new one
    .venv/bin/python scripts/behaviour_snapshot.py --compare /tmp/snap-before /tmp/snap-after

Run both on the same machine with the same torch: the fingerprints are bit-exact.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STRATAVIT_SHARED", REPO.parent / "shared"))
RECIPES = ["mocov3", "dino", "ibot", "mcvt", "cl-edi", "sere", "local-global", "mcl", "mcl-resnet"]
BATCH = {"mcl": 32, "mcl-resnet": 32}
# keys whose values are wall-clock times, paths or machine facts: they differ between any two runs
VOLATILE = {"seconds", "eval_seconds", "demo_train_seconds", "demo_total_seconds", "wall_time_s",
            "images_per_s", "run_dir", "train", "test"}


def _stratavit(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "stratavit"), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _large_horses(cache: Path) -> Path:
    from PIL import Image

    target = cache / "horses"
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED / "datasets" / "weizmann-horses" / "weizmann-horses.tar.gz") as tar:
            tar.extractall(target, filter="data")
        (target / ".complete").touch()
    folder = cache / "horses224"
    folder.mkdir(exist_ok=True)
    for split in ("train", "val"):
        for path in sorted((target / split / "images").iterdir()):
            link = folder / f"{split}_{path.name}"
            if not link.exists():
                with Image.open(path) as im:
                    if min(im.size) >= 224:
                        os.symlink(path, link)
    return folder


def _digest(t: Any) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # 0-d too (AdamW's step)
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha1(raw).hexdigest()


def _fingerprint(obj: Any) -> Any:
    """Nested containers with every tensor replaced by its digest."""
    import torch

    if isinstance(obj, torch.Tensor):
        return _digest(obj)
    if isinstance(obj, dict):
        return {str(k): _fingerprint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fingerprint(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    if obj is None or isinstance(obj, (int, str, bool)):
        return obj
    return type(obj).__name__


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _checkpoint(path: Path) -> dict[str, Any]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    keep = {k: v for k, v in state.items() if k not in ("pytorch-lightning_version", "callbacks", "loops")}
    loops = state.get("loops", {})
    keep["global_step"] = state.get("global_step")
    keep["loops_progress"] = json.loads(json.dumps(loops, default=str)) if loops else None
    return _fingerprint(keep)


def _safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {"metadata": f.metadata(), "tensors": {k: _digest(f.get_tensor(k)) for k in sorted(f.keys())}}


def _metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        # wall-clock columns (the E-step's ``estep/seconds``) differ between any two runs
        return [{k: v for k, v in sorted(r.items()) if "seconds" not in k} for r in csv.DictReader(fh)]


def _run_folder(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"files": sorted(str(p.relative_to(run)) for p in run.rglob("*")
                                          if p.is_file() and "cache" not in p.parts and "tensorboard" not in p.parts)}
    if (run / "metrics.csv").exists():
        out["metrics.csv"] = _metrics(run / "metrics.csv")
    if (run / "config.yaml").exists():
        out["config.yaml"] = (run / "config.yaml").read_text()
    if (run / "run.json").exists():
        out["run.json"] = _strip(json.loads((run / "run.json").read_text()))
    if (run / "checkpoints" / "last.ckpt").exists():
        out["last.ckpt"] = _checkpoint(run / "checkpoints" / "last.ckpt")
    for st in sorted(run.glob("*.safetensors")):
        out[st.name] = _safetensors(st)
    for res in sorted(run.rglob("results.json")):
        out[str(res.relative_to(run))] = _strip(json.loads(res.read_text()))
    return out


def fingerprint(out: Path) -> None:
    """Fingerprint the run folders an earlier ``snapshot`` left in ``out`` into ``out/snapshot.json``."""
    runs = {p.name: p for p in sorted((out / "runs").iterdir())}
    runs["demo"] = out / "demo"
    prints = {name: _run_folder(run) for name, run in runs.items()}
    text = json.dumps(prints, indent=1, sort_keys=True)
    for root in {str(out.resolve()), str(out)}:  # the snapshot's own folder (data paths in configs)
        text = text.replace(root, "<OUT>")
    (out / "snapshot.json").write_text(text + "\n")
    print(f"snapshot: {out / 'snapshot.json'}")


def snapshot(out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    horses = _large_horses(out / "data")
    runs: dict[str, Path] = {}
    common = ["train.max_steps=2", "data.num_workers=0", "train.progress_bar=false", "train.log_every_n_steps=1"]
    for recipe in RECIPES:
        extra = ["backbone.arch=resnet18"] if recipe == "mcl-resnet" else ["backbone.depth=2"]
        run = out / "runs" / recipe
        _stratavit("pretrain", "--recipe", recipe, "--data", str(horses), "--out", str(run),
                   *common, f"data.batch_size={BATCH.get(recipe, 4)}", *extra)
        runs[recipe] = run
    for recipe in ("dino", "mcl-resnet"):
        _stratavit("evaluate", str(runs[recipe]), "--train", "cifar10-sample:train", "--test", "cifar10-sample:test",
                   "--train-limit", "200", "--test-limit", "100", "--baselines", "--linear-epochs", "5",
                   "--dense-train", "horses-sample:train", "--dense-val", "horses-sample:val", "--dense-size", "64",
                   "--correspondence", "20", "--img-size", "64")
    _stratavit("export", str(runs["mocov3"]), "--to", "timm", "--out", str(out / "runs" / "mocov3" / "exported.safetensors"))
    demo = out / "demo"
    _stratavit("demo", "--out", str(demo), *(["train.epochs=1", "train.max_steps=10"] if quick else []))
    fingerprint(out)


def _diff(a: Any, b: Any, path: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{path}/{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", found)
    elif a != b:
        found.append(f"{path}: {str(a)[:120]} != {str(b)[:120]}")


def compare(before: Path, after: Path) -> int:
    a = json.loads((before / "snapshot.json").read_text())
    b = json.loads((after / "snapshot.json").read_text())
    found: list[str] = []
    _diff(a, b, "", found)
    for line in found[:200]:
        print(line)
    print(f"{len(found)} difference(s) between {before} and {after}")
    return 1 if found else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="demo for 10 steps only")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    p.add_argument("--fingerprint-only", action="store_true", help="only fingerprint the runs already in --out")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("give --out DIR (or --compare BEFORE AFTER)")
    if args.fingerprint_only:
        fingerprint(args.out)
    else:
        snapshot(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
