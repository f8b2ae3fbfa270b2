"""A small synthetic detection set in VOC layout, so the detection stage runs offline (Sec. 4.4).

Each image is a textured background (a colour gradient, sinusoidal stripes of random orientation
and period, pixel noise) with one to three filled shapes (disc, square, triangle) of random size,
colour and position; shapes overlap each other by at most IoU 0.1. Boxes are the exact pixel
extents of the drawn shapes. The same (counts, size, seed) give the same files on every machine.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC_CLASSES = ("disc", "square", "triangle")
MAX_OBJECTS = 3


def write_synthetic_voc(root: Path, num_train: int, num_test: int, size: int, seed: int) -> None:
    """Write `num_train` trainval + `num_test` test images and annotations under `root`.

    trainval is further split 3:1 into train and val; labels.txt lists SYNTHETIC_CLASSES.
    """
    root = Path(root)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(num_train + num_test)]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        image, objects = _draw_image(size, rng)
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        write_annotation(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, size,
                         objects)
    trainval, test = ids[:num_train], ids[num_train:]
    cut = max(1, len(trainval) * 3 // 4)
    splits = {"trainval": trainval, "train": trainval[:cut], "val": trainval[cut:], "test": test}
    for name, members in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{m}\n" for m in members))
    (root / "labels.txt").write_text("".join(f"{c}\n" for c in SYNTHETIC_CLASSES))


def write_annotation(path: Path, filename: str, width: int, height: int,
                     objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    """A VOC XML file; boxes given as pixel edges (x0, y0, x1, y1) are written 1-based inclusive."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for name, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, key).text = str(value)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Textured background: uint8 (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size          # (S, S) each
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)                   # (3,)
    tilt = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)             # gradient per channel
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.25)
    stripes = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)  # (S, S)
    amp = rng.uniform(0.05, 0.15, 3).astype(np.float32)                  # (3,)
    image = (base + tilt[0] * (yy[..., None] - 0.5) + tilt[1] * (xx[..., None] - 0.5)
             + amp * stripes[..., None])                                 # (S, S, 3)
    image += 0.03 * rng.standard_normal(image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _draw_image(size: int, rng: np.random.Generator):
    """One image and its objects [(class name, (x0, y0, x1, y1))], boxes as pixel edges."""
    background = _background(size, rng)                                  # (S, S, 3) uint8
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    objects: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _try in range(10):
            side = int(rng.integers(max(8, size // 5), max(9, size // 2)))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, b) <= 0.1 for _, b in objects):
                break
        else:
            continue
        name = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
        under = background[(y0 + box[3]) // 2, (x0 + box[2]) // 2].astype(int)  # (3,)
        colour = tuple(int(c) for c in (under + rng.integers(80, 177, 3)) % 256)  # contrasts
        # PIL's ellipse/rectangle/polygon with corner (x1 - 1, y1 - 1) fill pixels x0..x1-1.
        if name == "disc":
            draw.ellipse((x0, y0, box[2] - 1, box[3] - 1), fill=colour)
        elif name == "square":
            draw.rectangle((x0, y0, box[2] - 1, box[3] - 1), fill=colour)
        else:
            draw.polygon([(x0, box[3] - 1), (box[2] - 1, box[3] - 1),
                          ((x0 + box[2] - 1) / 2, y0)], fill=colour)
        objects.append((name, box))
    return image, objects
