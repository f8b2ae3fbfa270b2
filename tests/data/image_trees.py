"""Helpers for tests/data: tiny image trees in the <split>/<class>/<file> layout, as folders
and archives."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rgb(size: int, seed: int) -> Image.Image:
    """A random RGB image, size x size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def clean_tree(per_class: int = 3, size: int = 8, classes=("cat", "dog")) -> dict[str, bytes]:
    """relpath -> PNG bytes for train/test x classes (PNG: lossless, so pixels are known)."""
    files = {}
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate(classes):
            for i in range(n):
                seed = 1000 * c + 10 * i + len(split)
                files[f"{split}/{name}/{i:03d}.png"] = encode(rgb(size, seed), "PNG")
    return files


def messy_tree() -> dict[str, bytes]:
    """clean_tree plus one of every problem prepare must handle."""
    files = clean_tree()
    good_jpeg = encode(rgb(8, 7), "JPEG")
    files["train/cat/bad.jpg"] = good_jpeg[: len(good_jpeg) // 2]             # truncated
    files["train/cat/README.txt"] = b"not an image\n"
    files["train/dog/gray.jpg"] = encode(rgb(8, 8).convert("L"), "JPEG")
    files["train/dog/rgba.png"] = encode(rgb(8, 9).convert("RGBA"), "PNG")
    files["train/dog/palette.png"] = encode(rgb(8, 10).convert("P"), "PNG")
    files["test/cat/cmyk.jpg"] = encode(rgb(8, 11).convert("CMYK"), "JPEG")
    files["train/.DS_Store"] = b"\0\1"
    files["__MACOSX/train/cat/._000.png"] = b"junk"
    files["README.md"] = b"# a dataset\n"
    files["val/cat/000.png"] = encode(rgb(8, 12), "PNG")
    return files


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def imagenet_tree(num_classes: int = 2, train_per_class: int = 4, val_per_class: int = 2,
                  sizes: tuple[int, ...] = (8,)) -> dict[str, bytes]:
    """train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, a stray classes.tsv (wnid<TAB>name), the second
    image of every class and split grayscale (mode L); image i is sizes[i % len(sizes)] a side."""
    wnids = list(WNIDS)[:num_classes]
    files = {"classes.tsv": "".join(f"{w}\t{WNIDS[w]}\n" for w in wnids).encode()}
    for c, wnid in enumerate(wnids):
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for i in range(n):
                image = rgb(sizes[i % len(sizes)], 100 * c + 10 * i + len(split))
                if i == 1:
                    image = image.convert("L")
                files[f"{split}/{wnid}/{wnid}_{i}.JPEG"] = encode(image, "JPEG")
    return files


def photo_collection(count: int, size: int = 16) -> dict[str, bytes]:
    """An unlabelled photo folder: `count` JPEGs and PNGs at the top and in nested dated folders
    (no split or class folders), plus a notes.txt that is not an image."""
    files = {"notes.txt": b"holiday pictures\n"}
    for i in range(count):
        where, fmt = [("", "JPEG"), ("2019/trip/", "JPEG"), ("2020/", "PNG")][i % 3]
        files[f"{where}{i:03d}.{fmt.lower()}"] = encode(rgb(size, 500 + i), fmt)
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for rel, data in sorted(files.items()):
            archive.writestr(prefix + rel, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
