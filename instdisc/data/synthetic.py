"""The embedded default dataset: procedurally drawn shapes, generated with NumPy in a second.

Class k is one (shape, pattern) pair: shape k % 10 (disc, square, triangle, ring, cross, diamond,
star, crescent, bar, semicircle) filled with pattern (k % 10 + k // 10) % 10 (solid, stripes,
checker, dots, rings, grid, spokes, gradient, outline, speckle), so the first ten classes differ in
both and up to 100 classes stay distinct. Everything else is a nuisance drawn per image:
foreground, pattern and background colours (from a small palette shared by all classes, so the
mean colour says almost nothing about the class and little about the instance), position, scale,
rotation, a background gradient and pixel noise.
Raw-pixel neighbours are therefore mostly colour neighbours, while an encoder trained with colour
jitter and grayscale augmentation (Wu et al. 2018, arXiv:1805.01978, Sec. 4) has to use shape and
texture, which identify the class.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "star", "crescent", "bar",
          "semicircle")
PATTERNS = ("solid", "stripes", "checker", "dots", "rings", "grid", "spokes", "gradient", "outline",
            "speckle")
SPLITS = ("train", "test")
PALETTE = np.array([[0.85, 0.20, 0.20], [0.20, 0.65, 0.25], [0.20, 0.35, 0.85], [0.90, 0.80, 0.20],
                    [0.60, 0.25, 0.70], [0.20, 0.75, 0.80], [0.95, 0.55, 0.15], [0.45, 0.45, 0.45],
                    [0.92, 0.92, 0.90], [0.12, 0.12, 0.15]], dtype=np.float32)  # (10, 3) RGB

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def class_names(num_classes: int) -> list[str]:
    """`NN-pattern-shape`; the zero-padded prefix makes sorted order equal label order."""
    if not 1 <= num_classes <= len(SHAPES) * len(PATTERNS):
        raise ValueError(f"num_classes = {num_classes}: allowed 1..{len(SHAPES) * len(PATTERNS)}")
    names = []
    for k in range(num_classes):
        shape, pattern = _class_parts(k)
        names.append(f"{k:02d}-{PATTERNS[pattern]}-{SHAPES[shape]}")
    return names


def make_synthetic(num_classes: int, train_per_class: int, test_per_class: int, image_size: int,
                   seed: int) -> tuple[Arrays, list[str]]:
    """Generate the dataset; returns ({split: (images, labels)}, class names).

    images: uint8 (N, H, W, 3) with H = W = image_size; labels: int64 (N,), sorted by class.
    The same arguments give identical arrays on every run and machine: every (split, class) has
    its own NumPy generator seeded from (seed, split, class), so adding classes or images to one
    split leaves the others unchanged.
    """
    names = class_names(num_classes)
    if image_size < 8:
        raise ValueError(f"image_size = {image_size}: allowed >= 8")
    splits: Arrays = {}
    for split_id, (split, per_class) in enumerate(zip(SPLITS, (train_per_class, test_per_class))):
        if per_class < 1:
            raise ValueError(f"{split}_per_class = {per_class}: allowed >= 1")
        images = np.empty((num_classes * per_class, image_size, image_size, 3), np.uint8)
        for k in range(num_classes):
            rng = np.random.default_rng([seed, split_id, k])
            images[k * per_class:(k + 1) * per_class] = _draw_class(k, per_class, image_size, rng)
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)  # (N,)
        splits[split] = (images, labels)
    return splits, names


def _class_parts(k: int) -> tuple[int, int]:
    """(shape index, pattern index) of class k; distinct for k < 100."""
    shape = k % len(SHAPES)
    return shape, (shape + k // len(SHAPES)) % len(PATTERNS)


def _draw_class(k: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n images of class k: uint8 (n, size, size, 3)."""
    shape, pattern = _class_parts(k)
    f32 = np.float32
    # Nuisances, one value per image.
    angle = rng.uniform(0, 2 * np.pi, n).astype(f32)                     # (n,)
    scale = rng.uniform(0.24, 0.38, n).astype(f32) * size                # object radius in pixels
    centre = rng.uniform(-0.18, 0.18, (n, 2)).astype(f32) * size + (size - 1) / 2  # (n, 2) y, x
    # Colours come from a small class-independent palette (plus a little jitter): a colour pair
    # is shared by many images of every class, so it cannot single out an instance, and instance
    # discrimination has to use shape and texture.
    pair = rng.integers(0, len(PALETTE), (n, 2))                          # (n, 2)
    pair[:, 1] = (pair[:, 0] + 1 + pair[:, 1] % (len(PALETTE) - 1)) % len(PALETTE)  # fg != bg
    jitter = rng.uniform(-0.05, 0.05, (n, 2, 3)).astype(f32)              # (n, 2, 3)
    background = np.clip(PALETTE[pair[:, 0]] + jitter[:, 0], 0, 1)        # (n, 3)
    foreground = np.clip(PALETTE[pair[:, 1]] + jitter[:, 1], 0, 1)        # (n, 3)
    bright = foreground.mean(1, keepdims=True) > 0.5                     # (n, 1)
    second = np.where(bright, foreground * 0.35, foreground + (1 - foreground) * 0.65)  # (n, 3)
    tilt = rng.uniform(-0.15, 0.15, (n, 2)).astype(f32)                  # background gradient
    # Object coordinates (u, v) in units of the object radius, rotated and centred per image.
    grid = np.arange(size, dtype=f32)
    dy = (grid[None, :, None] - centre[:, 0, None, None]) / scale[:, None, None]  # (n, size, 1)
    dx = (grid[None, None, :] - centre[:, 1, None, None]) / scale[:, None, None]  # (n, 1, size)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * dx + sin * dy                                               # (n, size, size)
    v = -sin * dx + cos * dy                                              # (n, size, size)
    pixel = 1.0 / scale[:, None, None]                                    # (n, 1, 1), object units
    dist = _sdf(shape, u, v)                                              # (n, size, size)
    inside = np.clip(0.5 - dist / pixel, 0, 1)                            # (n, size, size), soft
    marks = _pattern(pattern, u, v, dist, pixel, rng)                     # (n, size, size), [0, 1]
    ramp = (tilt[:, 0, None, None] * (grid[None, :, None] / size - 0.5)
            + tilt[:, 1, None, None] * (grid[None, None, :] / size - 0.5))  # (n, size, size)
    bg = np.clip(background[:, None, None, :] + ramp[..., None], 0, 1)     # (n, size, size, 3)
    fg = (foreground[:, None, None, :] * (1 - marks[..., None])
          + second[:, None, None, :] * marks[..., None])                  # (n, size, size, 3)
    image = bg + (fg - bg) * inside[..., None]                            # (n, size, size, 3)
    image += 0.04 * rng.standard_normal(image.shape, dtype=f32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (approximate, object units) to the outline of SHAPES[shape]; < 0 inside."""
    au, av = np.abs(u), np.abs(v)
    r = np.sqrt(u * u + v * v)
    name = SHAPES[shape]
    if name == "disc":
        return r - 1.0
    if name == "square":
        return np.maximum(au, av) - 0.82
    if name == "triangle":  # equilateral, circumradius 1
        return np.maximum(0.866 * au + 0.5 * v, -v) - 0.5
    if name == "ring":
        return np.abs(r - 0.72) - 0.28
    if name == "cross":
        return np.minimum(np.maximum(au - 1.0, av - 0.34), np.maximum(au - 0.34, av - 1.0))
    if name == "diamond":
        return (au + av - 1.05) * 0.707
    if name == "star":
        theta = np.arctan2(v, u)
        return r - (0.72 + 0.28 * np.cos(5 * theta))
    if name == "crescent":
        return np.maximum(r - 1.0, 0.75 - np.sqrt((u - 0.45) ** 2 + v * v))
    if name == "bar":
        return np.maximum(au - 1.0, av - 0.38)
    assert name == "semicircle", name
    return np.maximum(r - 1.0, -v - 0.2)


def _pattern(pattern: int, u: np.ndarray, v: np.ndarray, dist: np.ndarray, pixel: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Where the second colour shows inside the shape: (n, size, size) in [0, 1]."""
    name = PATTERNS[pattern]
    period = 0.55  # object units; about 4 pixels at 32x32

    def band(d: np.ndarray, width: float) -> np.ndarray:
        """1 where |d| < width/2 (anti-aliased over one pixel)."""
        return np.clip(0.5 + (width / 2 - np.abs(d)) / pixel, 0, 1)

    def wave(t: np.ndarray) -> np.ndarray:
        """Distance of t to the nearest multiple of the period."""
        return t - period * np.round(t / period)

    if name == "solid":
        return np.zeros_like(u)
    if name == "stripes":
        return band(wave(u), period / 2)
    if name == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2
    if name == "dots":
        return band(np.sqrt(wave(u) ** 2 + wave(v) ** 2), period / 1.8)
    if name == "rings":
        return band(wave(np.sqrt(u * u + v * v)), period / 2)
    if name == "grid":
        return np.maximum(band(wave(u), period / 3.5), band(wave(v), period / 3.5))
    if name == "spokes":
        return (np.floor(np.arctan2(v, u) / (np.pi / 4)) % 2).astype(u.dtype)
    if name == "gradient":
        return np.clip((u + 1) / 2, 0, 1)
    if name == "outline":  # a rim of the second colour along the shape's edge
        return np.clip(0.5 + (dist + 0.3) / pixel, 0, 1)
    assert name == "speckle", name
    n, h, w = u.shape
    block = max(2, h // 16)  # speckles of about 1/16 of the image side
    coarse = rng.random((n, h // block + 1, w // block + 1)) < 0.35
    return np.repeat(np.repeat(coarse, block, 1), block, 2)[:, :h, :w].astype(u.dtype)
