"""Time `knn_accuracy` (arXiv:1805.01978, Sec. 3.4) on random unit vectors.

Default: 10k queries against a 50k bank, D = 128, k = 200, 10 classes, 2 CPU threads; the target is
<= 3 s. Peak memory is the growth of the process's peak RSS (ru_maxrss) during scoring, which
sees torch's allocations (tracemalloc does not); on CUDA the allocator's peak is reported too.

    python benchmarks/bench_knn.py --queries 10000 --bank 50000 --threads 2 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time

import torch
import torch.nn.functional as F

from instdisc.evaluate.knn import DEFAULT_BANK_CHUNK_SIZE, knn_accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--bank", type=int, default=50000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--sigma", type=float, default=0.07)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=4096, help="EvaluateParams.chunk_size")
    p.add_argument("--bank-chunk-size", type=int, default=DEFAULT_BANK_CHUNK_SIZE)
    p.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.bank, args.dim, generator=gen), dim=1).to(device)  # (N, D)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1).to(device)
    bank_labels = torch.randint(0, args.classes, (args.bank,), generator=gen).to(device)  # (N,)
    query_labels = torch.randint(0, args.classes, (args.queries,), generator=gen).to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mib()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        cpu_start, start = cpu_seconds(), time.perf_counter()
        acc = knn_accuracy(bank, bank_labels, queries, query_labels, args.classes, k=args.k,
                           sigma=args.sigma, chunk_size=args.chunk_size,
                           bank_chunk_size=args.bank_chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(cpu_seconds() - cpu_start)
    print(f"knn_accuracy: {args.queries} queries x {args.bank} bank, D={args.dim}, k={args.k}, "
          f"{args.threads} threads, {device}, chunk {args.chunk_size} x {args.bank_chunk_size}")
    print(f"wall seconds: best {min(times):.3f}, all {', '.join(f'{t:.3f}' for t in times)}")
    # CPU seconds / threads is the wall time on otherwise idle cores (shared hosts are noisy).
    print(f"cpu seconds (user+sys, all threads): best {min(cpu_times):.3f} "
          f"(/ {args.threads} threads = {min(cpu_times) / args.threads:.3f})")
    block = min(args.chunk_size, args.queries) * min(args.bank, args.bank_chunk_size)  # floats
    block_mib = 4 * block / 2**20
    print(f"peak RSS growth while scoring: {peak_rss_mib() - rss_before:.1f} MiB "
          f"(similarity block alone: {block_mib:.1f} MiB)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB")
    print(f"accuracy (chance level ~{100 / args.classes:.0f}%): top1 {acc['top1']:.2f}, "
          f"top5 {acc['top5']:.2f}")


if __name__ == "__main__":
    main()
