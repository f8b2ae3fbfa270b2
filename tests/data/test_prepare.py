import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_trees import clean_tree, encode, messy_tree, rgb, write_folder, write_tar, write_zip

from instdisc.config import PrepareParams, SyntheticParams
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset


def run(tmp_path: Path, source, out="prepared", **params):
    return prepare(PrepareParams(source=str(source), **params), seed=0, out_dir=tmp_path / out,
                   progress=False)


def test_messy_folder_reports_skips_conversions_and_ignored_entries(tmp_path):
    report = run(tmp_path, write_folder(tmp_path / "src", messy_tree()))
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"train/cat/bad.jpg", "train/cat/README.txt"}
    assert "truncated" in skipped["train/cat/bad.jpg"].lower()
    assert skipped["train/cat/README.txt"] == "not an image (Pillow cannot identify the file)"
    assert report["converted"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    assert report["ignored_splits"] == ["val"] and report["ignored_files"] == ["README.md"]
    assert report["counts"] == {"train": {"cat": 3, "dog": 6}, "test": {"cat": 3, "dog": 2}}
    assert report["classes"] == ["cat", "dog"]
    assert report["splits"]["train"] == {"num_items": 9, "storage": "array", "image_size": [8, 8]}
    data = PreparedDataset.open(tmp_path / "prepared")
    assert data.classes == ["cat", "dog"] and data.fingerprint == report["fingerprint"]
    train = data.split("train")
    assert (train.storage, train.num_items, train.image_size) == ("array", 9, (8, 8))
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    # Index order is (class, file name): dog = 000, 001, 002, gray, palette, rgba.
    expected = np.asarray(rgb(8, 9).convert("RGBA").convert("RGB"))
    np.testing.assert_array_equal(train.images[8].numpy(), expected)
    assert json.loads((tmp_path / "prepared" / "report.json").read_text()) == report


def test_on_error_fail_names_the_file_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"unreadable image 'train/cat/README.txt'.*not an image"):
        run(tmp_path, write_folder(tmp_path / "src", messy_tree()), on_error="fail")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_folder_zip_and_tar_give_the_same_fingerprint(tmp_path):
    files = messy_tree()
    prints = {run(tmp_path, src, out=src.name)["fingerprint"] for src in [
        write_folder(tmp_path / "tree", files), write_zip(tmp_path / "tree.zip", files),
        write_tar(tmp_path / "tree.tar.gz", files, prefix="wrapper/")]}
    assert len(prints) == 1
    files["train/dog/000.png"] = encode(rgb(8, 99), "PNG")
    assert run(tmp_path, write_zip(tmp_path / "changed.zip", files))["fingerprint"] not in prints


def test_large_images_become_a_manifest_read_by_paths(tmp_path):
    files = clean_tree(size=8)
    files["train/cat/big.png"] = encode(rgb(20, 5), "PNG")
    report = run(tmp_path, write_zip(tmp_path / "src.zip", files), max_in_memory_size=16)
    assert report["storage"] == "manifest"
    data = PreparedDataset.open(tmp_path / "prepared")
    train = data.split("train")
    assert train.storage == "manifest" and train.images is None and len(train.paths) == 7
    assert train.paths[3] == tmp_path / "prepared" / "files" / "train" / "cat" / "big.png"
    assert train.paths[3].read_bytes() == files["train/cat/big.png"]
    folder = run(tmp_path, write_folder(tmp_path / "src", files), out="p2", max_in_memory_size=16)
    assert folder["fingerprint"] == report["fingerprint"]
    copy = PreparedDataset.open(tmp_path / "p2").split("test").paths[0]
    assert copy == tmp_path / "p2" / "files" / "test" / "cat" / "000.png"  # a copy, inside
    assert copy.read_bytes() == files["test/cat/000.png"]


def test_a_folder_source_prepares_a_self_contained_set(tmp_path):
    """Nothing under data/prepared points outside it: the folder can go, the set still reads."""
    files = clean_tree(size=8)
    files["train/cat/big.png"] = encode(rgb(20, 5), "PNG")
    source = write_folder(tmp_path / "photos", files)
    run(tmp_path, source.absolute(), max_in_memory_size=16)
    texts = [p.read_text() for p in (tmp_path / "prepared").iterdir() if p.suffix in
             (".json", ".jsonl")]
    assert texts and not any(str(tmp_path) in text for text in texts)
    shutil.rmtree(source)
    data = PreparedDataset.open(tmp_path / "prepared")
    assert [p.read_bytes() for p in data.split("train").paths][3] == files["train/cat/big.png"]
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["source"] == "photos"


