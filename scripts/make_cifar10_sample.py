"""Build the CIFAR-10 sample shipped inside the package (src/stratavit/assets/cifar10_sample.tar.gz).

Takes the first N_TRAIN/10 train and N_TEST/10 test images of every class from the shared JPEG
copy of CIFAR-10 (../shared/datasets/cifar10) and stores their bytes unchanged (no re-encoding),
in the ImageFolder layout train/<class>/NNNN.jpg, test/<class>/NNNN.jpg.

    python scripts/make_cifar10_sample.py [--shared ../shared] [--train 10000] [--test 2000]
"""

from __future__ import annotations

import argparse
import io
import tarfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "src/stratavit/assets/cifar10_sample.tar.gz")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w:gz", compresslevel=9) as out:
        for split, total in (("train", args.train), ("test", args.test)):
            per_class = total // 10
            taken: dict[str, int] = defaultdict(int)
            with tarfile.open(args.shared / "datasets/cifar10" / f"{split}.tar.gz") as src:
                members = sorted((m for m in src.getmembers() if m.isfile()), key=lambda m: m.name)
                for m in members:
                    parts = Path(m.name).parts
                    cls = parts[-2]
                    if taken[cls] >= per_class:
                        continue
                    taken[cls] += 1
                    data = src.extractfile(m).read()  # type: ignore[union-attr]
                    info = tarfile.TarInfo(f"{split}/{cls}/{parts[-1]}")
                    info.size = len(data)
                    info.mtime = 0
                    out.addfile(info, io.BytesIO(data))
            print(split, dict(taken))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
