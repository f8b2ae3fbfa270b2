"""ONNX Runtime vs PyTorch eager embedding throughput on the CPU.

Both sides start from uint8 (B, H, W, 3) pixels and end with unit-norm embeddings: torch runs
training's eval transform + the encoder under `inference_mode`; ORT runs the exported graph
(normalisation inside) through `instdisc.serving.embedder.Embedder`. Both use the same thread count.
32x32 inputs use the CIFAR stem, 224x224 the ImageNet stem (as the pipeline would; `--stem`).
On a shared machine, a busy CPU hurts torch's OpenMP far more than ORT's thread pool: look at the
load average printed first, and compare with `--threads 1` too.

    python benchmarks/bench_onnx.py                      # ResNet-18, batches 1 and 64
    python benchmarks/bench_onnx.py --width 0.25 --sizes 32 --batches 1 64 256

Target (issue 4): ORT >= 2x eager at batch 64.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instdisc.data.augment import MEAN, STD, eval_transform
from instdisc.serving.embedder import Embedder
from instdisc.export import model_info, to_onnx
from instdisc.models.encoder import build_encoder


def timed(fn, min_seconds: float, min_repeats: int) -> float:
    """Median seconds per call after two warm-up calls."""
    time.sleep(0.5)  # let the other engine's spinning worker threads go idle first
    fn()
    fn()
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(args: argparse.Namespace, size: int, out_dir: Path) -> list[dict]:
    torch.manual_seed(0)
    cifar_stem = size <= 64 if args.stem == "auto" else args.stem == "cifar"
    encoder = build_encoder(args.arch, args.feature_dim, cifar_stem=cifar_stem,
                            width=args.width).eval()
    meta = {"preprocess": {"mean": list(MEAN), "std": list(STD), "image_size": [size, size]},
            "encoder_config": encoder.config}
    path = out_dir / f"{args.arch}_{size}.onnx"
    start = time.perf_counter()
    to_onnx(encoder, model_info(encoder, meta, opset=args.opset), path)
    print(f"exported {args.arch} width {args.width} ({'CIFAR' if cifar_stem else 'ImageNet'} "
          f"stem) at {size}x{size} in "
          f"{time.perf_counter() - start:.1f} s ({path.stat().st_size / 1e6:.1f} MB)")
    embedder = Embedder(path, device="cpu", threads=args.threads, batch_size=max(args.batches))
    rows = []
    for batch in args.batches:
        pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
        tensor = torch.from_numpy(pixels)

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return encoder(eval_transform(tensor))

        ort_s = timed(lambda: embedder.run(pixels), args.min_seconds, args.repeats)
        torch_s = timed(eager, args.min_seconds, args.repeats)
        diff = float(np.abs(embedder.run(pixels) - eager().numpy()).max())
        rows.append({"size": size, "batch": batch, "ort_ms": 1e3 * ort_s,
                     "torch_ms": 1e3 * torch_s, "speedup": torch_s / ort_s,
                     "ort_img_s": batch / ort_s, "torch_img_s": batch / torch_s, "diff": diff})
        r = rows[-1]
        print(f"{size:>4} {batch:>5} {r['ort_ms']:>10.2f} {r['torch_ms']:>10.2f} "
              f"{r['speedup']:>7.2f}x {r['ort_img_s']:>9.0f} {r['torch_img_s']:>9.0f} "
              f"{diff:>9.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--stem", choices=("auto", "cifar", "imagenet"), default="auto",
                        help="auto: CIFAR stem up to 64 px, ImageNet stem above")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both (default: torch's default, = physical cores)")
    parser.add_argument("--opset", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed calls")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="and at least this much timed time per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}")
    print(f"{'size':>4} {'batch':>5} {'ORT ms':>10} {'torch ms':>10} {'speedup':>8} "
          f"{'ORT img/s':>9} {'torch img/s':>9} {'max|diff|':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows += bench_size(args, size, Path(tmp))
    big = [r for r in rows if r["batch"] >= 64]
    if big:
        worst = min(r["speedup"] for r in big)
        print(f"batch >= 64: ORT is {worst:.2f}x eager at worst "
              f"({'meets' if worst >= 2 else 'misses'} the 2x target)")


if __name__ == "__main__":
    main()
