"""VOC-format reading, the synthetic VOC generator and materialising folders / zips."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from instdisc.transfer import voc
from instdisc.transfer.synthetic_voc import SYNTHETIC_CLASSES, write_synthetic_voc

XML = """<annotation>
  <folder>images</folder>
  <filename>cat-1.jpg</filename>
  <path>/Users/someone/Desktop/raccoon/images/cat-1.jpg</path>
  <size><width>40</width><height>20</height><depth>3</depth></size>
  <object><name> cat </name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
  <object><name>dog</name><difficult>1</difficult>
    <bndbox><xmin>11.0</xmin><ymin>5</ymin><xmax>40</xmax><ymax>15</ymax></bndbox></object>
</annotation>
"""


def write_voc(root: Path, xml: str = XML, mode: str = "RGB") -> Path:
    """A one-image VOC folder (image cat-1, 40x20) with train/test splits and labels.txt."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "cat-1.xml").write_text(xml)
    Image.new(mode, (40, 20), 128).save(root / "JPEGImages" / "cat-1.jpg")
    for split in ("train", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("cat-1\n")
    (root / "labels.txt").write_text("cat\ndog\n")
    return root


def test_parse_annotation_reads_boxes_names_and_difficult(tmp_path):
    ann = voc.parse_annotation(write_voc(tmp_path) / "Annotations" / "cat-1.xml")
    assert (ann.filename, ann.width, ann.height) == ("cat-1.jpg", 40, 20)
    assert [o.name for o in ann.objects] == ["cat", "dog"]
    assert ann.objects[0].box == (0.0, 1.0, 10.0, 20.0)                   # 1-based -> edges
    assert [o.difficult for o in ann.objects] == [False, True]


def test_malformed_boxes_are_errors_naming_the_file():
    bad = XML.replace("<xmax>10</xmax>", "<xmax>oops</xmax>").encode()
    with pytest.raises(ValueError, match=r"bad\.xml: object 'cat' has a missing or non-numeric"):
        voc.parse_annotation(bad, where="bad.xml")
    empty = XML.replace("<xmax>10</xmax>", "<xmax>0</xmax>").encode()
    with pytest.raises(ValueError, match=r"e\.xml: object 'cat' has an empty box"):
        voc.parse_annotation(empty, where="e.xml")


def test_load_split_resizes_images_and_boxes_and_converts_to_rgb(tmp_path):
    root = write_voc(tmp_path, mode="L")                                  # grayscale JPEG
    [sample] = voc.load_split(root, "train", ["cat", "dog"], min_size=40, max_size=100)
    assert sample.image.shape == (3, 40, 80) and sample.image.dtype == torch.uint8
    assert torch.allclose(sample.boxes, torch.tensor([[0, 2, 20, 40], [20, 8, 80, 30.]]))
    assert sample.labels.tolist() == [1, 2] and sample.difficult.tolist() == [False, True]


def test_unknown_class_and_missing_split_are_named(tmp_path):
    root = write_voc(tmp_path)
    with pytest.raises(ValueError, match=r"classes \['dog'\] are not in labels.txt"):
        voc.load_split(root, "train", ["cat"], 20, 40)
    with pytest.raises(ValueError, match=r"split 'val'.*splits found: \['test', 'train'\]"):
        voc.read_split_ids(root, "val")


def test_synthetic_voc_is_deterministic_and_well_formed(tmp_path):
    write_synthetic_voc(tmp_path / "a", 4, 2, 64, seed=3)
    write_synthetic_voc(tmp_path / "b", 4, 2, 64, seed=3)
    digest = {d: hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / d).rglob("*"))
                                         if p.is_file())).hexdigest() for d in "ab"}
    assert digest["a"] == digest["b"]
    root = tmp_path / "a"
    assert voc.read_classes(root) == list(SYNTHETIC_CLASSES)
    assert voc.read_split_ids(root, "trainval") == ["000000", "000001", "000002", "000003"]
    assert voc.read_split_ids(root, "train") == ["000000", "000001", "000002"]
    samples = voc.load_split(root, "test", list(SYNTHETIC_CLASSES), 64, 64)
    for s in samples:
        assert 1 <= len(s.boxes) <= 3 and s.image.shape == (3, 64, 64)
        assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2:] <= 64).all()
        assert (s.boxes[:, 2:] > s.boxes[:, :2]).all()


def test_materialize_reads_a_zip_with_a_wrapper_folder(tmp_path):
    src = write_voc(tmp_path / "src")
    archive = tmp_path / "voc.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, f"wrapper/{path.relative_to(src)}")
        z.writestr("README.md", "not VOC")
    root = voc.materialize(str(archive), tmp_path / "out", seed=0)
    assert (root / "Annotations" / "cat-1.xml").read_text() == XML
    assert voc.read_classes(root) == ["cat", "dog"] and not (root / "README.md").exists()
    folder = voc.materialize(str(src), tmp_path / "out2", seed=0)
    assert (folder / "JPEGImages" / "cat-1.jpg").read_bytes() == (src / "JPEGImages" /
                                                                   "cat-1.jpg").read_bytes()


def test_materialize_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="expected one Annotations/ folder"):
        voc.materialize(str(tmp_path), tmp_path / "out", seed=0)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected 'synthetic', a VOC folder or a \.zip"):
        voc.materialize(str(tmp_path / "x.tar"), tmp_path / "out", seed=0)


def test_without_labels_txt_classes_come_sorted_from_the_annotations(tmp_path, caplog):
    src = write_voc(tmp_path / "src")
    (src / "labels.txt").unlink()
    (src / "Annotations" / "bird-2.xml").write_text(XML.replace("dog", "bird"))
    caplog.set_level("INFO")
    assert voc.read_classes(src) == ["bird", "cat", "dog"]
    assert "no labels.txt; 3 classes from the annotations" in caplog.text
    root = voc.materialize(str(src), tmp_path / "out", seed=0)
    assert not (root / "labels.txt").exists() and voc.read_classes(root) == ["bird", "cat", "dog"]
    samples = voc.load_split(root, "train", voc.read_classes(root), min_size=20, max_size=40)
    assert samples[0].labels.tolist() == [2, 3]
    for xml in (src / "Annotations").glob("*.xml"):
        xml.write_text("<annotation><filename>x.jpg</filename></annotation>")
    with pytest.raises(ValueError, match="no labels.txt and no <object> names"):
        voc.materialize(str(src), tmp_path / "out2", seed=0)


def test_images_are_read_by_content_not_by_extension(tmp_path):
    root = write_voc(tmp_path / "voc")
    pixels = torch.randint(0, 256, (20, 40, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).numpy()
    Image.fromarray(pixels).save(root / "JPEGImages" / "cat-1.jpg", format="PNG")  # PNG bytes
    sample = voc.load_split(root, "train", ["cat", "dog"], min_size=20, max_size=40)[0]
    assert torch.equal(sample.image, torch.from_numpy(pixels).permute(2, 0, 1))
    (root / "JPEGImages" / "cat-1.jpg").rename(root / "JPEGImages" / "cat-1.png")
    sample = voc.load_split(root, "train", ["cat", "dog"], min_size=20, max_size=40)[0]
    assert torch.equal(sample.image, torch.from_numpy(pixels).permute(2, 0, 1))
    (root / "JPEGImages" / "cat-1.png").unlink()
    with pytest.raises(ValueError, match=r"image 'cat-1': expected .*found \[\]"):
        voc.load_split(root, "train", ["cat", "dog"], min_size=20, max_size=40)
