"""Time PCL's E-step clustering (stratavit.objectives.protonce.clustering) on random features.

    .venv/bin/python bench/kmeans_speed.py                     # 50,000 × 256 → 1,000 and 500/1000/2000
    .venv/bin/python bench/kmeans_speed.py --n 50000 --d 256 --k 500 1000 2000 --iters 20

Features are random Gaussian rows, l2-normalised (the hardest case for early stopping: k-means on
structureless data rarely converges, so all ``--iters`` iterations run). Prints seconds for
``kmeans`` alone at every K, then ``cluster_embeddings`` with all K together (k-means + φ).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stratavit.objectives.protonce.clustering import cluster_embeddings, kmeans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    x = F.normalize(torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0)), dim=1).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device={dev} threads={torch.get_num_threads()} N={args.n} D={args.d} iters={args.iters} chunk={args.chunk}")
    for k in args.k:
        sync()
        t = time.perf_counter()
        _, a = kmeans(x, k, iters=args.iters, seed=0, chunk=args.chunk)
        sync()
        dt = time.perf_counter() - t
        nonempty = int((torch.bincount(a, minlength=k) > 0).sum())
        print(f"kmeans K={k}: {dt:.2f} s ({nonempty} non-empty clusters)")
    sync()
    t = time.perf_counter()
    protos = cluster_embeddings(x, args.k, temperature=0.2, iters=args.iters, seed=0)
    sync()
    dt = time.perf_counter() - t
    print(f"cluster_embeddings K={args.k}: {dt:.2f} s (phi mean {[round(float(p.phi.mean()), 4) for p in protos]})")


if __name__ == "__main__":
    main()
