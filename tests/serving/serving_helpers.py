"""Shared, cached artifacts for the serving tests: a tiny encoder file and its ONNX export."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instdisc import checkpoint
from instdisc.data.augment import MEAN, STD
from instdisc.models.encoder import build_encoder

IMAGE_SIZE = 32
FEATURE_DIM = 16
PREPROCESS = {"mean": list(MEAN), "std": list(STD), "image_size": [IMAGE_SIZE, IMAGE_SIZE],
              "resize": None}


@dataclass(frozen=True)
class Tiny:
    encoder_path: Path
    onnx_path: Path
    info: object  # ModelInfo as written


_CACHE: dict[str, Tiny] = {}


def tiny_encoder_file(path: Path) -> Path:
    """An eighth-width ResNet-18 (CIFAR stem, 16-d), saved like the pretrain stage does."""
    import torch

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", FEATURE_DIM, True, width=0.125).eval()
    checkpoint.save_encoder(path, encoder, PREPROCESS,
                            extra={"fingerprint": "f" * 64})
    return path


def tiny_export(tmp_path_factory) -> Tiny:
    """Export once per test session (about 5 s), whichever test module asks first."""
    if "tiny" not in _CACHE:
        from instdisc.export import model_info, to_onnx

        root = tmp_path_factory.mktemp("tiny_model")
        encoder_path = tiny_encoder_file(root / "encoder.pt")
        encoder, meta = checkpoint.load_encoder(encoder_path)
        info = to_onnx(encoder, model_info(encoder, meta, opset=20), root / "encoder.onnx")
        _CACHE["tiny"] = Tiny(encoder_path, root / "encoder.onnx", info)
    return _CACHE["tiny"]


def random_images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) with some structure (gradients + noise), not pure noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None, None]                       # (1, S, 1, 1)
    base = rng.uniform(0.2, 1.0, (n, 1, 1, 3)) * ramp.transpose(0, 2, 1, 3)     # (n, S, 1, 3)
    noise = rng.integers(0, 60, (n, size, size, 3))                             # (n, S, S, 3)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, size: int = IMAGE_SIZE, seed: int = 0) -> list[Path]:
    """`count` PNG files img_000.png ... in `folder` (lossless, so pixels round-trip)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(random_images(count, size, seed)):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0, limits=None) -> Iterator[str]:
    """Run an ASGI app on 127.0.0.1 (a free port) in a thread with the server `instdisc serve`
    runs (`serving.server.server_config`, `limits` or the defaults); yields its base URL and
    stops the server on exit."""
    import uvicorn

    from instdisc.serving.server import ServerLimits, server_config

    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, limits or ServerLimits(),
                                          access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """The tiny exported encoder (read only); import it into a test module as a fixture."""
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def embedder(tiny: Tiny):
    """A CPU `Embedder` of `tiny`, batch size 4."""
    from instdisc.serving.embedder import Embedder

    return Embedder(tiny.onnx_path, device="cpu", batch_size=4)
