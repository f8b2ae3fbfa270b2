"""PASCAL VOC-format detection data for the detection transfer (arXiv:1805.01978, Sec. 4.4).

Layout read (and written by `write_synthetic_voc`):

    Annotations/<id>.xml          VOC XML: size, object/name, object/difficult, object/bndbox
    JPEGImages/<id>.jpg           any format and mode, whatever the extension says (read by
                                  content, `decode_rgb`); also <id>.<other ext> or <filename>
    ImageSets/Main/<split>.txt    one image id per line (train, val, trainval, test)
    labels.txt                    optional: class names, one per line (label i + 1; 0 is
                                  background); without it (VOC2007 and most VOC-format exports
                                  ship none) the sorted object names of all annotations

`<path>` and `<folder>` are ignored. Box coordinates: VOC stores 1-based, inclusive pixel indices;
they are turned into continuous corners (xmin - 1, ymin - 1, xmax, ymax), so a box's width is the
devkit's `xmax - xmin + 1` and IoUs match the VOC devkit for integer boxes.

`materialize` copies a source (the synthetic set, a VOC folder or a .zip, optionally wrapped in
one top-level folder) into one plain folder, atomically, so a stage has a single output to track.
"""

from __future__ import annotations

import logging
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from instdisc.data.archive import Archive
from instdisc.data.decode import decode_rgb
from instdisc.data.prepared import atomic_output_dir
from instdisc.transfer.synthetic_voc import write_synthetic_voc

log = logging.getLogger(__name__)

VOC_PARTS = ("Annotations", "JPEGImages", "ImageSets", "labels.txt")


