"""Build the Weizmann Horses sample shipped inside the package (src/stratavit/assets/horses_sample.tar.gz).

The demo's dense probe trains on it. Every image of the shared copy
(../shared/datasets/weizmann-horses, 200 train / 128 val, about 300x230 px) is downscaled so that
its longer side is MAX_SIDE pixels (bicubic, JPEG quality 90); masks are downscaled with nearest
neighbour and stay single-channel PNG class ids (0 background, 1 horse). Layout:
{train,val}/{images,masks}/horseNNN.{jpg,png}.

    python scripts/make_horses_sample.py [--shared ../shared] [--max-side 96]
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _add(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    out.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--max-side", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "src/stratavit/assets/horses_sample.tar.gz")
    args = ap.parse_args()
    counts: dict[str, int] = {}
    with tarfile.open(args.shared / "datasets/weizmann-horses/weizmann-horses.tar.gz") as src, \
            tarfile.open(args.out, "w:gz", compresslevel=9) as out:
        for m in sorted((m for m in src.getmembers() if m.isfile()), key=lambda m: m.name):
            split, kind, fname = Path(m.name).parts[-3:]
            img = Image.open(io.BytesIO(src.extractfile(m).read()))  # type: ignore[union-attr]
            scale = args.max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            buf = io.BytesIO()
            if kind == "masks":
                img.resize(size, Image.NEAREST).save(buf, format="PNG", optimize=True)
            else:
                img.convert("RGB").resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
                counts[split] = counts.get(split, 0) + 1
            _add(out, f"{split}/{kind}/{fname}", buf.getvalue())
    print(counts, f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
