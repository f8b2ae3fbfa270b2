"""Production embedding with ONNX Runtime: `Embedder(path).embed(images) -> (N, D) unit vectors`.

Needs onnxruntime(-gpu), numpy and Pillow only; no torch. The exported graph (`instdisc.export`)
takes `images`: uint8 (B, H, W, 3) RGB pixels and does the uint8 -> float conversion and the
mean/std normalisation itself, so callers only decode, resize and center-crop, exactly like the
training pipeline's eval transform (shorter side to `resize`, then center crop to `image_size`).
Everything a caller needs to know is in the model's metadata (`ModelInfo`).

The onnxruntime-gpu wheel lists CUDAExecutionProvider even on hosts without a GPU, and a session
that asked for it silently runs on the CPU. `Embedder` therefore reads the provider the session
actually got, logs it, and with `strict=True` raises `ProviderError` instead of falling back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from instdisc.data.decode import DECODE_ERRORS, decode_rgb

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "embeddings"
METADATA_PREFIX = "instdisc."
METADATA_VERSION = 1
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ProviderError(ValueError):
    """The requested execution provider is not the one onnxruntime activated (strict mode)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the exported model expects and where it came from; stored as ONNX metadata_props."""

    image_size: tuple[int, int]  # (H, W) the encoder was trained/evaluated at
    mean: tuple[float, float, float]  # per-channel, on [0, 1] pixels (applied inside the graph)
    std: tuple[float, float, float]
    feature_dim: int
    opset: int
    resize: int | None = None  # shorter side before the center crop; None: to image_size
    dtype: str = "float32"  # compute precision of the graph; inputs/outputs never change
    dynamic_spatial: bool = False  # graph accepts other H, W (Embedder never sends them)
    train_run_id: str = ""  # MLflow run of the pretrain stage
    export_run_id: str = ""  # MLflow run of the export stage (the registered model's run)
    dataset_fingerprint: str = ""  # prepared dataset the encoder was trained on
    encoder_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_format: str = "uint8 (B, H, W, 3) RGB, 0..255; normalisation is in the graph"
    format_version: int = METADATA_VERSION

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_metadata(self) -> dict[str, str]:
        """{"instdisc.<field>": JSON text} for ONNX `metadata_props`."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in self.as_dict().items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], where: str = "model") -> ModelInfo:
        """Inverse of `to_metadata`; ValueError naming the missing key for foreign models."""
        raw = {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in props.items()
               if k.startswith(METADATA_PREFIX)}
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(raw))
        if missing:
            raise ValueError(f"{where} has no instdisc metadata keys {missing}: was it written "
                             "by `instdisc export`?")
        if raw.get("format_version", METADATA_VERSION) != METADATA_VERSION:
            raise ValueError(f"{where}: metadata format_version {raw['format_version']}, this "
                             f"code reads {METADATA_VERSION}")
        raw = {k: v for k, v in raw.items() if k in names}
        for key in ("image_size", "mean", "std"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it CUDA cannot work, whatever ORT lists."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def session_options(threads: int | None) -> ort.SessionOptions:
    """Full graph optimisation; intra-op threads = `threads` or ORT's default (physical cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of convs: no inter-op
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0
    return options


def load_rgb(source: ImageLike) -> Image.Image:
    """Decode a file path, encoded bytes or PIL image into an RGB PIL image.

    Decoding is `instdisc.data.decode.decode_rgb`, the one prepare uses, so served images are
    converted exactly like training images. Raises ValueError naming the file when it is missing
    or not a readable image.
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        return decode_rgb(source if isinstance(source, bytes) else Path(source))[0]
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {name!r}: {err}") from err


def fit_image(image: Image.Image, image_size: Sequence[int], resize: int | None) -> np.ndarray:
    """Shorter side to `resize` (default max(image_size)), center crop -> uint8 (H, W, 3).

    Same arithmetic as torchvision's Resize(int) + CenterCrop on PIL images (bilinear).
    """
    th, tw = int(image_size[0]), int(image_size[1])
    w, h = image.size
    if (h, w) != (th, tw):
        short = resize or max(th, tw)
        if w <= h:
            size = (short, int(short * h / w))  # (W, H) for PIL
        else:
            size = (int(short * w / h), short)
        if size != (w, h):
            image = image.resize(size, Image.BILINEAR)
        w, h = image.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        image = image.crop((left, top, left + tw, top + th))
    return np.asarray(image, dtype=np.uint8)  # (H, W, 3)


def check_batch(array: np.ndarray, image_size: Sequence[int], where: str = "input") -> np.ndarray:
    """Validate a pixel array and return it as a contiguous uint8 (B, H, W, 3) batch."""
    h, w = int(image_size[0]), int(image_size[1])
    expected = f"uint8 RGB pixels of shape (H, W, 3) or (B, H, W, 3) with H, W = {h}, {w}"
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, got {type(array).__name__}")
    if array.ndim not in (3, 4):
        raise ValueError(f"{where} has shape {array.shape} (rank {array.ndim}); "
                         f"expected {expected}")
    batch = array[None] if array.ndim == 3 else array                    # (B, H, W, C)
    if batch.shape[-1] != 3:
        hint = " (channels-first? use array.transpose(1, 2, 0))" if batch.shape[1] == 3 else ""
        raise ValueError(f"{where} has {batch.shape[-1]} channels in shape {array.shape}"
                         f"{hint}; expected {expected}")
    if array.dtype != np.uint8:
        raise ValueError(f"{where} has dtype {array.dtype}; expected {expected} (convert with "
                         "(x * 255).round().astype(np.uint8) if x is in [0, 1])")
    if batch.shape[1:3] != (h, w):
        raise ValueError(f"{where} has size {batch.shape[1]}x{batch.shape[2]}; the model expects "
                         f"{h}x{w}: pass a file path or PIL image to have it resized and cropped")
    return np.ascontiguousarray(batch)


class Embedder:
    """An ONNX Runtime session for an `instdisc export` model, with input handling and batching.

    Args:
        model_path: the .onnx file.
        device: "cuda" (CUDA first, CPU as fallback), "cpu", or "auto" (CUDA when a driver exists).
        strict: raise ProviderError when CUDA was requested (device "cuda", or "auto" on a host
            with an NVIDIA driver) but the session runs on the CPU.
        batch_size: images per session run.
        threads: CPU intra-op threads; None keeps ORT's default (one per physical core).
        device_id: CUDA device ordinal.
        io_binding: bind inputs/outputs explicitly; default on for CUDA (device-side output, one
            host->device copy of the uint8 batch per run).
        cuda_options: extra CUDAExecutionProvider options, e.g. {"use_tf32": "1"}.
    """

    def __init__(self, model_path: str | os.PathLike, *, device: str = "auto", strict: bool = False,
                 batch_size: int = 64, threads: int | None = None, device_id: int = 0,
                 io_binding: bool | None = None,
                 cuda_options: dict[str, Any] | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device = {device!r}: allowed {', '.join(DEVICES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: must be >= 1")
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
        self.model_path, self.batch_size, self.device_id = path, batch_size, device_id
        want_cuda = device == "cuda" or (device == "auto" and cuda_driver_present())
        providers: list[Any] = [CPU]
        if want_cuda:
            ort.preload_dlls(directory="")  # CUDA/cuDNN from the nvidia-* wheels, torch not needed
            # TF32 (on by default in the CUDA EP) would make an fp32 model differ from its
            # parity-checked CPU results by ~1e-3; the fp16 export is the fast variant.
            providers.insert(0, (CUDA, {"device_id": device_id, "use_tf32": "0",
                                        **(cuda_options or {})}))
        self.session = ort.InferenceSession(str(path), session_options(threads),
                                            providers=providers)
        self.provider: str = self.session.get_providers()[0]  # the one that actually runs
        self.requested: str = CUDA if want_cuda else CPU
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.fell_back = want_cuda and self.provider != CUDA
        if self.fell_back:
            message = (f"{CUDA} was requested for {str(path)!r} but onnxruntime activated "
                       f"{self.provider} (no usable GPU, driver, CUDA or cuDNN libraries)")
            if strict:
                raise ProviderError(message)
            log.warning("%s; running on the CPU", message)
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map,
                                            where=f"ONNX model {str(path)!r}")
        log.info("embedder %s on %s (%s), input %dx%d, %d-d output", path.name, self.provider,
                 self.device, *self.info.image_size, self.info.feature_dim)

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    def prepare(self, image: ImageLike) -> np.ndarray:
        """One input (path, bytes, PIL image or pixel array) -> uint8 (H, W, 3) at model size."""
        if isinstance(image, np.ndarray):
            return check_batch(image, self.info.image_size, "input array")[0]
        return fit_image(load_rgb(image), self.info.image_size, self.info.resize)

    def embed(self, images: ImageLike | Iterable[ImageLike], progress: bool = False) -> np.ndarray:
        """Unit-norm embeddings float32 (N, D), one row per input, in order.

        `images` is one input or a list of them (paths, bytes, PIL images, uint8 (H, W, 3)
        arrays), or one uint8 (B, H, W, 3) array.
        """
        if isinstance(images, np.ndarray):
            batch = check_batch(images, self.info.image_size, "input array")
            out = [self.run(batch[i:i + self.batch_size])
                   for i in range(0, len(batch), self.batch_size)]
            return np.concatenate(out) if out else np.zeros((0, self.feature_dim), np.float32)
        if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
            images = [images]
        images = list(images)
        from tqdm.auto import tqdm

        out = np.empty((len(images), self.feature_dim), np.float32)  # (N, D)
        bar = tqdm(total=len(images), unit="img", disable=not progress)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = np.stack([self.prepare(image) for image in chunk])  # (B, H, W, 3)
            out[start:start + len(chunk)] = self.run(batch)
            bar.update(len(chunk))
        bar.close()
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One session run on a validated uint8 (B, H, W, 3) batch -> float32 (B, D)."""
        batch = check_batch(batch, self.info.image_size, "batch")
        if not self.io_binding:
            return self.session.run([OUTPUT], {INPUT: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT, batch)  # one host->device copy of uint8 pixels
        binding.bind_output(OUTPUT, self.device, self.device_id if self.device == "cuda" else 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]  # (B, D)
