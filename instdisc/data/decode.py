"""The one image decoder of the project: bytes or a file -> a fully decoded RGB PIL image
(prepare, the file-backed loaders, serving and the VOC reader all use it)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def decode_rgb(data: bytes | Path, before_load: Callable[[Image.Image], None] | None = None
               ) -> tuple[Image.Image, str]:
    """Decode an image fully and convert it to RGB; returns (image, original mode).

    Raises whatever Pillow raises for unreadable data (see `DECODE_ERRORS`). Alpha is dropped
    and palettes are expanded, as `PIL.Image.convert("RGB")` does (torchvision's loader);
    16/32-bit grayscale is scaled to 8 bits rather than clipped. EXIF orientation is not applied
    (torchvision's loader does not either). `before_load(image)` runs on the opened, not yet
    decoded image (the file-backed loaders `Image.draft` large JPEGs there).
    """
    if isinstance(data, Path):
        data = data.read_bytes()
    if not data:
        raise ValueError("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close, so no copy to keep
    except UnidentifiedImageError:  # its message names a BytesIO object's address: unstable
        raise UnidentifiedImageError("cannot identify image file") from None
    if before_load is not None:
        before_load(image)
    image.load()  # decodes everything: truncated files fail here, not later
    mode = image.mode
    if mode == "RGB":
        return image, mode
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB"), mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray_to_rgb(image), mode
    return image.convert("RGB"), mode


DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit int ('I') or float ('F') grayscale -> 8-bit RGB, scaled by range."""
    values = np.asarray(image)  # its own 2- or 4-byte dtype: a float64 copy is 4x a 16-bit image
    peak = float(values.max(initial=0))
    if image.mode == "F":
        top = 1.0 if peak <= 1.0 else 255.0
    else:
        top = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
    gray = np.empty(values.shape, dtype=np.uint8)                               # (H, W)
    rows = max(1, 2**20 // max(1, values.shape[1]))  # float64 in blocks of about 8 MB
    for start in range(0, len(values), rows):
        block = values[start:start + rows].astype(np.float64)
        gray[start:start + rows] = np.clip(block / top * 255 + 0.5, 0, 255)
    return Image.fromarray(gray).convert("RGB")
