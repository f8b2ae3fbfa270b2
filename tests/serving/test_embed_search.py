import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image
from serving_helpers import FEATURE_DIM, write_images
from serving_helpers import tiny, embedder  # noqa: F401 (fixtures)

from instdisc.serving.index import build_index, open_source
from instdisc.serving.embedder import Embedder
from instdisc.serving.search import load_index, save_grid, search


@pytest.fixture
def folder(tmp_path):
    """9 images (one in a sub-folder), a corrupt .jpg, a README and a hidden file."""
    root = tmp_path / "images"
    write_images(root, 8)
    write_images(root / "sub", 1, seed=1)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "README.md").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def test_embed_folder_skips_the_corrupt_file_and_reports_it(embedder, folder, tmp_path):
    report = build_index(embedder, folder, tmp_path / "index", progress=False)
    assert report["num_items"] == 9 and report["ignored"] == 2
    assert [f["id"] for f in report["failed"]] == ["corrupt.jpg"]
    assert "cannot read image" in report["failed"][0]["reason"]
    index = load_index(tmp_path / "index")
    assert index.ids == [f"img_{i:03d}.png" for i in range(8)] + ["sub/img_000.png"]
    assert index.embeddings.shape == (9, FEATURE_DIM) and index.embeddings.dtype == np.float32
    expected = embedder.embed([folder / i for i in index.ids])
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-6)
    assert json.loads((tmp_path / "index" / "index.json").read_text())["model"]["info"][
        "feature_dim"] == FEATURE_DIM
    assert not (tmp_path / "index" / ".shards").exists()
    with pytest.raises(ValueError, match="already holds a finished index; pass --overwrite"):
        build_index(embedder, folder, tmp_path / "index", progress=False)
    assert build_index(embedder, folder, tmp_path / "index", overwrite=True,
                       progress=False)["num_items"] == 9


def test_an_interrupted_build_resumes_where_it_stopped(embedder, folder, tmp_path, monkeypatch):
    reference = build_index(embedder, folder, tmp_path / "ref", shard_size=4, progress=False)
    calls = []
    real_run = Embedder.run

    def flaky_run(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(self, batch)

    monkeypatch.setattr(Embedder, "run", flaky_run)
    with pytest.raises(KeyboardInterrupt):
        build_index(embedder, folder, tmp_path / "index", shard_size=4, progress=False)
    # batches of 4 in id order: [corrupt.jpg + 3 images], [4 images], then the interruption
    assert len(list((tmp_path / "index" / ".shards").glob("part-*.json"))) == 2
    assert not (tmp_path / "index" / "index.json").exists()
    calls.clear()
    report = build_index(embedder, folder, tmp_path / "index", shard_size=4, progress=False)
    assert sum(calls) == 9 - 7  # only the 2 images after the last shard are embedded again
    assert report["failed"] == reference["failed"]
    index, ref = load_index(tmp_path / "index"), load_index(tmp_path / "ref")
    assert index.ids == ref.ids
    np.testing.assert_allclose(index.embeddings, ref.embeddings, atol=1e-6)


def test_resuming_with_another_model_is_refused(embedder, folder, tmp_path, tiny):
    (tmp_path / "index" / ".shards").mkdir(parents=True)
    (tmp_path / "index" / ".shards" / "state.json").write_text('{"sha256": "other"}')
    with pytest.raises(ValueError, match="unfinished build with another model or source"):
        build_index(embedder, folder, tmp_path / "index", progress=False)


def test_archives_lists_and_files_match_the_folder(embedder, folder, tmp_path):
    paths = sorted(p for p in folder.rglob("*.png"))
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for p in paths:
            archive.write(p, p.relative_to(folder).as_posix())
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        for p in paths:
            archive.add(p, p.relative_to(folder).as_posix())
    (tmp_path / "list.txt").write_text("".join(f"images/{p.relative_to(folder)}\n" for p in paths))
    expected = embedder.embed(paths)
    for name, source in [("zip", tmp_path / "images.zip"), ("tar", tmp_path / "images.tar.gz"),
                         ("list", tmp_path / "list.txt"), ("files", paths)]:
        build_index(embedder, source, tmp_path / name, progress=False)
        index = load_index(tmp_path / name)
        np.testing.assert_allclose(index.embeddings, expected, atol=1e-6, err_msg=name)
    assert load_index(tmp_path / "zip").ids == [p.relative_to(folder).as_posix() for p in paths]
    with pytest.raises(ValueError, match="neither a folder"):
        open_source([folder / "README.md"])


def test_search_finds_an_image_itself_first_with_score_one(embedder, folder, tmp_path):
    build_index(embedder, folder, tmp_path / "index", progress=False)
    index = load_index(tmp_path / "index")
    index.check_model(embedder)
    query = embedder.embed([folder / "img_005.png"])
    scores, rows = search(index.embeddings, query, k=3, chunk_size=2)
    assert index.ids[rows[0, 0]] == "img_005.png"
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert scores.shape == rows.shape == (1, 3) and np.all(np.diff(scores[0]) <= 0)
    grid = tmp_path / "grid.png"
    hits = [(index.ids[r], float(s)) for r, s in zip(rows[0], scores[0])]
    save_grid(folder / "img_005.png", hits, index, grid)
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 4 * 128


def test_chunked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    index = rng.normal(size=(1000, 8)).astype(np.float32)                        # (N, D)
    index /= np.linalg.norm(index, axis=1, keepdims=True)
    queries = rng.normal(size=(5, 8)).astype(np.float32)                         # (Q, D)
    scores, rows = search(index, queries, k=7, chunk_size=33)
    brute = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ index.T  # (Q, N)
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :7], atol=1e-6)
    scores, rows = search(index[:3], queries, k=10)
    assert scores.shape == (5, 3)  # k larger than the index: every row, sorted


def test_search_refuses_an_index_from_another_model(embedder, folder, tmp_path):
    build_index(embedder, folder, tmp_path / "index", progress=False)
    index = load_index(tmp_path / "index")
    index.meta["model"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="embeddings of different models are not comparable"):
        index.check_model(embedder)
