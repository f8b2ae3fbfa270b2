"""ONNX export of the trained encoder and its parity gate (the DVC stage: `instdisc/stages/export.py`).

The only module that imports onnx and torch.onnx (besides ONNX Runtime in `instdisc.serving`). The exported graph is the eval-mode encoder
*with its preprocessing*: input `images` uint8 (B, H, W, 3) RGB, output `embeddings` float32
(B, D) with unit L2 norm (Wu et al. 2018, arXiv:1805.01978, Sec. 3.1). The graph casts to float,
applies the training mean/std and transposes to NCHW, so production code never re-implements the
normalisation and sends 4x fewer bytes to the GPU. Resizing and cropping stay outside the graph
(`instdisc.serving.embedder.fit_image`): they depend on the source image. Batch is dynamic; height and
width are dynamic where the exporter proves the network accepts them. `ModelInfo` (image size,
mean/std, feature dim, opset, dataset fingerprint, ...) is stored in the model's `metadata_props`.
Weights are embedded: one self-contained .onnx file, no external-data sidecar. The file is a
DVC-cached output, so it holds nothing run-specific: no MLflow run ids (the registry records
those), and none of the source paths and stack traces the exporter writes into node metadata.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.io import atomic_write
from instdisc.serving.embedder import INPUT, OUTPUT, Embedder, ModelInfo, fit_image, load_rgb
from instdisc.errors import StageError

log = logging.getLogger(__name__)

MIN_SPATIAL = 8  # smallest H, W the dynamic-shape export admits
FP16_MIN_COSINE = 0.999  # fp16 gate besides fp16_atol (unit vectors: cos = 1 - |a - b|^2 / 2)
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own INFO lines (hundreds per export) only at WARNING and above."""
    names = CHATTY_LOGGERS + (() if os.environ.get("TORCH_TRACE") else ("torch.__trace",))
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class ServingModel(nn.Module):
    """uint8 (B, H, W, 3) RGB pixels -> (B, D) unit-norm embeddings: preprocessing + encoder.

    `(x - 255 * mean) / (255 * std)` equals training's `(x / 255 - mean) / std`. With `half`, the
    trunk and head run in fp16 and the L2 normalisation in fp32 (its sum of squares can overflow
    fp16); inputs and outputs keep their dtypes.
    """

    def __init__(self, encoder: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 half: bool = False) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval()
        self.half_precision = half
        dtype = torch.float16 if half else torch.float32
        self.register_buffer("offset", (255 * torch.tensor(mean)).view(1, 3, 1, 1).to(dtype))
        self.register_buffer("scale", (255 * torch.tensor(std)).view(1, 3, 1, 1).to(dtype))
        if half:
            self.encoder.half()

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).to(self.offset.dtype)     # (B, 3, H, W)
        x = (x - self.offset) / self.scale                         # (B, 3, H, W), normalised
        if not self.half_precision:
            return self.encoder(x)                                 # (B, D), unit norm
        features = self.encoder.head(self.encoder.pooled(x))       # (B, D), fp16
        return F.normalize(features.float(), dim=1)                # (B, D), fp32 unit norm


def model_info(encoder: nn.Module, meta: dict[str, Any], opset: int, **extra: Any) -> ModelInfo:
    """ModelInfo from `load_encoder`'s meta; ValueError naming a missing preprocess key."""
    preprocess = meta.get("preprocess") or {}
    missing = [k for k in ("mean", "std", "image_size") if k not in preprocess]
    if missing:
        raise ValueError(f"encoder meta['preprocess'] lacks keys {missing}")
    return ModelInfo(
        image_size=tuple(int(s) for s in preprocess["image_size"]),
        mean=tuple(float(m) for m in preprocess["mean"]),
        std=tuple(float(s) for s in preprocess["std"]),
        resize=preprocess.get("resize"), feature_dim=int(encoder.feature_dim), opset=opset,
        encoder_config=dict(meta.get("encoder_config", {})), **extra)


def _export_program(model: nn.Module, example: Tensor, opset: int,
                    spatial: bool) -> onnx.ModelProto:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if spatial:
        dims[1] = torch.export.Dim("height", min=MIN_SPATIAL)
        dims[2] = torch.export.Dim("width", min=MIN_SPATIAL)
    program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                opset_version=opset, dynamic_shapes={"images": dims},
                                external_data=False, dynamo=True, verbose=False)
    return program.model_proto