def test_mixed_sizes_resize_to_the_most_common_or_to_image_size(tmp_path):
    files = clean_tree(size=8)
    files["train/dog/odd.png"] = encode(rgb(12, 3), "PNG")
    src = write_folder(tmp_path / "src", files)
    report = run(tmp_path, src)
    assert report["resized"] == {"count": 1, "to": [8, 8], "why": "most common size"}
    assert PreparedDataset.open(tmp_path / "prepared").split("train").image_size == (8, 8)
    report = run(tmp_path, src, image_size=6)
    assert report["resized"] == {"count": 11, "to": [6, 6], "why": "image_size"}
    assert PreparedDataset.open(tmp_path / "prepared").split("test").images.shape == (4, 6, 6, 3)


def test_train_fraction_keeps_the_first_images_of_each_class(tmp_path):
    report = run(tmp_path, write_folder(tmp_path / "src", clean_tree(per_class=5)),
                 train_fraction=0.5)
    assert report["counts"]["train"] == {"cat": 3, "dog": 3}
    full = run(tmp_path, tmp_path / "src", out="full")
    part, whole = (PreparedDataset.open(tmp_path / d).split("train") for d in ("prepared", "full"))
    np.testing.assert_array_equal(part.images[:3].numpy(), whole.images[:3].numpy())
    np.testing.assert_array_equal(part.images[3:].numpy(), whole.images[5:8].numpy())
    assert full["fingerprint"] != report["fingerprint"]


def test_a_failing_prepare_leaves_the_old_output_untouched(tmp_path):
    good = run(tmp_path, write_folder(tmp_path / "good", clean_tree()))
    before = {p.name: p.read_bytes() for p in (tmp_path / "prepared").iterdir()}
    with pytest.raises(ValueError):
        run(tmp_path, write_folder(tmp_path / "bad", messy_tree()), on_error="fail")
    after = {p.name: p.read_bytes() for p in (tmp_path / "prepared").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "prepared"]
    assert PreparedDataset.open(tmp_path / "prepared").fingerprint == good["fingerprint"]


def test_layout_errors_name_what_is_wrong(tmp_path):
    files = clean_tree() | {"test/bird/000.png": encode(rgb(8, 1), "PNG")}
    with pytest.raises(ValueError, match=r"test classes \['bird'\] have no train folder"):
        run(tmp_path, write_folder(tmp_path / "a", files))
    only_train = {k: v for k, v in clean_tree().items() if k.startswith("train/")}
    with pytest.raises(ValueError, match="has no test split"):
        run(tmp_path, write_zip(tmp_path / "b.zip", only_train), holdout_fraction=0.0)
    with pytest.raises(ValueError, match=r"image source '.*nowhere' does not exist"):
        run(tmp_path, tmp_path / "nowhere")
    assert not list(tmp_path.glob(".prepared*"))


def test_synthetic_source_is_deterministic(tmp_path):
    params = dict(synthetic=SyntheticParams(num_classes=3, train_per_class=4, test_per_class=2,
                                            image_size=16))
    a = run(tmp_path, "synthetic", out="a", **params)
    b = run(tmp_path, "synthetic", out="b", **params)
    assert a["fingerprint"] == b["fingerprint"] and a["storage"] == "array"
    data = PreparedDataset.open(tmp_path / "a")
    assert data.meta["splits"]["train"] == {"num_items": 12, "storage": "array",
                                            "image_size": [16, 16]}
    big = run(tmp_path, "synthetic", out="c", max_in_memory_size=8, **params)
    assert big["storage"] == "manifest"
    assert len(PreparedDataset.open(tmp_path / "c").split("test").paths) == 6


def test_training_channel_statistics_are_stored_and_used_for_normalisation(tmp_path):
    import torch

    from instdisc.config import PretrainParams
    from instdisc.runtime import DistInfo
    from instdisc.train_data import TrainData

    params = PrepareParams(synthetic=SyntheticParams(num_classes=3, train_per_class=8,
                                                     test_per_class=2, image_size=16))
    prepare(params, seed=0, out_dir=tmp_path / "p", progress=False)
    prepared = PreparedDataset.open(tmp_path / "p")
    pixels = np.load(tmp_path / "p" / "train_images.npy").reshape(-1, 3) / 255.0
    mean, std = prepared.normalization
    assert mean == pytest.approx(pixels.mean(axis=0).tolist(), abs=1e-6)
    assert std == pytest.approx(pixels.std(axis=0).tolist(), abs=1e-6)
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["normalization"]["images"] == 24
    cpu = torch.device("cpu")
    data = TrainData(prepared, PretrainParams(), cpu, DistInfo())
    assert (data.mean, data.std) == (mean, std)
    assert data.augment.mean.flatten().tolist() == pytest.approx(mean)
    imagenet = TrainData(prepared, PretrainParams(normalization="imagenet"), cpu, DistInfo())
    assert imagenet.mean == (0.485, 0.456, 0.406)
