import json

import numpy as np
import pytest
from serving_helpers import write_images
from serving_helpers import tiny, embedder  # noqa: F401 (fixtures)

from instdisc import cli
from instdisc.serving.ann import ann_search, build_faiss, build_for_index, load_faiss, recall_at_k


def _clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))                                        # (C, D)
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))       # (N, D)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_recall_against_exact_search(kind):
    vectors = _clustered(3000)
    index = build_faiss(vectors, kind)
    report = recall_at_k(index, vectors, k=10, num_queries=200)
    assert report["recall@10"] >= 0.9 and report["num_queries"] == 200
    scores, rows = ann_search(index, vectors[7], k=5)
    assert rows[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="ANN kind 'lsh'"):
        build_faiss(vectors, "lsh")


def test_hnsw_returns_k_neighbours_even_when_k_exceeds_its_ef_search():
    vectors = _clustered(3000)
    index = build_faiss(vectors, "hnsw", ef_search=16)
    scores, rows = ann_search(index, vectors[:3], k=500)                        # (3, 500)
    assert rows.shape == (3, 500) and (rows >= 0).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert index.hnsw.efSearch == 16  # the per-call parameter does not change the index


def test_index_folder_ann_is_refused_when_embeddings_change(tmp_path):
    np.save(tmp_path / "embeddings.npy", _clustered(500))
    report = build_for_index(tmp_path, "hnsw", num_queries=50)
    assert json.loads((tmp_path / "faiss.json").read_text())["recall@10"] == report["recall@10"]
    assert load_faiss(tmp_path).ntotal == 500
    np.save(tmp_path / "embeddings.npy", _clustered(500, seed=1))
    with pytest.raises(ValueError, match="built from other embeddings"):
        load_faiss(tmp_path)


def test_embed_and_search_with_ann_from_the_command_line(tiny, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_images(folder, 12)
    model = ["--model", str(tiny.onnx_path), "--device", "cpu"]
    assert cli.main(["embed", str(folder), "-o", str(tmp_path / "index"), "--ann", "hnsw",
                     *model]) == 0
    assert json.loads((tmp_path / "index" / "faiss.json").read_text())["kind"] == "hnsw"
    capsys.readouterr()
    assert cli.main(["search", str(folder / "img_004.png"), "--index", str(tmp_path / "index"),
                     "-k", "3", "--ann", *model]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["1", "1.0000", "img_004.png"]


def test_served_search_uses_the_ann_index_unless_asked_for_exact(tiny, embedder, tmp_path):
    import httpx

    from instdisc.serving.app import create_app
    from instdisc.serving.search import load_index
    from serving_helpers import running_server

    folder = tmp_path / "photos"
    paths = write_images(folder, 12)
    assert cli.main(["embed", str(folder), "-o", str(tmp_path / "index"), "--ann", "ivf",
                     "--model", str(tiny.onnx_path), "--device", "cpu"]) == 0
    index, ann = load_index(tmp_path / "index"), load_faiss(tmp_path / "index")
    with pytest.raises(ValueError, match="needs the index it was built from"):
        create_app(embedder, ann=ann, ann_kind="ivf")
    app = create_app(embedder, index=index, ann=ann, ann_kind="ivf")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = paths[5].read_bytes()
        headers = {"content-type": "image/png"}
        approx = client.post("/search", params={"k": 3}, content=body, headers=headers).json()
        exact = client.post("/search", params={"k": 3, "exact": "true"}, content=body,
                            headers=headers).json()
        assert approx["search"] == "ivf" and exact["search"] == "exact"
        assert approx["hits"][0]["id"] == exact["hits"][0]["id"] == "img_005.png"
        assert approx["hits"][0]["score"] == pytest.approx(exact["hits"][0]["score"], abs=1e-5)
        assert client.get("/metadata").json()["index"]["search"] == "ivf"

    # An IVF search probing 1 of 6 lists finds fewer than all 12: the answer is exact, and says so
    few = build_faiss(index.embeddings, "ivf", nlist=6, nprobe=1)
    assert (ann_search(few, index.embeddings[5], k=12)[1] < 0).any()
    app = create_app(embedder, index=index, ann=few, ann_kind="ivf")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = client.post("/search", params={"k": 12}, content=paths[5].read_bytes(),
                           headers={"content-type": "image/png"}).json()
        assert len(body["hits"]) == 12 and body["search"].startswith("exact (ivf found ")
        assert body["hits"][0]["id"] == "img_005.png"


def test_serve_ann_without_an_index_is_refused(tiny):
    code = cli.main(["serve", "--model", str(tiny.onnx_path), "--device", "cpu", "--ann"])
    assert code == 2
