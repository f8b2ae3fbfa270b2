"""How `prepare` stores decoded images: one uint8 array per split, or a manifest of files.

If every image has at most `max_in_memory_size` pixels a side, each split becomes one uint8
array (resized to `image_size`, or to the most common size when sizes differ). Otherwise every
split is a manifest of files, all inside the prepared folder (so that it is complete in the DVC
cache and travels through a remote): copies of a folder source's originals and the files extracted
from an archive, under `files/<relpath>`, and, with `max_shorter_side` > 0, images whose shorter
side is longer than that re-encoded (FFCV-style, https://ffcv.io): resized with the aspect ratio kept (bicubic,
antialiased), written as JPEG at `reencode_quality` to `files/<relpath>` (`.jpg` appended to a
name that is not a JPEG's). Decoding and cropping such a file costs a fraction of the original;
a bound of >= S / sqrt(crop_scale_min) (about 500 for S = 224, scale 0.2) keeps even the
smallest crop at >= S pixels (see `instdisc.data.file_transforms`), 256 is FFCV's fast choice.
Same inputs, same bytes: Pillow's JPEG encoder is deterministic and no metadata is written.
"""

from __future__ import annotations

import collections
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from instdisc.config import PrepareParams
from instdisc.data.decode import decode_rgb
from instdisc.data.prepared import SplitArrays

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class Item:
    """One decoded image: a small one keeps its pixels; a file-backed one its manifest path."""

    label: int
    relpath: str  # <split>/<class>/<name>
    size: tuple[int, int]  # (H, W) as decoded
    pixels: np.ndarray | None = None  # uint8 (H, W, 3), small images only
    path: str | None = None  # an absolute original (folder source), or "files/<relpath>"
    raw: bytes | None = None  # archive bytes of a small image, in case the storage is a manifest


Items = dict[str, list[Item]]  # split -> items in index order


def assemble(items: Items, params: PrepareParams,
             tmp: Path) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """SplitArrays per split plus the storage part of the report (storage, image_size,
    resized, reencoded)."""
    labels = {s: np.array([it.label for it in its], dtype=np.int64) for s, its in items.items()}
    every = [it for its in items.values() for it in its]
    large = [it for it in every if max(it.size) > params.max_in_memory_size]
    if large:
        log.info("%d images exceed max_in_memory_size = %d (e.g. %s): manifest storage",
                 len(large), params.max_in_memory_size, large[0].relpath)
        paths = {s: [_manifest_path(tmp, it, params.max_shorter_side) for it in its]
                 for s, its in items.items()}
        reencoded = None
        if params.max_shorter_side > 0:
            reencoded = _reencode_all(items, paths, params.max_shorter_side,
                                      params.reencode_quality, tmp)
        splits = {s: SplitArrays(labels[s], paths=paths[s]) for s in items}
        return splits, {"storage": "manifest", "image_size": None, "resized": None,
                        "reencoded": reencoded}
    if params.image_size > 0:
        size, why = (params.image_size, params.image_size), "image_size"
    else:
        sizes = collections.Counter(it.size for it in every)
        size = max(sizes, key=lambda s: (sizes[s], s))  # most common; ties -> the larger
        why = "most common size" if len(sizes) > 1 else None
    resized = 0
    splits = {}
    for split, its in items.items():
        images = np.empty((len(its), size[0], size[1], 3), np.uint8)  # (N, H, W, 3)
        for i, it in enumerate(its):
            images[i] = it.pixels if it.size == size else _resize(it.pixels, size)
            resized += it.size != size
        splits[split] = SplitArrays(labels[split], images=images)
    if resized:
        log.info("resized %d images to %dx%d (%s)", resized, size[0], size[1], why)
    summary = {"count": resized, "to": list(size), "why": why} if resized else None
    return splits, {"storage": "array", "image_size": list(size), "resized": summary,
                    "reencoded": None}


def extract(tmp: Path, relpath: str, data: bytes) -> str:
    """Write archive bytes to tmp/files/<relpath>; returns the manifest path."""
    target = tmp / "files" / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"files/{relpath}"


def shorter_side_size(size: tuple[int, int], max_shorter_side: int) -> tuple[int, int]:
    """(H, W) scaled so that the shorter side is `max_shorter_side` (aspect kept, rounded)."""
    scale = max_shorter_side / min(size)
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def reencode(data: bytes, max_shorter_side: int, quality: int) -> bytes:
    """An image file's bytes -> JPEG bytes of it resized to `max_shorter_side` (bicubic,
    antialiased; no EXIF or ICC profile, baseline, Pillow's default 4:2:0 chroma)."""
    image, _ = decode_rgb(data)
    height, width = shorter_side_size((image.height, image.width), max_shorter_side)
    small = image.resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _reencode_all(items: Items, paths: dict[str, list[str]], max_shorter_side: int,
                  quality: int, tmp: Path) -> dict[str, Any]:
    """Re-encode (in index order) every image whose shorter side exceeds `max_shorter_side`;
    rewrites its entry of `paths`; returns the report entry."""
    count = before = after = 0
    for split, its in items.items():
        for i, it in enumerate(its):
            if min(it.size) <= max_shorter_side:
                continue
            source = Path(paths[split][i])
            source = source if source.is_absolute() else tmp / source
            data = source.read_bytes()
            encoded = reencode(data, max_shorter_side, quality)
            name = it.relpath if it.relpath.lower().endswith(JPEG_SUFFIXES) \
                else f"{it.relpath}.jpg"
            if source != tmp / "files" / name and source.is_relative_to(tmp):
                source.unlink()  # an extracted (or PNG-written) original, now replaced
            paths[split][i] = extract(tmp, name, encoded)
            count, before, after = count + 1, before + len(data), after + len(encoded)
    log.info("re-encoded %d images to a shorter side of %d px (JPEG quality %d): %.1f MB -> "
             "%.1f MB", count, max_shorter_side, quality, before / 1e6, after / 1e6)
    return {"max_shorter_side": max_shorter_side, "quality": quality, "count": count,
            "bytes_before": before, "bytes_after": after}


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) -> (H, W, 3), bicubic with Pillow's antialiasing (aspect not kept)."""
    image = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _manifest_path(tmp: Path, item: Item, max_shorter_side: int) -> str:
    """The item's path under tmp/files/: a folder original is copied there, unless it is about to
    be re-encoded (then `_reencode_all` reads the original and writes only the smaller file)."""
    if item.path is None:
        return _write_file(tmp, item)
    if not Path(item.path).is_absolute() or 0 < max_shorter_side < min(item.size):
        return item.path
    target = tmp / "files" / item.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(item.path, target)
    return f"files/{item.relpath}"


def _write_file(tmp: Path, item: Item) -> str:
    """Put a small image that has no file yet under tmp/files/ (archive bytes, or a PNG)."""
    if item.raw is None:
        buffer = io.BytesIO()
        Image.fromarray(item.pixels).save(buffer, format="PNG")
        item.raw = buffer.getvalue()
    return extract(tmp, item.relpath, item.raw)
