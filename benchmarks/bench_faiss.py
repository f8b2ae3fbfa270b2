"""FAISS (HNSW, IVF) vs exact search on N x 128 unit vectors: build time, query latency,
recall@10 against exact search (`instdisc.serving.ann`, queries one at a time).

Vectors are clustered (2000 Gaussian clusters, like embeddings), not uniform on the sphere (the
worst case for any ANN index). 1M x 128 float32 is 512 MB.

    python benchmarks/bench_faiss.py --n 1000000
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from instdisc.serving.ann import build_faiss, recall_at_k


def clustered(n: int, dim: int, clusters: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)               # (C, D)
    out = np.empty((n, dim), np.float32)                                           # (N, D)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = centers[rng.integers(0, clusters, m)]                              # (m, D)
        block += 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"])
    args = parser.parse_args()
    vectors = clustered(args.n, args.dim)
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; {args.n} x {args.dim}")
    for kind in args.kinds:
        start = time.perf_counter()
        index = build_faiss(vectors, kind)
        build = time.perf_counter() - start
        report = recall_at_k(index, vectors, k=10, num_queries=args.queries)
        print(f"{kind:>5}: build {build:6.1f} s  recall@10 {report['recall@10']:.3f}  "
              f"{report['ann_ms_per_query']:.2f} ms/query  (exact "
              f"{report['exact_ms_per_query']:.1f} ms/query)")


if __name__ == "__main__":
    main()