def to_onnx(encoder: nn.Module, info: ModelInfo, path: Path, *, dynamic_spatial: bool = True,
            half: bool = False) -> ModelInfo:
    """Export `encoder` + preprocessing to one .onnx file at `path` (atomically).

    Returns the ModelInfo written into the file (dtype and dynamic_spatial as actually exported).
    """
    model = ServingModel(encoder, info.mean, info.std, half=half).eval()
    h, w = info.image_size
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)                      # (B, H, W, 3)
    with torch.no_grad(), _quiet_exporter():
        proto, spatial = None, dynamic_spatial
        if dynamic_spatial:
            try:
                proto = _export_program(model, example, info.opset, spatial=True)
            except Exception as err:  # torch.export raises many types for unprovable shapes
                log.warning("dynamic height/width export failed (%s); exporting %dx%d only",
                            str(err).splitlines()[0][:200], h, w)
                spatial = False
        if proto is None:
            proto = _export_program(model, example, info.opset, spatial=False)
    info = dataclasses.replace(info, dtype="float16" if half else "float32",
                               dynamic_spatial=spatial)
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"instdisc encoder: {INPUT} uint8 (B, H, W, 3) RGB -> {OUTPUT} float32 "
                        f"(B, {info.feature_dim}) unit norm; metadata keys instdisc.*")
    strip_provenance(proto)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    atomic_write(Path(path), lambda handle: handle.write(data))
    return info


def strip_provenance(proto: onnx.ModelProto) -> None:
    """Drop what the exporter records about where it ran: node doc strings and node/value
    metadata (source file paths, stack traces, module names), in every graph and function.

    These make the bytes depend on the checkout's path; they carry nothing the model needs.
    """
    def graphs(graph: onnx.GraphProto):
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(attribute.g)
                for sub in attribute.graphs:
                    yield from graphs(sub)

    containers = [*graphs(proto.graph), *proto.functions]
    for container in containers:
        for node in container.node:
            node.doc_string = ""
            del node.metadata_props[:]
        for field in ("input", "output", "value_info", "initializer"):
            for value in getattr(container, field, []):
                if hasattr(value, "metadata_props"):
                    del value.metadata_props[:]
                if hasattr(value, "doc_string"):
                    value.doc_string = ""
        if hasattr(container, "metadata_props"):
            del container.metadata_props[:]
        container.doc_string = ""


@torch.no_grad()
def reference_embeddings(encoder: nn.Module, images: np.ndarray,
                         mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None) -> np.ndarray:
    """PyTorch eager embeddings of uint8 (N, H, W, 3) images through training's eval transform,
    normalised with `mean`/`std` (the encoder's training statistics; default ImageNet's)."""
    from instdisc.data.augment import MEAN, STD, eval_transform

    stats = (tuple(MEAN if mean is None else mean), tuple(STD if std is None else std))
    # only a dataset's own statistics are passed (eval_transform's defaults are ImageNet's)
    kwargs = {} if stats == (tuple(MEAN), tuple(STD)) else {"mean": stats[0], "std": stats[1]}
    x = eval_transform(torch.from_numpy(np.ascontiguousarray(images)), **kwargs)  # (N, 3, H, W)
    return encoder.eval()(x).float().numpy()                                   # (N, D)


def check_parity(path: Path, encoder: nn.Module, images: np.ndarray, *, atol: float,
                 min_cosine: float, device: str = "cpu") -> dict[str, Any]:
    """`onnx.checker` + ONNX Runtime vs PyTorch on uint8 (N, H, W, 3) `images`.

    Also runs image 0 alone (batch 1) to check the dynamic batch axis. Returns max |diff|, the
    smallest cosine, the provider used and `passed` (max |diff| <= atol and cosine >= min_cosine).
    """
    onnx.checker.check_model(str(path), full_check=True)
    embedder = Embedder(path, device=device, batch_size=len(images))
    expected = reference_embeddings(encoder, images, embedder.info.mean,
                                    embedder.info.std)                         # (N, D)
    got = embedder.run(images)                                                 # (N, D)
    single = embedder.run(images[:1])                                          # (1, D)
    diff = max(float(np.abs(got - expected).max()), float(np.abs(single - expected[:1]).max()))
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1)
                                        * np.linalg.norm(expected, axis=1))    # (N,)
    result = {"max_abs_diff": diff, "min_cosine": float(cosine.min()), "num_images": len(images),
              "provider": embedder.provider, "atol": atol, "min_cosine_bound": min_cosine}
    result["passed"] = bool(diff <= atol and result["min_cosine"] >= min_cosine)
    return result


