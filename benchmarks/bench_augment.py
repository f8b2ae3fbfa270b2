"""Throughput of BatchAugment on CPU (prints img/s; not a test).

    python benchmarks/bench_augment.py [--size 32] [--repeats 30]

Inputs are uint8 batches as `train_batches` passes them for in-memory splits, (B, 3, H, W)
contiguous, and as (B, H, W, 3) for comparison. The best of three timed loops is reported, to damp
noise from other processes on the machine, as images per wall-clock second and per CPU-second of
this process (the latter is the per-core figure, and stays meaningful on a busy machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from instdisc.data.augment import BatchAugment


def images_per_second(images: torch.Tensor, size: int, repeats: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second), best of three loops each."""
    augment = BatchAugment(size)
    for _ in range(3):  # warm-up
        augment(images)
    wall = cpu = float("inf")
    for _ in range(3):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            augment(images)
        wall = min(wall, (time.perf_counter() - start) / repeats)
        cpu = min(cpu, (time.process_time() - start_cpu) / repeats)
    return len(images) / wall, len(images) / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description="BatchAugment throughput on CPU")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (128, 512):
            nchw = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8)
            for layout, images in (("B,3,H,W", nchw), ("B,H,W,3", nchw.permute(0, 2, 3, 1))):
                images = images.contiguous()
                wall, cpu = images_per_second(images, args.size, args.repeats)
                print(f"threads={threads} batch={batch:4d} {args.size}x{args.size} ({layout}): "
                      f"{wall:8,.0f} img/s wall, {cpu:8,.0f} img per CPU-second")


if __name__ == "__main__":
    main()
