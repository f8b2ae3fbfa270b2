"""INT8 ONNX Runtime vs fp32 ONNX Runtime vs PyTorch eager, img/s on the CPU, and each as a
fraction of this CPU's measured sgemm peak.

The peak is a large fp32 torch matmul timed in the same run (same threads). A figure's fraction
is (model GFLOP per image x img/s) / peak GFLOP/s, with the fp32 forward's FLOPs counted by
`torch.utils.flop_counter` (int8 does the same multiply-adds, in int8: its fraction can pass 1).
ResNet-18 (128-d head), CIFAR stem at 32x32, ImageNet stem at 224x224; random weights and
random calibration images (speed does not depend on them; accuracy is the export stage's gate).

    python benchmarks/bench_int8.py                     # batches 1 and 64, 32 and 224 px
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instdisc.data.augment import MEAN, STD, eval_transform
from instdisc.export import model_info, quantize_int8, to_onnx
from instdisc.models.encoder import build_encoder
from instdisc.serving.embedder import Embedder

from bench_onnx import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def sgemm_peak(n: int = 2048) -> float:
    """GFLOP/s of an n x n fp32 matmul (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = timed(lambda: torch.mm(a, b), 1.0, 5)
    return 2 * n ** 3 / seconds / 1e9


def forward_gflop(encoder: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def bench_size(size: int, batches: list[int], width: float, tmp: Path, peak: float,
               args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 128, cifar_stem=size <= 64, width=width).eval()
    meta = {"preprocess": {"mean": list(MEAN), "std": list(STD), "image_size": [size, size]},
            "encoder_config": encoder.config}
    fp32 = tmp / f"fp32_{size}.onnx"
    info = to_onnx(encoder, model_info(encoder, meta, opset=20), fp32)
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (args.calibration, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    quantize_int8(fp32, tmp / f"int8_{size}.onnx", calibration, info)
    print(f"{size}x{size}: quantized in {time.perf_counter() - start:.1f} s "
          f"({fp32.stat().st_size / 1e6:.1f} -> "
          f"{(tmp / f'int8_{size}.onnx').stat().st_size / 1e6:.1f} MB)")
    gflop = forward_gflop(encoder, size)
    engines = {"int8 ORT": Embedder(tmp / f"int8_{size}.onnx", device="cpu", threads=args.threads),
               "fp32 ORT": Embedder(fp32, device="cpu", threads=args.threads)}
    for batch in batches:
        pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)  # (B, H, W, 3)
        x = torch.from_numpy(pixels)
        rates = {}
        for name, embedder in engines.items():
            rates[name] = batch / timed(lambda: embedder.run(pixels), args.seconds, 3)
        with torch.inference_mode():
            rates["torch eager"] = batch / timed(lambda: encoder(eval_transform(x)),
                                                 args.seconds, 3)
        for name, rate in rates.items():
            print(f"  {size:>3} px  batch {batch:>3}  {name:<12} {rate:9.1f} img/s   "
                  f"{gflop * rate / peak:6.1%} of sgemm peak   "
                  f"x{rate / rates['torch eager']:.2f} eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=2.0, help="least time per figure")
    parser.add_argument("--calibration", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = sgemm_peak()
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; sgemm peak {peak:.1f} GFLOP/s (2048^3 fp32 matmul)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            bench_size(size, args.batches, args.width, Path(tmp), peak, args)


if __name__ == "__main__":
    main()
