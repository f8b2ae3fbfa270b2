"""Real collections: ImageNet-style val/ splits, explicit split folders, unlabelled trees,
held-out evaluation splits and duplicate files."""

import json
from pathlib import Path

import numpy as np
import pytest
from image_trees import (clean_tree, encode, imagenet_tree, rgb, write_folder, write_tar,
                         write_zip)

from instdisc.config import PrepareParams, SplitFolders, load_section
from instdisc.data.prepare import UNLABELED_COUNT, prepare
from instdisc.data.prepared import UNLABELED, PreparedDataset
from instdisc.data.sources import ImageSource


def run(tmp_path: Path, source, out="prepared", **params):
    return prepare(PrepareParams(source=str(source), **params), seed=0, out_dir=tmp_path / out,
                   progress=False)


def test_imagenet_style_zip_takes_val_as_the_test_split(tmp_path):
    report = run(tmp_path, write_zip(tmp_path / "imagenet.zip", imagenet_tree(),
                                     prefix="ILSVRC/"))
    assert report["split_folders"] == {"train": "train", "test": "val"}
    assert report["labeled"] is True and report["holdout"] is None
    assert report["classes"] == ["n01440764", "n01443537"]
    assert report["counts"] == {"train": {"n01440764": 4, "n01443537": 4},
                                "test": {"n01440764": 2, "n01443537": 2}}
    assert report["converted"] == {"L": 4} and report["skipped"] == []
    assert report["ignored_files"] == ["ILSVRC/classes.tsv"]
    data = PreparedDataset.open(tmp_path / "prepared")
    assert data.labeled and data.split("test").labels.tolist() == [0, 0, 1, 1]


def test_validation_folder_and_explicit_split_mapping(tmp_path):
    files = {k.replace("test/", "validation/", 1): v for k, v in clean_tree().items()}
    assert run(tmp_path, write_folder(tmp_path / "a", files))["split_folders"] == \
        {"train": "train", "test": "validation"}
    files = {k.replace("train/", "seen/", 1): v for k, v in clean_tree().items()}
    files |= {k.replace("test/", "val/", 1): v for k, v in clean_tree().items()
              if k.startswith("test/")}
    report = run(tmp_path, write_tar(tmp_path / "b.tar", files), out="b",
                 splits=SplitFolders(train="seen", test="test"))
    assert report["split_folders"] == {"train": "seen", "test": "test"}
    assert report["ignored_splits"] == ["val"]
    with pytest.raises(ValueError, match=r"has no heldout split: found \['seen', 'test', 'val'\]"):
        run(tmp_path, tmp_path / "b.tar", out="c", splits=SplitFolders("seen", "heldout"))


def test_split_mapping_in_params_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  source: x\n  splits: {train: train, test: val}\n")
    assert load_section(path, "prepare").splits == SplitFolders(train="train", test="val")
    path.write_text("prepare:\n  source: x\n  splits: {train: a, eval: b}\n")
    with pytest.raises(ValueError, match="eval"):
        load_section(path, "prepare")


def unlabeled_tree() -> dict[str, bytes]:
    """Photos in arbitrary nesting, no split or class folders, one duplicate, one bad file."""
    files = {f"2019/trip/{i:02d}.png": encode(rgb(8, i), "PNG") for i in range(6)}
    files |= {f"2020/{i:02d}.jpg": encode(rgb(8, 50 + i), "JPEG") for i in range(3)}
    files["top.png"] = encode(rgb(8, 90), "PNG")
    files["2020/copy_of_00.png"] = files["2019/trip/00.png"]
    files["2020/notes.txt"] = b"not an image"
    return files


@pytest.mark.parametrize("writer", [write_folder, write_zip])
def test_unlabeled_tree_gets_a_seeded_holdout_and_reports_duplicates(tmp_path, writer):
    src = tmp_path / ("photos" if writer is write_folder else "photos.zip")
    report = run(tmp_path, writer(src, unlabeled_tree()), holdout_fraction=0.25)
    assert report["labeled"] is False and report["classes"] == []
    assert report["split_folders"] == {"train": ".", "test": "held out of train"}
    assert report["holdout"] == {"fraction": 0.25, "seed": 0}
    assert report["counts"] == {"train": {UNLABELED_COUNT: 8}, "test": {UNLABELED_COUNT: 3}}
    assert report["duplicates"] == [["2019/trip/00.png", "2020/copy_of_00.png"]]
    assert report["skipped"] == [{"file": "2020/notes.txt",
                                  "reason": "not an image (Pillow cannot identify the file)"}]
    data = PreparedDataset.open(tmp_path / "prepared")
    assert not data.labeled and data.classes == []
    assert set(data.split("train").labels.tolist()) == {UNLABELED}
    again = run(tmp_path, src, out="again", holdout_fraction=0.25)
    assert again["fingerprint"] == report["fingerprint"]
    other = prepare(PrepareParams(source=str(src), holdout_fraction=0.25), seed=1,
                    out_dir=tmp_path / "other", progress=False)
    assert other["fingerprint"] != report["fingerprint"]


