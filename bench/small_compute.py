"""Small-compute sweep (issue 16): which configuration learns best in a fixed CPU budget on CIFAR-10?

    .venv/bin/python bench/small_compute.py --cifar DIR --out /tmp/sc --budget 15m \
        "NAME=RECIPE override override ..." ...

``DIR`` holds the shared CIFAR-10 JPEGs unpacked (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).
Each variant pre-trains on the **whole** train split with ``train.budget`` (the run sizes its own
schedule to the budget, calibration and checkpoints included), then is evaluated with the protocol
users expect: weighted kNN (k = 20, T = 0.07) with the 50,000 train images as the bank and the
10,000 test images as queries, at the training resolution, on the teacher's CLS of every block,
plus the best concatenation of the last blocks' CLS (``knn.concat_last``). The linear probes run for one
epoch only (100 epochs over 50,000 images take minutes per block): their numbers are not reported.
Prints one Markdown row per variant and appends it to ``OUT/sweep.md``; every run stays in ``OUT/NAME``
(re-running a finished variant re-evaluates it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stratavit.engine.train import pretrain
from stratavit.evaluation.run import evaluate_run

HEADER = (
    "| variant | recipe | overrides | steps | epochs | train s | img/s | kNN last CLS | best block (kNN) "
    "| best concat (kNN) | random init | raw pixels |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=Path, required=True, help="folder with train/ and test/ ImageFolders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", default="15m", help="train.budget of every run")
    ap.add_argument("--baselines", action="store_true", help="also random init and raw pixels (once is enough)")
    ap.add_argument("variants", nargs="+", help='"NAME=RECIPE key=value ..."')
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        recipe, *overrides = rest.split()
        run = args.out / name
        t0 = time.time()
        if not (run / "run.json").exists() or not json.loads((run / "run.json").read_text()).get("finished"):
            pretrain(recipe, str(args.cifar / "train"), run,
                     [*overrides, f"train.budget={args.budget}", "train.progress_bar=false"])
        t_train = time.time() - t0
        res = evaluate_run(run, str(args.cifar / "train"), str(args.cifar / "test"), baselines=args.baselines,
                           visuals=False, correspondence_images=0, linear_epochs=1)
        info = json.loads((run / "run.json").read_text())
        best_block = max(res["layers"], key=lambda layer: layer["knn_top1"])
        concat = res.get("knn_concat_best") or {}
        rand = res.get("baselines", {}).get("random_init", {}).get("knn_top1")
        raw = res.get("baselines", {}).get("raw_pixels", {}).get("knn_top1")
        row = (
            f"| {name} | {recipe} | `{' '.join(overrides)}` | {info['global_step']} | {info.get('epochs', '–')} | "
            f"{t_train:.0f} | {info.get('images_per_s', '–')} | {res['knn']['top1']:.2f} | "
            f"{best_block['knn_top1']:.2f} (block {best_block['block']}) | "
            f"{concat.get('top1', float('nan')):.2f} (blocks {concat.get('blocks', '–')}) | "
            f"{'–' if rand is None else f'{rand:.2f}'} | {'–' if raw is None else f'{raw:.2f}'} |"
        )
        print(row, flush=True)
        sweep = args.out / "sweep.md"
        with sweep.open("a") as fh:
            if sweep.stat().st_size == 0:
                fh.write(HEADER + "\n")
            fh.write(row + "\n")


if __name__ == "__main__":
    main()
