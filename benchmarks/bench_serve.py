"""Load test of `instdisc serve` on loopback: N concurrent clients for T seconds.

Exports a ResNet-18 (CIFAR stem, `--width`, 128-d) at 32x32, starts `instdisc serve` as a
subprocess on 127.0.0.1 (a free port), waits for /ready, then runs `--clients` asyncio clients,
each posting one PNG to /embed back to back until `--seconds` have passed or `--max-requests`
were sent; prints throughput, p50/p95/p99 latency and failed requests, and stops the server.
Bounded: at most 256 clients, 120 s and `--max-requests`; only 127.0.0.1 is ever contacted.

    python benchmarks/bench_serve.py --clients 16 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"


def export_model(path: Path, width: float, size: int) -> None:
    import torch

    from instdisc.data.augment import MEAN, STD
    from instdisc.export import model_info, to_onnx
    from instdisc.models.encoder import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 128, cifar_stem=True, width=width).eval()
    meta = {"preprocess": {"mean": list(MEAN), "std": list(STD), "image_size": [size, size]},
            "encoder_config": encoder.config}
    to_onnx(encoder, model_info(encoder, meta, opset=20), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


async def load(url: str, payload: bytes, clients: int, seconds: float,
               max_requests: int) -> tuple[list[float], int, float]:
    """(latencies of successful requests, failures, wall seconds)."""
    latencies: list[float] = []
    failures = sent = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures, sent
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            start = time.perf_counter()
            try:
                response = await http.post("/embed", content=payload,
                                           headers={"content-type": "image/png"})
                ok = response.status_code == 200 and len(response.json()["embeddings"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, failures, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="server's ORT intra-op threads")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 120):
        parser.error("bounded: 1..256 clients, 0..120 seconds")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "encoder.onnx"
        export_model(model, args.width, args.size)
        port = free_port()
        url = f"http://{HOST}:{port}"
        command = [sys.executable, "-m", "instdisc.cli", "serve", "--model", str(model),
                   "--device", "cpu", "--host", HOST, "--port", str(port),
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, server)
            rng = np.random.default_rng(0)
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            asyncio.run(load(url, buffer.getvalue(), 2, 2.0, 1000))  # warm-up
            latencies, failures, wall = asyncio.run(
                load(url, buffer.getvalue(), args.clients, args.seconds, args.max_requests))
            batching = httpx.get(f"{url}/metadata", timeout=5).json()["batching"]
        finally:
            server.terminate()
            server.wait(30)
    ms = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99]) if latencies else [np.nan] * 3
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; ResNet-18 width "
          f"{args.width} {args.size}x{args.size}, {args.clients} clients for {wall:.1f} s")
    print(f"requests ok {len(latencies)}, failed {failures}; throughput "
          f"{len(latencies) / wall:.1f} req/s (= img/s)")
    print(f"latency ms p50 {ms[0]:.1f}  p95 {ms[1]:.1f}  p99 {ms[2]:.1f}")
    print(f"server: {batching['batches']} session runs for {batching['images']} images "
          f"(mean batch {batching['images'] / max(1, batching['batches']):.1f})")


if __name__ == "__main__":
    main()
