import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from serving_helpers import FEATURE_DIM, IMAGE_SIZE, random_images, tiny_encoder_file
from serving_helpers import tiny  # noqa: F401 (fixtures)

from instdisc import checkpoint, cli, tracking
from instdisc.io import file_sha256
from instdisc.stages._common import ENCODER_TAG
from instdisc.config import PrepareParams, SyntheticParams
from instdisc.serving.embedder import Embedder, ModelInfo
from instdisc.export import check_parity, parity_images, reference_embeddings


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny synthetic prepared dataset (array storage, 16x16: smaller than the model input)."""
    from instdisc.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    syn = SyntheticParams(num_classes=2, train_per_class=2, test_per_class=5, image_size=16)
    prepare(PrepareParams(synthetic=syn), seed=0, out_dir=out, progress=False)
    return out


def test_export_is_one_checked_file_with_named_dynamic_io(tiny):
    assert sorted(p.name for p in tiny.onnx_path.parent.glob("encoder.onnx*")) == ["encoder.onnx"]
    model = onnx.load(str(tiny.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 20
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch", "height", "width", 3]
    assert out.name == "embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch", FEATURE_DIM]


def test_parity_with_pytorch_on_random_images(tiny):
    encoder, _ = checkpoint.load_encoder(tiny.encoder_path)
    result = check_parity(tiny.onnx_path, encoder, random_images(8), atol=1e-4, min_cosine=0.9999)
    assert result["passed"] and result["provider"] == "CPUExecutionProvider"
    assert result["max_abs_diff"] <= 1e-4 and result["min_cosine"] >= 0.9999


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_matches_torch(tiny, batch):
    encoder, _ = checkpoint.load_encoder(tiny.encoder_path)
    images = random_images(batch, seed=batch)
    got = Embedder(tiny.onnx_path, device="cpu").run(images)
    assert got.shape == (batch, FEATURE_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_embeddings(encoder, images), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_dynamic_height_and_width(tiny):
    session = ort.InferenceSession(str(tiny.onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": random_images(3, size=40)})[0]
    assert out.shape == (3, FEATURE_DIM)


def test_metadata_round_trip(tiny):
    props = {p.key: p.value for p in onnx.load(str(tiny.onnx_path)).metadata_props}
    info = ModelInfo.from_metadata(props)
    assert info == tiny.info
    assert info.image_size == (IMAGE_SIZE, IMAGE_SIZE) and info.feature_dim == FEATURE_DIM
    assert info.opset == 20 and info.train_run_id == "" and info.export_run_id == ""  # no run ids
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.dynamic_spatial
    assert info.encoder_config["width"] == 0.125
    assert Embedder(tiny.onnx_path, device="cpu").info == info  # as onnxruntime reads it


def test_parity_images_are_resized_to_the_model_input(prepared):
    images = parity_images(prepared, 4, (IMAGE_SIZE, IMAGE_SIZE))
    assert images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8


REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One SQLite store for the module: creating one costs ~6 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, prepared, mlflow_db):
    """A working directory laid out like the repo: models/encoder.pt, data/prepared, MLflow DB."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.delenv("INSTDISC_PARENT_RUN_ID", raising=False)
    tiny_encoder_file(tmp_path / "models" / "encoder.pt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(prepared)
    return tmp_path


def _write_params(stage_dir, **export):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["export"].update(export)
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))


def test_export_stage_writes_models_metrics_and_registers_an_alias(stage_dir, prepared):
    _write_params(stage_dir, fp16=True, parity_batch=4)
    with tracking.run("pretrain", {}) as train_run_id:  # the run that wrote the encoder file
        tracking.set_tags({ENCODER_TAG: file_sha256(stage_dir / "models" / "encoder.pt")})
    assert cli.main(["export"]) == 0  # the dvc.yaml command, with its default paths
    metrics = json.loads((stage_dir / "metrics" / "export.json").read_text())
    assert metrics["parity"]["passed"] and metrics["parity"]["num_images"] == 4
    assert metrics["parity"]["max_abs_diff"] <= 1e-4
    assert metrics["fp16_parity"]["passed"] and metrics["fp16_parity"]["max_abs_diff"] <= 1e-2
    assert (stage_dir / "models" / "encoder.fp16.onnx").is_file()
    assert sorted(p.name for p in (stage_dir / "models").iterdir()) == [
        "encoder.fp16.onnx", "encoder.onnx", "encoder.pt", "int8"]  # no sidecar, no leftovers
    assert [p.name for p in (stage_dir / "models" / "int8").iterdir()] == ["encoder.int8.onnx"]
    registry = metrics["registry"]
    assert (registry["model_name"], registry["alias"]) == ("instdisc-encoder", "candidate")
    fp16 = Embedder(stage_dir / "models" / "encoder.fp16.onnx", device="cpu")
    assert fp16.info.dtype == "float16" and fp16.run(random_images(2)).dtype == np.float32

    # production path: resolve the alias, download, embed; same numbers as the local file
    local = Embedder(stage_dir / "models" / "encoder.onnx", device="cpu")
    remote = Embedder(tracking.download_onnx_model("models:/instdisc-encoder@candidate",
                                                   stage_dir / "download"), device="cpu")
    assert remote.info.export_run_id == remote.info.train_run_id == ""  # the file: no run ids
    images = random_images(3)
    np.testing.assert_array_equal(remote.run(images), local.run(images))
    import mlflow  # the README's production snippet, verbatim

    local_dir = mlflow.artifacts.download_artifacts("models:/instdisc-encoder@candidate")
    np.testing.assert_array_equal(Embedder(f"{local_dir}/model.onnx", device="cpu").run(images),
                                  local.run(images))
    version = mlflow.MlflowClient().get_model_version_by_alias("instdisc-encoder", "candidate")
    assert str(version.version) == registry["version"] and version.tags["opset"] == "20"
    assert version.tags["export_run_id"] == registry["run_id"] == version.run_id
    assert version.tags["train_run_id"] == train_run_id  # found by the encoder file's sha256


