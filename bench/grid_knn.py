"""kNN on a run's flattened patch-token grids against its CLS (issue 16: a spatial readout, tried).

    PYTHONPATH=src .venv/bin/python bench/grid_knn.py RUN DIR [--threads 1]

``RUN`` is a run folder (its teacher backbone is read), ``DIR`` holds ``train/`` and ``test/``
ImageFolders of 32-px images (the shared CIFAR-10 JPEGs unpacked). Protocol as
``bench/small_compute.py``: weighted kNN, k = 20, T = 0.07, the train split as the bank, the test
split as queries, at 32 px. Per block it prints the kNN top-1 of the CLS ``(C)``, of the patch grid
flattened ``(gh * gw * C)`` and of the same grid with each token l2-normalised first. Holds every
block's grids in memory (50,000 x 3,072 floats per readout and block: about 5 GB in all for 4 blocks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import ImageFolder

from stratavit.data.views import eval_transform
from stratavit.evaluation.knn import knn_top1
from stratavit.evaluation.run import load_run_backbone
from stratavit.evaluation.tokens import block_tokens

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def readouts(model: torch.nn.Module, folder: Path, size: int) -> tuple[dict[str, Tensor], Tensor]:
    """``{"cls<b>": (N, C), "grid<b>": (N, gh*gw*C), "gridn<b>": (N, gh*gw*C)}`` for every block, and labels ``(N,)``."""
    loader = torch.utils.data.DataLoader(ImageFolder(folder, transform=eval_transform(size, MEAN, STD)),
                                         batch_size=500, num_workers=1)
    out: dict[str, list[Tensor]] = {}
    labels = []
    with torch.inference_mode():
        for images, y in loader:
            for b in block_tokens(model, images):
                out.setdefault(f"cls{b.block}", []).append(b.cls)
                out.setdefault(f"grid{b.block}", []).append(b.patches.flatten(1))
                out.setdefault(f"gridn{b.block}", []).append(F.normalize(b.patches, dim=-1).flatten(1))
            labels.append(y)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_run_backbone(args.run).eval()
    train, y_train = readouts(model, args.data / "train", args.size)
    test, y_test = readouts(model, args.data / "test", args.size)
    for name in train:
        acc = knn_top1(train[name], y_train, test[name], y_test, k=20, temperature=0.07)
        print(f"{name}\t{train[name].shape[1]}\t{acc:.2f}", flush=True)


if __name__ == "__main__":
    main()
