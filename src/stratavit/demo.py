"""``stratavit demo``: pre-train a small ViT on the shipped CIFAR-10 sample, evaluate, report.

The sample (10,000 train / 2,000 test images, 32×32) ships inside the package. MoCo v3 on a
4-block, 128-wide ViT with patch 4, batch 64, 3 epochs (468 steps): the setting that gave the best
kNN top-1 in a sweep of about 5 minutes (training + evaluation) on a 2-core CPU; see
bench/RESULTS.md. The photometric augmentations run batched in the training process
(``views.photometric=device``; the same distributions as the loader path): the one loader worker
then only decodes and crops (it took ~16 % of the CPU samples with the PIL colour ops). About
6.5 minutes in all on 2 cores (bench/RESULTS.md, "Issue 15: demo time").
Pass ``key=value`` overrides to change it. The evaluation runs every part:
per-block kNN and linear probes, the dense probe on the shipped Weizmann Horses sample (at 64 px),
the correspondence score, the random-init and raw-pixel baselines and the pictures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from stratavit.data.datasets import HORSES_SAMPLE, SAMPLE_NAME

DEMO_RECIPE = "mocov3"
DEMO_OVERRIDES: list[str] = [
    "backbone.arch=vit_tiny_patch16_224",
    "backbone.img_size=32",
    "backbone.patch_size=4",
    "backbone.embed_dim=128",
    "backbone.depth=4",
    "backbone.num_heads=4",
    "views.global_size=32",
    "views.global_scale=[0.2,1.0]",
    "views.global_blur_p=[0.0]",
    "views.global_solarize_p=[0.0,0.2]",
    "views.photometric=device",
    "objectives.infonce.proj_hidden_dim=1024",
    "objectives.infonce.pred_hidden_dim=1024",
    "optim.base_lr=8.0e-3",
    "optim.weight_decay=0.05",
    "optim.warmup_epochs=0.3",
    "teacher.momentum=0.99",
    "teacher.momentum_end=0.99",
    "data.batch_size=64",
    "data.num_workers=1",
    "train.epochs=3",
    "train.log_every_n_steps=5",
]


DEMO_RETRIEVAL: dict[str, Any] = {"memory_sizes": [2500], "blocks": [2, 4]}
"""Dense retrieval in the demo: a memory of 2,500 of the 51,200 horse patches at 64 px, blocks 2 and 4.
Its cost grows with memory x blocks: about 2 s per block and model on 2 shared cores here, against
~15-40 s per block with the default memories (capped at 51,200 patches)."""


DEMO_DETECTION: dict[str, Any] = {"train": "horses-boxes:train", "val": "horses-boxes:val", "mode": "frozen",
                                  "steps": 100}
"""Detection transfer with ``stratavit demo --detection``: Faster R-CNN on the frozen backbone's simple feature
pyramid, 100 steps on the horse boxes at 64 px, for the pre-trained and the random-init backbone. Off by
default: the two fine-tunes take minutes on 2 cores (1-3.5 min each measured on shared cores), more than
the rest of the evaluation together."""


def run_demo(out: Path, overrides: Sequence[str] = (), detection: bool = False) -> dict[str, Any]:
    """Pre-train into ``out`` and evaluate into ``out/eval``; returns the evaluation results.

    ``detection``: also the detection transfer (:data:`DEMO_DETECTION`)."""
    from stratavit.engine.train import pretrain
    from stratavit.evaluation.run import evaluate_run
    from stratavit.run_folder import last_checkpoint

    out = Path(out)
    if last_checkpoint(out).exists() and (out / "backbone.safetensors").exists() and not overrides:
        print(f"{out} already holds a finished demo run; evaluating it again (delete the folder to retrain)")
    started = time.time()
    pretrain(DEMO_RECIPE, f"{SAMPLE_NAME}:train", out, [*DEMO_OVERRIDES, *overrides])
    train_s = time.time() - started
    results = evaluate_run(
        out,
        train=f"{SAMPLE_NAME}:train",
        test=f"{SAMPLE_NAME}:test",
        baselines=True,
        dense_train=f"{HORSES_SAMPLE}:train",
        dense_val=f"{HORSES_SAMPLE}:val",
        dense_size=64,
        retrieval=DEMO_RETRIEVAL,
        **({"detection": DEMO_DETECTION} if detection else {}),
        meta={"demo_train_seconds": round(train_s, 1)},
    )
    results["meta"]["demo_total_seconds"] = round(time.time() - started, 1)
    import json

    (out / "eval" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
