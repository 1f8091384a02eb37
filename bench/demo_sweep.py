"""Sweep demo settings at a fixed schedule and record kNN / linear top-1 and wall time.

    .venv/bin/python bench/demo_sweep.py --out /tmp/sweep "name=override override ..." ...

Each argument is ``NAME=`` followed by space-separated config overrides applied on top of the
demo's (src/stratavit/demo.py). Prints one Markdown row per variant (and appends it to
OUT/sweep.md) so the table can be pasted into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stratavit.data.datasets import SAMPLE_NAME
from stratavit.demo import DEMO_OVERRIDES, DEMO_RECIPE
from stratavit.engine.train import pretrain
from stratavit.evaluation.run import evaluate_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        run = args.out / name
        t0 = time.time()
        pretrain(DEMO_RECIPE, f"{SAMPLE_NAME}:train", run, [*DEMO_OVERRIDES, *rest.split(), "train.progress_bar=false"])
        t_train = time.time() - t0
        res = evaluate_run(run, f"{SAMPLE_NAME}:train", f"{SAMPLE_NAME}:test", baselines=True)
        info = json.loads((run / "run.json").read_text())
        row = (
            f"| {name} | `{rest}` | {info['global_step']} | {t_train:.0f} | {info['images_per_s']} | "
            f"{res['knn']['top1']:.2f} | {res['linear']['top1']:.2f} | "
            f"{res['baselines']['random_init']['knn_top1']:.2f} | {res['baselines']['raw_pixels']['knn_top1']:.2f} | "
            f"{max(layer['knn_top1'] for layer in res['layers']):.2f} |"
        )
        print(row, flush=True)
        with (args.out / "sweep.md").open("a") as fh:
            fh.write(row + "\n")


if __name__ == "__main__":
    main()