def parity_images(prepared_dir: Path, count: int, image_size: tuple[int, int],
                  resize: int | None = None) -> np.ndarray:
    """`count` evenly spaced test images of the prepared dataset as uint8 (count, H, W, 3).

    Files (manifest storage) go through the serving preprocessing (`fit_image`), so the check
    covers what production feeds the model.
    """
    from instdisc.data.prepared import PreparedDataset

    splits = PreparedDataset.open(prepared_dir).meta["splits"]
    return split_pixels(prepared_dir, "test" if "test" in splits else "train", count, image_size,
                        resize)[0]


class Variant(NamedTuple):
    """One file the stage writes and the gate it must pass."""

    name: str  # "fp32" | "fp16"
    path: Path
    half: bool
    atol: float
    min_cosine: float
    device: str  # where ONNX Runtime runs the parity check


def export_gated(encoder: nn.Module, info: ModelInfo, images: np.ndarray,
                 variants: list[Variant], dynamic_spatial: bool,
                 metrics: dict[str, Any], int8: Int8Gate | None = None) -> dict[str, ModelInfo]:
    """Export every variant to a staged file, check parity, then move all into place together.

    With `int8`, the staged fp32 file is also quantized and kNN-gated (`int8_knn_gate`).
    Parity results go into `metrics` ("parity", "fp16_parity", "int8_parity"); on any failure no
    file is moved and StageError names the numbers and their bounds. A rejected INT8 file that is
    not `required` is left out (exported has no "int8"; int8_parity says why) and the rest moves.
    """
    staged, exported = [], {}
    try:
        for v in variants:
            tmp = v.path.with_name(f".{v.path.name}.staged")
            staged.append((tmp, v.path))
            exported[v.name] = to_onnx(encoder, info, tmp, dynamic_spatial=dynamic_spatial,
                                       half=v.half)
            parity = check_parity(tmp, encoder, images, atol=v.atol, min_cosine=v.min_cosine,
                                  device=v.device)
            key = "parity" if v.name == "fp32" else f"{v.name}_parity"
            metrics[key], metrics[f"{v.name}_bytes"] = parity, tmp.stat().st_size
            if not parity["passed"]:
                raise StageError(f"{v.name} ONNX parity failed on {parity['num_images']} images: "
                                 f"max |diff| {parity['max_abs_diff']:.3e} (bound {v.atol}), min "
                                 f"cosine {parity['min_cosine']:.7f} (bound {v.min_cosine})")
        if int8 is not None:
            assert variants[0].name == "fp32", "int8 is quantized from the staged fp32 file"
            int8_info = _stage_int8(int8, staged[0][0], exported["fp32"], staged, metrics)
            if int8_info is not None:
                exported["int8"] = int8_info
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return exported


# ---- INT8 for CPU serving: static quantization, gated on kNN top-1

KNN_K, KNN_SIGMA = 20, 0.1  # the int8 gate compares fp32 and int8 with the same kNN classifier


class Int8Gate(NamedTuple):
    """The INT8 file to write, its calibration images and the labelled kNN data of its gate."""

    path: Path
    calibration: np.ndarray  # uint8 (C, H, W, 3), prepared training images
    bank: np.ndarray  # uint8 (N, H, W, 3) training images, the kNN memory
    bank_labels: np.ndarray  # int64 (N,)
    queries: np.ndarray  # uint8 (Q, H, W, 3) test images
    query_labels: np.ndarray  # int64 (Q,)
    num_classes: int
    max_knn_drop: float  # points of kNN top-1 int8 may lose against fp32
    required: bool = False  # a rejection fails the stage (export.int8: require)


