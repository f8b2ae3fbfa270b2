"""The HTTP service, started for real (uvicorn on 127.0.0.1) and called with httpx."""

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_helpers import FEATURE_DIM, IMAGE_SIZE, running_server, write_images
from serving_helpers import tiny, embedder  # noqa: F401 (fixtures)

from instdisc.io import file_sha256
from instdisc.serving.app import Limits, MicroBatcher, create_app
from instdisc.serving.index import build_index
from instdisc.serving.search import load_index

LIMITS = Limits(max_body_bytes=200_000, max_pixels=1_000_000, max_images=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    paths = write_images(folder, 6)
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(folder / "wide.jpg")  # resized
    return paths + [folder / "wide.jpg"]


@pytest.fixture(scope="module")
def server(embedder, images, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("index") / "index"
    build_index(embedder, images[0].parent, index_dir, progress=False)
    app = create_app(embedder, index=load_index(index_dir), model_version="7", limits=LIMITS,
                     max_wait_ms=20)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def _multipart(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_embed_equals_the_embedder_for_raw_and_multipart_bodies(server, embedder, images, tiny):
    expected = embedder.embed(images)                                          # (7, D)
    raw = server.post("/embed", content=images[6].read_bytes(),
                      headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["model"] == {"sha256": file_sha256(tiny.onnx_path), "version": "7",
                             "file": tiny.onnx_path.name}
    assert body["count"] == 1 and body["dim"] == FEATURE_DIM
    np.testing.assert_allclose(body["embeddings"], expected[6:], atol=1e-6)
    many = server.post("/embed", files=_multipart(images)).json()
    got = np.asarray(many["embeddings"], np.float32)                           # (7, D)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def _png(size, mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = [
    # (what, request kwargs, status, words in the error)
    ("not an image", dict(content=b"hello, not pixels", headers={"content-type": "image/png"}),
     400, "not an image"),
    ("truncated", "truncated", 400, "truncated"),
    ("decompression bomb", dict(content=_png((2000, 2000)),
                                headers={"content-type": "image/png"}), 413, "2000x2000"),
    ("1xN strip", dict(content=_png((1, 100_000)), headers={"content-type": "image/png"}), 413,
     "aspect ratio over the limit of 20:1"),
    ("too large (Content-Length)", dict(content=b"\0" * 300_000,
                                        headers={"content-type": "image/png"}), 413, "too large"),
    ("too large (chunked)", "chunked", 413, "too large"),
    ("wrong content type", dict(content=b"{}", headers={"content-type": "application/json"}),
     415, "Content-Type"),
    ("no content type", dict(content=b"abc"), 415, "Content-Type"),
    ("empty body", dict(content=b"", headers={"content-type": "image/png"}), 400, "empty body"),
    ("empty batch", dict(content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
                                 b'no files\r\n--b--\r\n',
                         headers={"content-type": "multipart/form-data; boundary=b"}),
     400, "empty batch"),
    ("too many files", "many", 400, "Too many files"),
]


@pytest.mark.parametrize("what, kwargs, status, words", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_naming_the_problem_and_the_service_keeps_serving(
        server, images, what, kwargs, status, words):
    if kwargs == "truncated":
        data = images[0].read_bytes()
        kwargs = dict(content=data[:len(data) // 2], headers={"content-type": "image/png"})
    elif kwargs == "chunked":
        kwargs = dict(content=(b"\0" * 50_000 for _ in range(6)),
                      headers={"content-type": "image/png"})
    elif kwargs == "many":
        kwargs = dict(files=_multipart(images[:1] * 9))
    response = server.post("/embed", **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert server.get("/health").json() == {"status": "ok"}
    again = server.post("/embed", content=images[1].read_bytes(),
                        headers={"content-type": "image/png"})
    assert again.status_code == 200 and again.json()["count"] == 1


def test_search_finds_the_image_itself_first(server, images):
    response = server.post("/search", params={"k": 3}, files=_multipart(images[3:4]))
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 3 and hits[0]["id"] == "img_003.png"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    bad = server.post("/search", params={"k": 0}, content=images[0].read_bytes(),
                      headers={"content-type": "image/png"})
    assert bad.status_code == 422 and "k" in bad.json()["error"]
    two = server.post("/search", files=_multipart(images[:2]))
    assert two.status_code == 400 and "one image" in two.json()["error"]


def test_ready_and_metadata_describe_the_loaded_model(server, tiny):
    ready = server.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "model_loaded": True,
                            "provider": "CPUExecutionProvider",
                            "requested_provider": "CPUExecutionProvider",
                            "provider_active": True, "batcher_running": True}
    meta = server.get("/metadata").json()
    assert meta["model"]["sha256"] == file_sha256(tiny.onnx_path)
    assert meta["image_size"] == [IMAGE_SIZE, IMAGE_SIZE] and meta["feature_dim"] == FEATURE_DIM
    assert meta["provider"] == "CPUExecutionProvider" and meta["index"]["num_items"] == 7
    assert meta["limits"]["max_pixels"] == 1_000_000


def test_concurrent_requests_share_session_runs(server, embedder, images):
    before = server.get("/metadata").json()["batching"]
    payload = images[2].read_bytes()

    def call(_):
        return server.post("/embed", content=payload, headers={"content-type": "image/png"})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(24)))
    assert all(r.status_code == 200 for r in responses)
    expected = embedder.embed([images[2]])
    for r in responses:
        np.testing.assert_allclose(r.json()["embeddings"], expected, atol=1e-6)
    after = server.get("/metadata").json()["batching"]
    assert after["images"] - before["images"] == 24
    assert after["batches"] - before["batches"] < 24  # some requests ran together


def test_search_without_an_index_is_a_404(embedder, images):
    with running_server(create_app(embedder)) as url:
        response = httpx.post(f"{url}/search", content=images[0].read_bytes(),
                              headers={"content-type": "image/png"})
    assert response.status_code == 404 and "--index" in response.json()["error"]


def test_micro_batcher_groups_up_to_max_batch_and_forwards_errors():
    runs = []

    def run(batch):
        runs.append(len(batch))
        if batch.max() == 9:
            raise ValueError("bad batch")
        return batch.reshape(len(batch), -1)[:, :1].astype(np.float32)        # (B, 1)

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.2)
    futures = [batcher.submit(np.full((n, 1, 1, 3), i, np.uint8)) for i, n in enumerate([1, 2, 3])]
    batcher.start()
    assert [f.result(5)[:, 0].tolist() for f in futures] == [[0], [1, 1], [2, 2, 2]]
    assert runs == [3, 3]  # 1 + 2 together; 3 would make 6 > max_batch: next group
    with pytest.raises(ValueError, match="bad batch"):
        batcher.submit(np.full((1, 1, 1, 3), 9, np.uint8)).result(5)
    assert batcher.submit(np.zeros((1, 1, 1, 3), np.uint8)).result(5).shape == (1, 1)
    batcher.stop()
    assert not batcher.running


def test_serving_imports_neither_torch_dvc_nor_prefect():
    code = ("import sys, instdisc.serving.app, instdisc.serving.search, instdisc.cli, "
            "instdisc.serving.server; instdisc.serving.server.protocol_class("
            "instdisc.serving.server.ServerLimits()); "
            "print(sorted(m for m in ('torch', 'dvc', 'prefect', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
