"""DVC stage `export`: models/encoder.pt -> models/encoder.onnx (+ fp16, int8), gates, registry.

params.yaml: `device`, `export`. The fp32 gate always runs on the CPU (the reference platform);
the fp16 one on `device` (auto/cuda* -> CUDA if usable, else CPU); the int8 one (CPU serving)
compares kNN top-1 on the test split with fp32's. A failed fp32/fp16 gate fails the stage and the
ONNX file keeps its previous content; a failed int8 gate only leaves the INT8 file out (reported in
metrics/export.json `int8_parity.rejected`) unless `export.int8: require`. Then the model is registered in MLflow as
`export.model_name` with the alias `export.alias`; the registry, not the file, records the
training and export run ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.errors import StageError
from instdisc.io import file_sha256
from instdisc.stages import _common

NAME = "export"
HELP = "Export the encoder to ONNX, check parity with PyTorch, register it in MLflow."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME)
    parser.add_argument("--data", type=Path, default=_common.PREPARED,
                        help="prepared dataset whose test images drive the parity check "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=_common.ONNX_MODEL,
                        help="ONNX file; the fp16 variant goes next to it as *.fp16.onnx "
                             "(default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc import checkpoint
    from instdisc.export import FP16_MIN_COSINE, Variant, export_gated, model_info, parity_images

    params, common = _common.load(args.params, NAME)
    start, out = time.perf_counter(), Path(args.out)
    encoder, meta = checkpoint.load_encoder(args.encoder)  # any dataset's test images will do
    info = model_info(encoder, meta, params.opset,
                      dataset_fingerprint=str(meta.get("fingerprint") or ""))
    images = parity_images(args.data, params.parity_batch, info.image_size, info.resize)
    variants = [Variant("fp32", out, False, params.parity_atol, params.parity_min_cosine, "cpu")]
    if params.fp16:  # checked on the GPU when there is one: that is where fp16 is served
        variants.append(Variant("fp16", out.with_suffix(".fp16.onnx"), True, params.fp16_atol,
                                FP16_MIN_COSINE, "cpu" if common.device == "cpu" else "auto"))
    metrics: dict[str, Any] = {"opset": params.opset, "feature_dim": info.feature_dim,
                               "image_size": list(info.image_size)}
    # The INT8 file lives in a folder of its own that always exists (a dvc.yaml out), empty when
    # export.int8 is off or the data has no labels to gate it with.
    made_int8_dir = not int8_dir(out).exists()
    int8_dir(out).mkdir(parents=True, exist_ok=True)
    int8 = int8_gate(params, Path(args.data), out, info, metrics) if params.int8 else None
    with tracking.run(NAME, {"export": params, "device": common.device}) as run_id:
        try:
            exported = export_gated(encoder, info, images, variants, params.dynamic_spatial,
                                    metrics, int8=int8)
        except StageError:
            tracking.log_metrics(_common.flatten(metrics))
            if made_int8_dir and not any(int8_dir(out).iterdir()):
                int8_dir(out).rmdir()  # a failed export leaves nothing behind
            raise
        metrics["dynamic_spatial"] = exported["fp32"].dynamic_spatial
        metrics["export_seconds"] = round(time.perf_counter() - start, 2)
        if params.fp16:
            tracking.log_artifact(variants[1].path, artifact_path="fp16")
        if "int8" in exported:
            tracking.log_artifact(int8.path, artifact_path="int8")
        if int8 is not None:
            tracking.set_tags({"export.int8": "shipped" if "int8" in exported else "rejected"})
        if params.register:
            metrics["registry"] = register(params, out, exported["fp32"], metrics, run_id,
                                           train_run_id=tracking.find_run(
                                               _common.ENCODER_TAG, file_sha256(args.encoder)),
                                           example=images[:2])
        _common.finish(NAME, metrics, args.metrics)
    parity = metrics["parity"]
    _common.log.info("exported %s: parity max |diff| %.2e, min cosine %.7f%s", out,
                     parity["max_abs_diff"], parity["min_cosine"],
                     f", registered as version {metrics['registry']['version']}"
                     if metrics.get("registry") else "")
    return metrics


def int8_dir(out: Path) -> Path:
    """models/encoder.onnx -> models/int8/ (the folder of the INT8 variant)."""
    return out.parent / "int8"


def int8_gate(params: Any, data: Path, out: Path, info: Any, metrics: dict[str, Any]):
    """The INT8 variant's calibration and kNN-gate images; None (with the reason in `metrics`)
    on an unlabelled dataset, where kNN top-1 is undefined."""
    from instdisc.data.prepared import PreparedDataset
    from instdisc.export import Int8Gate, split_pixels

    prepared = PreparedDataset.open(data)
    if not prepared.labeled or "test" not in prepared.meta["splits"]:
        if params.int8 == "require":
            raise StageError(f"export.int8 is 'require', but {data} has no labels or no test "
                             "split to gate the INT8 file on; set export.int8: true to skip it")
        metrics["int8_parity"] = {"skipped": "int8 is gated on kNN top-1, which needs labels "
                                             "and a test split; no int8 file written"}
        _common.log.warning("%s", metrics["int8_parity"]["skipped"])
        return None
    size, resize = info.image_size, info.resize
    calibration, _ = split_pixels(data, "train", params.int8_calibration_images, size, resize)
    bank, bank_labels = split_pixels(data, "train", params.int8_gate_images, size, resize)
    queries, query_labels = split_pixels(data, "test", params.int8_gate_images, size, resize)
    return Int8Gate(int8_dir(out) / f"{out.stem}.int8.onnx", calibration, bank, bank_labels, queries,
                    query_labels, len(prepared.classes), params.int8_max_knn_drop,
                    required=params.int8 == "require")


def register(params: Any, path: Path, info: Any, metrics: dict[str, Any], run_id: str | None,
             train_run_id: str | None, example: Any) -> dict[str, Any]:
    """Log the ONNX file as this run's model, register it, point the alias at the version.

    `example` (uint8 (2, H, W, 3) test images) and the model's output on it give the logged
    model its signature and input example; the parity numbers are linked to the logged model.
    """
    from instdisc.serving.embedder import Embedder

    info = dataclasses.replace(info, export_run_id=run_id or "", train_run_id=train_run_id or "")
    if len(example) == 1:  # a batch-1 example would fix the signature's batch to 1
        example = example.repeat(2, axis=0)                                    # (2, H, W, 3)
    output = Embedder(path, device="cpu").run(example)                         # (2, D)
    linked = {f"{key}.{k}": v for key in ("parity", "fp16_parity", "int8_parity")
              if key in metrics for k, v in metrics[key].items()}
    version = tracking.log_onnx_model(
        path, params.model_name, params.alias, metadata={"instdisc": info.as_dict()},
        version_tags={"opset": params.opset, "image_size": list(info.image_size),
                      "parity.max_abs_diff": metrics["parity"]["max_abs_diff"],
                      "train_run_id": train_run_id or "", "export_run_id": run_id or ""},
        input_example=example, output_example=output, metrics=linked)
    return {"model_name": params.model_name, "alias": params.alias, "version": version,
            "run_id": run_id}


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