def split_pixels(prepared_dir: Path, split_name: str, count: int, image_size: tuple[int, int],
                 resize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` evenly spaced images of one prepared split as uint8 (n, H, W, 3) at the
    model input (serving preprocessing for other sizes), with their int64 (n,) labels."""
    from PIL import Image

    from instdisc.data.prepared import PreparedDataset

    split = PreparedDataset.open(prepared_dir).split(split_name)
    rows = np.unique(np.linspace(0, split.num_items - 1, min(count, split.num_items)).round())
    rows = rows.astype(np.int64)                                                 # (n,)
    return rows_pixels(split, rows, image_size, resize), split.labels.numpy()[rows]


def rows_pixels(split: Any, rows: np.ndarray, image_size: tuple[int, int],
                resize: int | None = None) -> np.ndarray:
    """Items `rows` (int64 (n,)) of a prepared split (`SplitData`) as uint8 (n, H, W, 3) at the
    model input, preprocessed as serving does (`fit_image`) when stored at another size."""
    from PIL import Image

    if split.images is not None:
        images = split.images.numpy()[rows]                                      # (n, h, w, 3)
        if tuple(images.shape[1:3]) == tuple(image_size):
            return np.ascontiguousarray(images)
        sources = [Image.fromarray(image, "RGB") for image in images]
    else:
        sources = [load_rgb(split.paths[r]) for r in rows]
    return np.stack([fit_image(s, image_size, resize) for s in sources])          # (n, H, W, 3)


class _Calibration:
    """onnxruntime.quantization CalibrationDataReader over uint8 batches of 32 images."""

    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{INPUT: images[i:i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8(fp32_path: Path, path: Path, calibration: np.ndarray,
                  info: ModelInfo) -> ModelInfo:
    """ONNX Runtime static quantization of `fp32_path` to `path`: QDQ, int8 weights per channel,
    uint8 activations with min/max ranges from `calibration` (uint8 (C, H, W, 3)). The uint8 input,
    the in-graph normalisation and the float32 unit-norm output stay as they are."""
    import tempfile

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), _Calibration(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    info = dataclasses.replace(info, dtype="int8")
    del proto.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    strip_provenance(proto)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write(Path(path), lambda handle: handle.write(data))
    return info


def int8_knn_gate(fp32_path: Path, int8_path: Path, gate: Int8Gate) -> dict[str, Any]:
    """Weighted-kNN top-1 on the test queries with fp32 and with int8 embeddings (each model
    embeds both bank and queries, on the CPU); passed when int8 loses <= gate.max_knn_drop."""
    from instdisc.evaluate.knn import knn_accuracy

    result: dict[str, Any] = {"k": KNN_K, "sigma": KNN_SIGMA, "num_bank": len(gate.bank),
                              "num_queries": len(gate.queries)}
    embedded = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        embedder = Embedder(path, device="cpu", batch_size=256)
        bank, queries = embedder.embed(gate.bank), embedder.embed(gate.queries)  # (N, D), (Q, D)
        embedded[name] = queries
        accuracy = knn_accuracy(torch.from_numpy(bank), torch.from_numpy(gate.bank_labels),
                                torch.from_numpy(queries), torch.from_numpy(gate.query_labels),
                                gate.num_classes, k=KNN_K, sigma=KNN_SIGMA)
        result[f"{name}_knn_top1"] = accuracy["top1"]
    result["knn_drop"] = result["fp32_knn_top1"] - result["int8_knn_top1"]
    cosine = (embedded["fp32"] * embedded["int8"]).sum(1)                       # (Q,), unit rows
    result.update(min_cosine=float(cosine.min()), mean_cosine=float(cosine.mean()),
                  max_knn_drop=gate.max_knn_drop,
                  passed=bool(result["knn_drop"] <= gate.max_knn_drop))
    return result


def _stage_int8(gate: Int8Gate, fp32_staged: Path, info: ModelInfo,
                staged: list[tuple[Path, Path]], metrics: dict[str, Any]) -> ModelInfo | None:
    """Quantize and gate; a rejected INT8 file is never moved into place (and an older one at
    `gate.path` is removed), and fails the stage only when `gate.required`."""
    tmp = gate.path.with_name(f".{gate.path.name}.staged")
    staged.append((tmp, gate.path))
    exported = quantize_int8(fp32_staged, tmp, gate.calibration, info)
    result = int8_knn_gate(fp32_staged, tmp, gate)
    metrics["int8_parity"], metrics["int8_bytes"] = result, tmp.stat().st_size
    if result["passed"]:
        return exported
    message = (f"int8 kNN gate failed: top-1 {result['int8_knn_top1']:.2f} vs fp32 "
               f"{result['fp32_knn_top1']:.2f} on {result['num_queries']} test images, a drop of "
               f"{result['knn_drop']:.2f} points (bound export.int8_max_knn_drop = "
               f"{gate.max_knn_drop})")
    if gate.required:
        raise StageError(f"{message}; export.int8 is 'require': set it to true to ship fp32 "
                         "alone, or calibrate on more images (export.int8_calibration_images)")
    staged.remove((tmp, gate.path))
    tmp.unlink(missing_ok=True)
    gate.path.unlink(missing_ok=True)  # an INT8 file of an earlier model must not stay beside this one
    result["rejected"] = f"{message}; no int8 file written, the fp32 model is exported"
    log.warning("%s (export.int8: require makes this fatal)", result["rejected"])
    return None