def test_export_stage_fails_and_writes_nothing_when_parity_fails(stage_dir, tiny, monkeypatch,
                                                                 caplog):
    import instdisc.export as export

    _write_params(stage_dir, register=False, parity_batch=2)
    real_to_onnx, real_reference = export.to_onnx, export.reference_embeddings

    def cached_to_onnx(encoder, info, path, **kwargs):  # the export itself is tested above
        shutil.copy(tiny.onnx_path, path)
        return tiny.info

    monkeypatch.setattr(export, "to_onnx", cached_to_onnx)
    monkeypatch.setattr(export, "reference_embeddings", lambda e, x, *a: real_reference(e, x, *a) + 1e-3)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["export"]) == 2
    assert "fp32 ONNX parity failed on 2 images: max |diff| 1.0" in caplog.text
    assert sorted(p.name for p in (stage_dir / "models").iterdir()) == ["encoder.pt"]
    assert not (stage_dir / "metrics" / "export.json").exists()
    assert real_to_onnx is not cached_to_onnx


def test_static_spatial_fallback_when_dynamic_height_width_cannot_export(tiny, tmp_path,
                                                                       monkeypatch, caplog):
    import instdisc.export as export

    encoder, meta = checkpoint.load_encoder(tiny.encoder_path)
    calls = []

    def fake_export(model, example, opset, spatial):  # stands in for torch.onnx.export
        calls.append(spatial)
        if spatial:
            raise RuntimeError("Constraints violated (height)! ...")
        proto = onnx.load(str(tiny.onnx_path))
        del proto.metadata_props[:]
        return proto

    monkeypatch.setattr(export, "_export_program", fake_export)
    info = export.to_onnx(encoder, export.model_info(encoder, meta, 20), tmp_path / "m.onnx")
    assert calls == [True, False] and not info.dynamic_spatial
    assert "dynamic height/width export failed (Constraints violated (height)!" in caplog.text
    assert Embedder(tmp_path / "m.onnx", device="cpu").info.dynamic_spatial is False


def _register_tiny(stage_dir) -> dict:
    _write_params(stage_dir, parity_batch=4)
    assert cli.main(["export"]) == 0
    return json.loads((stage_dir / "metrics" / "export.json").read_text())


