import json

import numpy as np
import pytest
import torch

from instdisc.data.prepared import PreparedDataset, SplitArrays, atomic_output_dir, write_prepared


def write(root, images=None, paths=None):
    labels = np.array([0, 1, 1], dtype=np.int64)
    splits = {"train": SplitArrays(labels, images=images, paths=paths),
              "test": SplitArrays(labels[:1], images=None if images is None else images[:1],
                                  paths=None if paths is None else paths[:1])}
    with atomic_output_dir(root) as tmp:
        if paths is not None:
            for p in paths:
                (tmp / p).parent.mkdir(parents=True, exist_ok=True)
                (tmp / p).write_bytes(p.encode())
        meta, report = write_prepared(tmp, source="test", classes=["a", "b"], splits=splits,
                                      report={"note": 1})
    assert report == {"note": 1, "classes": ["a", "b"], "splits": meta["splits"],
                      "fingerprint": meta["fingerprint"]}
    return meta


def test_array_round_trip(tmp_path):
    images = np.arange(3 * 2 * 4 * 3, dtype=np.uint8).reshape(3, 2, 4, 3)
    meta = write(tmp_path / "p", images=images)
    data = PreparedDataset.open(tmp_path / "p")
    assert data.meta == meta and data.report["note"] == 1
    train = data.split("train")
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0, 1, 1]
    assert train.images.dtype == torch.uint8 and train.image_size == (2, 4)
    np.testing.assert_array_equal(train.images.numpy(), images)
    on_cpu = train.images_on("cpu")                                       # (N, 3, H, W)
    assert on_cpu.shape == (3, 3, 2, 4) and on_cpu.is_contiguous()
    assert train.images_on("cpu") is on_cpu
    with pytest.raises(ValueError, match=r"split 'val' not in .*; it has \['test', 'train'\]"):
        data.split("val")


def test_manifest_round_trip_and_fingerprint_depends_on_file_bytes(tmp_path):
    meta = write(tmp_path / "p", paths=["files/x.png", "files/y.png", "files/z.png"])
    train = PreparedDataset.open(tmp_path / "p").split("train")
    assert train.paths == [tmp_path / "p" / "files" / n for n in ("x.png", "y.png", "z.png")]
    assert train.images is None and train.image_size is None
    assert write(tmp_path / "q", paths=["files/x.png", "files/y.png", "files/w.png"]
                 )["fingerprint"] != meta["fingerprint"]


def test_open_rejects_missing_files_and_other_versions(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json' not found"):
        PreparedDataset.open(tmp_path)
    write(tmp_path / "p", images=np.zeros((3, 2, 2, 3), np.uint8))
    (tmp_path / "p" / "test_images.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_images.npy' is missing"):
        PreparedDataset.open(tmp_path / "p")
    meta_path = tmp_path / "p" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 9}))
    with pytest.raises(ValueError, match="format_version = 9, this code reads 1"):
        PreparedDataset.open(tmp_path / "p")


def test_atomic_output_dir_replaces_or_keeps(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "1"
    with atomic_output_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