@dataclass(frozen=True)
class VocObject:
    """One annotated object: class name, continuous box (x0, y0, x1, y1) and the difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


@dataclass(frozen=True)
class VocAnnotation:
    filename: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


@dataclass
class DetectionSample:
    """An image resized for the detector, with its targets in the resized coordinates."""

    image_id: str
    image: Tensor  # uint8 (3, H, W)
    boxes: Tensor  # float32 (K, 4), x0 y0 x1 y1
    labels: Tensor  # int64 (K,), 1-based class index
    difficult: Tensor  # bool (K,)


def parse_annotation(xml: Path | bytes, where: str | None = None) -> VocAnnotation:
    """One VOC XML file (path or bytes); ValueError naming the file for a malformed box."""
    where = where or str(xml)
    root = ET.fromstring(xml) if isinstance(xml, bytes) else ET.parse(xml).getroot()
    size = root.find("size")
    width = int(float(size.findtext("width", "0"))) if size is not None else 0
    height = int(float(size.findtext("height", "0"))) if size is not None else 0
    objects = []
    for obj in root.iter("object"):
        name, bndbox = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if not name or bndbox is None:
            raise ValueError(f"{where}: an <object> lacks <name> or <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(k)) for k in
                                      ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: object {name!r} has a missing or non-numeric box "
                             "coordinate") from err
        if not (xmin <= xmax and ymin <= ymax):
            raise ValueError(f"{where}: object {name!r} has an empty box "
                             f"({xmin}, {ymin}, {xmax}, {ymax})")
        difficult = int(float(obj.findtext("difficult") or 0)) == 1
        objects.append(VocObject(name, (xmin - 1, ymin - 1, xmax, ymax), difficult))
    return VocAnnotation(root.findtext("filename", "").strip(), width, height, tuple(objects))


def read_classes(root: Path) -> list[str]:
    """Class names from labels.txt (one per line, blank lines skipped) or, without that file,
    the sorted distinct object names of every Annotations/*.xml (logged)."""
    path = Path(root) / "labels.txt"
    if not path.is_file():
        return classes_from_annotations(root)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{str(path)!r} must list distinct class names, got {names}")
    return names


def classes_from_annotations(root: Path) -> list[str]:
    """Sorted distinct object names of Annotations/*.xml; ValueError when there are none."""
    folder = Path(root) / "Annotations"
    names = sorted({obj.name for xml in sorted(folder.glob("*.xml"))
                    for obj in parse_annotation(xml).objects})
    if not names:
        raise ValueError(f"{str(Path(root))!r} has no labels.txt and no <object> names in "
                         "Annotations/*.xml: no classes to detect")
    log.info("%s: no labels.txt; %d classes from the annotations (sorted): %s", root, len(names),
             names)
    return names


def read_split_ids(root: Path, split: str) -> list[str]:
    """Image ids of ImageSets/Main/<split>.txt (first token of each non-empty line)."""
    folder = Path(root) / "ImageSets" / "Main"
    path = folder / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise ValueError(f"split {split!r}: {str(path)!r} not found; splits found: {found}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_split(root: Path, split: str, classes: list[str], min_size: int,
               max_size: int) -> list[DetectionSample]:
    """Decode, resize (short side min_size, long side <= max_size) and label every image."""
    root = Path(root)
    index = {name: i + 1 for i, name in enumerate(classes)}
    samples = []
    for image_id in read_split_ids(root, split):
        xml = root / "Annotations" / f"{image_id}.xml"
        ann = parse_annotation(xml)
        unknown = sorted({o.name for o in ann.objects} - set(index))
        if unknown:
            raise ValueError(f"{str(xml)!r}: classes {unknown} are not in labels.txt {classes}")
        image, _ = decode_rgb(_image_file(root / "JPEGImages", image_id, ann.filename))
        scale = min(min_size / min(image.size), max_size / max(image.size))
        new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        sx, sy = new_w / image.width, new_h / image.height
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        boxes = torch.tensor([o.box for o in ann.objects], dtype=torch.float32).view(-1, 4)
        boxes *= torch.tensor([sx, sy, sx, sy])                          # (K, 4)
        samples.append(DetectionSample(
            image_id, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),  # (3, H, W)
            boxes, torch.tensor([index[o.name] for o in ann.objects], dtype=torch.int64),
            torch.tensor([o.difficult for o in ann.objects], dtype=torch.bool)))
    return samples


def _image_file(folder: Path, image_id: str, filename: str) -> Path:
    """<id>.jpg, else the annotation's <filename>, else the one <id>.<any extension>."""
    for path in (folder / f"{image_id}.jpg", folder / filename if filename else None):
        if path is not None and path.is_file():
            return path
    found = sorted(p for p in folder.glob(f"{image_id}.*") if p.is_file())
    if len(found) != 1:
        raise ValueError(f"image {image_id!r}: expected {str(folder / image_id)!r}.jpg (or one "
                         f"{image_id}.* file), found {[p.name for p in found]}")
    return found[0]


def materialize(source: str, out_dir: Path, *, seed: int, num_train: int = 48,
                num_test: int = 16, image_size: int = 96) -> Path:
    """Copy `source` ('synthetic', a VOC folder or .zip) into `out_dir` as a plain VOC folder."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        if source == "synthetic":
            write_synthetic_voc(tmp, num_train, num_test, image_size, seed)
        else:
            path = Path(source)
            if not path.exists():
                raise ValueError(f"detection source {source!r} does not exist")
            if path.is_dir():
                voc_root = _find_root([str(p.relative_to(path)) for p in path.rglob("*")], source)
                for part in VOC_PARTS:
                    src = path / voc_root / part
                    if src.is_dir():
                        shutil.copytree(src, tmp / part)
                    elif src.is_file():
                        shutil.copy(src, tmp / part)
            elif path.suffix.lower() == ".zip":
                _extract_zip(path, tmp)
            else:
                raise ValueError(f"detection source {source!r}: expected 'synthetic', a VOC "
                                 "folder or a .zip (Annotations/, JPEGImages/, ImageSets/Main/)")
        read_classes(tmp)  # fail before replacing out_dir
    return out_dir


def _find_root(names: list[str], source: str) -> str:
    """The prefix under which Annotations/ lives ('' or one wrapper folder)."""
    roots = {str(PurePosixPath(n).parent) for n in names if PurePosixPath(n).name != ""
             and PurePosixPath(n).parent.name == "Annotations"}
    roots = {str(PurePosixPath(r).parent) for r in roots}
    if len(roots) != 1:
        raise ValueError(f"detection source {source!r}: expected one Annotations/ folder at the "
                         f"top or under one wrapper folder, found {sorted(roots) or 'none'}")
    root = roots.pop()
    return "" if root == "." else root


def _extract_zip(path: Path, out: Path) -> None:
    """Extract the VOC parts of a zip (wrapper folder stripped); unsafe member names are errors."""
    with Archive(path) as archive:
        names = archive.names()
        prefix = _find_root(names, str(path))
        for name in names:
            if prefix and not name.startswith(prefix + "/"):
                continue
            rel = PurePosixPath(name[len(prefix) + 1:] if prefix else name)
            if rel.parts and rel.parts[0] in VOC_PARTS:
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"{str(path)!r}: unsafe member name {name!r}")
                target = out.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
