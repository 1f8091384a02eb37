"""Linear probes one by one vs stacked in one loop (issue 15: the demo's evaluation time).

    PYTHONPATH=src .venv/bin/python bench/linear_probes_speed.py [--probes 8 --n 10000 --dim 128 --epochs 100]

The demo probes 4 blocks x 2 poolings (CLS, mean patch) of 10,000 train features; ``evaluate`` did that
one probe after another, ``linear_probes_top1`` trains them in one loop (stacked weights; each probe's
result is the same). Prints both wall times and their ratio, and checks the results are equal.
"""

from __future__ import annotations

import argparse
import time

import torch

from stratavit.evaluation.linear import linear_probe_top1, linear_probes_top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    y, yt = torch.randint(0, 10, (args.n,), generator=g), torch.randint(0, 10, (args.test,), generator=g)
    xs = [torch.randn(args.n, args.dim, generator=g) + y[:, None] * 0.05 * (i + 1) for i in range(args.probes)]
    xt = [torch.randn(args.test, args.dim, generator=g) + yt[:, None] * 0.05 * (i + 1) for i in range(args.probes)]
    t = time.perf_counter()
    alone = [linear_probe_top1(a, y, b, yt, epochs=args.epochs) for a, b in zip(xs, xt)]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    together = linear_probes_top1(xs, y, xt, yt, epochs=args.epochs)
    t_together = time.perf_counter() - t
    same = all(a["top1"] == b["top1"] and torch.equal(a["predictions"], b["predictions"]) for a, b in zip(alone, together))
    print(f"{args.probes} probes, {args.n} x {args.dim}, {args.epochs} epochs, {torch.get_num_threads()} threads: "
          f"one by one {t_alone:.1f} s, stacked {t_together:.1f} s, ratio {t_alone / t_together:.2f}x, "
          f"same results: {same}")


if __name__ == "__main__":
    main()
