"""bf16 on this CPU (issue 15, demo time): a 1024² matmul in fp32 and bf16, and the demo's ViT (4 x 128,
patch 4, 32 px, 128 images) forward + backward with and without CPU bf16 autocast.

    PYTHONPATH=src .venv/bin/python bench/bf16_cpu.py
"""

from __future__ import annotations

import time

import timm
import torch


def main() -> None:
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        for _ in range(3):
            a @ b
        n, t = 50, time.perf_counter()
        for _ in range(n):
            a @ b
        print(f"{dt}: {2 * 1024 ** 3 * n / (time.perf_counter() - t) / 1e9:.0f} GFLOPS (1024² matmul)")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=4,
                              num_heads=4, num_classes=0)
    x = torch.randn(128, 3, 32, 32)
    for autocast in (False, True):
        for n in range(7):
            if n == 2:
                t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x).sum().backward()
        print(f"bf16 autocast {autocast}: {(time.perf_counter() - t) / 5 * 1000:.0f} ms per forward + backward")


if __name__ == "__main__":
    main()