def test_registered_model_has_a_signature_an_example_and_linked_metrics(stage_dir):
    registry = _register_tiny(stage_dir)["registry"]
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias("instdisc-encoder", "candidate")
    assert str(version.version) == registry["version"]
    model = mlflow.models.get_model_info("models:/instdisc-encoder@candidate")
    inputs = model.signature.inputs.to_dict()[0]
    assert inputs["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 32, 32, 3)}
    outputs = model.signature.outputs.to_dict()[0]
    assert outputs["tensor-spec"] == {"dtype": "float32", "shape": (-1, FEATURE_DIM)}
    assert model.saved_input_example_info is not None
    logged = mlflow.get_logged_model(model.model_id)
    assert {m.key for m in logged.metrics} >= {"parity.max_abs_diff", "parity.min_cosine"}
    pyfunc = mlflow.pyfunc.load_model("models:/instdisc-encoder@candidate")
    images = random_images(3)
    out = pyfunc.predict(images)
    got = next(iter(out.values())) if isinstance(out, dict) else np.asarray(out)
    np.testing.assert_allclose(got, Embedder(stage_dir / "models" / "encoder.onnx",
                                             device="cpu").run(images), atol=1e-6)


@pytest.mark.slow
def test_mlflow_models_serve_answers_array_input(stage_dir, mlflow_db):
    """`mlflow models serve -m models:/instdisc-encoder@candidate` on loopback, array in."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    _register_tiny(stage_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log_file = open(stage_dir / "serve.log", "w")  # a pipe could fill up and block it
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/instdisc-encoder@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=subprocess.DEVNULL, stderr=log_file, text=True,  # it execs `uvicorn`:
        env={**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (stage_dir / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        images = random_images(2)
        response = httpx.post(f"http://127.0.0.1:{port}/invocations",
                              json={"inputs": images.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        got = np.asarray(next(iter(predictions.values())) if isinstance(predictions, dict)
                         else predictions, np.float32)
        expected = Embedder(stage_dir / "models" / "encoder.onnx", device="cpu").run(images)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        server.terminate()
        server.wait(30)
        log_file.close()


def test_export_stage_writes_a_knn_gated_int8_variant(stage_dir):
    metrics = _register_tiny(stage_dir)
    gate = metrics["int8_parity"]
    assert gate["passed"] and gate["knn_drop"] <= 1.0 and gate["num_queries"] == 10
    assert gate["mean_cosine"] > 0.9
    int8 = Embedder(stage_dir / "models" / "int8" / "encoder.int8.onnx", device="cpu")
    fp32 = Embedder(stage_dir / "models" / "encoder.onnx", device="cpu")
    assert int8.info.dtype == "int8" and int8.info.image_size == fp32.info.image_size
    ops = {node.op_type for node in onnx.load(str(int8.model_path)).graph.node}
    assert "QuantizeLinear" in ops or "QLinearConv" in ops
    images = random_images(4)
    out = int8.run(images)                                                     # (4, D)
    assert out.dtype == np.float32 and out.shape == (4, FEATURE_DIM)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def _int8_loses_knn_accuracy(monkeypatch):
    """The second kNN evaluation of the gate (int8's) scores 5 points below the first (fp32's)."""
    import instdisc.evaluate.knn as knn

    real = knn.knn_accuracy
    calls = []

    def worse_second_time(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return {**result, "top1": calls[0]["top1"] - 5.0} if len(calls) == 2 else result

    monkeypatch.setattr(knn, "knn_accuracy", worse_second_time)


def test_a_rejected_int8_is_left_out_and_fp32_still_exports(stage_dir, monkeypatch, caplog):
    stale = stage_dir / "models" / "int8" / "encoder.int8.onnx"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an int8 file of an earlier model")
    _int8_loses_knn_accuracy(monkeypatch)
    _write_params(stage_dir, parity_batch=4, register=False)
    assert cli.main(["export"]) == 0
    gate = json.loads((stage_dir / "metrics" / "export.json").read_text())["int8_parity"]
    assert not gate["passed"] and gate["knn_drop"] == pytest.approx(5.0)
    assert "no int8 file written" in gate["rejected"] and "int8_max_knn_drop" in gate["rejected"]
    assert "int8 kNN gate failed" in caplog.text
    assert not stale.exists() and stale.parent.is_dir()  # the dvc out folder stays, empty
    assert not list(stale.parent.glob(".*staged"))
    assert Embedder(stage_dir / "models" / "encoder.onnx", device="cpu").info.dtype == "float32"
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`instdisc.stage` = 'export'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].data.tags["export.int8"] == "rejected"


def test_export_stage_fails_when_a_required_int8_loses_knn_accuracy(stage_dir, monkeypatch,
                                                                    caplog):
    _int8_loses_knn_accuracy(monkeypatch)
    _write_params(stage_dir, parity_batch=4, register=False, int8="require")
    assert cli.main(["export"]) == 2
    assert "int8 kNN gate failed" in caplog.text and "int8_max_knn_drop" in caplog.text
    assert not (stage_dir / "models" / "int8" / "encoder.int8.onnx").exists()
    assert not (stage_dir / "models" / "encoder.onnx").exists()  # nothing moved into place


@pytest.mark.parametrize("ann", ["none", "hnsw"])
def test_index_stage_embeds_the_train_split_for_serve_search(stage_dir, prepared, ann):
    import httpx
    from PIL import Image
    from serving_helpers import running_server

    from instdisc.data.prepared import PreparedDataset
    from instdisc.export import rows_pixels
    from instdisc.serving.app import create_app
    from instdisc.serving.search import load_index

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["export"].update(parity_batch=4, register=False, int8=False)
    params["index"].update(ann=ann, batch_size=3)                 # several blocks of 3
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["export"]) == 0
    assert cli.main(["index"]) == 0
    index = load_index(stage_dir / "models" / "index")
    split = PreparedDataset.open(prepared).split("train")
    classes = PreparedDataset.open(prepared).classes
    assert index.ids == [f"train/{classes[label]}/{row:06d}"
                         for row, label in enumerate(split.labels.tolist())]
    metrics = json.loads((stage_dir / "metrics" / "index.json").read_text())
    assert metrics["num_items"] == split.num_items == len(index.ids)
    embedder = Embedder(stage_dir / "models" / "encoder.onnx", device="cpu")
    pixels = rows_pixels(split, np.arange(split.num_items), embedder.info.image_size)
    np.testing.assert_allclose(index.embeddings, embedder.embed(pixels), atol=1e-6)
    assert (ann == "hnsw") == (stage_dir / "models" / "index" / "faiss.index").is_file()
    # what `serve --index models/index` answers: an uploaded training image finds its own row
    raw = split.images.numpy()[2]                                               # (h, w, 3)
    buffer = io.BytesIO()
    Image.fromarray(raw).save(buffer, format="PNG")
    with running_server(create_app(embedder, index=index)) as url:
        hits = httpx.post(f"{url}/search", params={"k": 2}, content=buffer.getvalue(),
                          headers={"content-type": "image/png"}).json()["hits"]
    assert hits[0]["id"] == index.ids[2] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