def test_labels_none_ignores_class_folders_and_one_split_is_enough(tmp_path):
    files = {k: v for k, v in clean_tree(per_class=4).items() if k.startswith("train/")}
    report = run(tmp_path, write_folder(tmp_path / "src", files), labels="none",
                 holdout_fraction=0.25)
    assert report["labeled"] is False
    assert report["counts"] == {"train": {UNLABELED_COUNT: 6}, "test": {UNLABELED_COUNT: 2}}
    labelled = run(tmp_path, tmp_path / "src", out="labelled", holdout_fraction=0.25)
    assert labelled["counts"] == {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}}
    with pytest.raises(ValueError, match="has no test split.*holdout_fraction"):
        run(tmp_path, tmp_path / "src", out="none", holdout_fraction=0.0)


def test_flat_split_folders_are_unlabeled_and_folders_mode_reads_classes(tmp_path):
    files = {f"train/{i}.png": encode(rgb(8, i), "PNG") for i in range(4)}
    files |= {f"val/{i}.png": encode(rgb(8, 10 + i), "PNG") for i in range(2)}
    report = run(tmp_path, write_folder(tmp_path / "flat", files))
    assert report["labeled"] is False and report["split_folders"] == {"train": "train",
                                                                       "test": "val"}
    classes = {f"{c}/{i}.png": encode(rgb(8, 5 * j + i), "PNG")
               for j, c in enumerate(("cat", "dog")) for i in range(3)}
    with ImageSource(write_folder(tmp_path / "byclass", classes), labels="folders") as source:
        assert source.labeled and not source.has_splits and source.classes("") == ["cat", "dog"]
    report = run(tmp_path, tmp_path / "byclass", out="p2", labels="folders",
                 holdout_fraction=0.3)
    assert report["counts"]["test"] == {"cat": 1, "dog": 1}
    assert json.loads((tmp_path / "p2" / "report.json").read_text())["labeled"] is True


def test_duplicates_across_splits_are_reported_not_dropped(tmp_path):
    files = clean_tree()
    files["test/dog/leak.png"] = files["train/cat/000.png"]
    report = run(tmp_path, write_folder(tmp_path / "src", files))
    assert report["duplicates"] == [["test/dog/leak.png", "train/cat/000.png"]]
    assert report["counts"]["test"]["dog"] == 3
    images = PreparedDataset.open(tmp_path / "prepared").split("test").images.numpy()
    np.testing.assert_array_equal(images[-1], np.asarray(rgb(8, 5)))


def labelled_train_flat_val() -> dict[str, bytes]:
    """train/<class>/ next to ImageNet's val/ as distributed: images directly in val/."""
    files = {k: v for k, v in clean_tree().items() if k.startswith("train/")}
    return files | {f"val/ILSVRC2012_val_{i:08d}.JPEG": encode(rgb(8, 60 + i), "JPEG")
                    for i in range(3)}


def test_flat_val_next_to_labelled_train_is_an_error_that_says_how_to_fix_it(tmp_path):
    src = write_zip(tmp_path / "imagenet.zip", labelled_train_flat_val(), prefix="ILSVRC/")
    with ImageSource(src, labels="auto") as source:
        assert source.labeled and source.splits == ["train"] and source.flat_splits == {"val": 3}
    fix = (r"the test folder val/ has 3 images directly in it and no class folders, but train/ "
           r"has class folders\. Sort them into val/<class>/ .* prepare\.splits .* "
           r"prepare\.labels: none .* move val/ out of the source")
    for params in ({}, {"holdout_fraction": 0.0}, {"splits": SplitFolders("train", "val")}):
        with pytest.raises(ValueError, match=fix):  # not a silent holdout, nor "no val split"
            run(tmp_path, src, **params)
    assert not (tmp_path / "prepared").exists()
    report = run(tmp_path, src, labels="none")  # the way out that keeps val/ as the test split
    assert report["labeled"] is False and report["split_folders"] == {"train": "train",
                                                                       "test": "val"}
    assert report["counts"] == {"train": {UNLABELED_COUNT: 6}, "test": {UNLABELED_COUNT: 3}}


def test_flat_folder_that_is_not_read_or_has_classes_is_no_error(tmp_path):
    files = clean_tree() | {f"val/{i}.png": encode(rgb(8, 70 + i), "PNG") for i in range(2)}
    report = run(tmp_path, write_folder(tmp_path / "a", files))  # test/ comes before val/
    assert report["split_folders"] == {"train": "train", "test": "test"}
    assert report["ignored_files"] == ["val/0.png", "val/1.png"]
    files = clean_tree() | {"test/labels.txt": b"cat\ndog\n", "test/extra.png": files["val/0.png"]}
    with ImageSource(write_folder(tmp_path / "b", files), labels="auto") as source:
        assert source.flat_splits == {}  # test/ has class folders: loose files are just ignored
    files = {k: v for k, v in clean_tree().items() if k.startswith("train/")}
    with ImageSource(write_folder(tmp_path / "c", files | {"val/README.txt": b"x"})) as source:
        assert source.flat_splits == {}  # no image directly in val/
    assert run(tmp_path, tmp_path / "c", out="c")["split_folders"]["test"] == "held out of train"
    flat_train = {f"train/{i}.png": encode(rgb(8, i), "PNG") for i in range(3)}
    flat_train |= {k: v for k, v in clean_tree().items() if k.startswith("test/")}
    with pytest.raises(ValueError, match=r"the train folder train/ has 3 images directly in it"):
        run(tmp_path, write_folder(tmp_path / "d", flat_train), out="d")
