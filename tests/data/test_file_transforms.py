"""The file-backed transforms: same draws and (undrafted) same pixels as the plain v2 pipeline,
JPEG drafting within its bound, and the per-sample seeding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from instdisc.data.augment import MEAN, STD
from instdisc.data.file_transforms import (EvalFileTransform, TrainFileTransform, draft_jpeg,
                                           draft_request, seeded_cpu_rng)
from instdisc.data.decode import decode_rgb

GREY_LEVEL = 1 / (255 * min(STD))  # one grey level, in normalised units (at most)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): smooth colour gradients plus mild noise (JPEG-friendly, photo-like)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = rng.uniform(0, 2 * np.pi, (3, 3))
    channels = [np.sin(6 * x + p[0]) + np.cos(5 * y + p[1]) + np.sin(9 * (x - y) + p[2])
                for p in phase]
    pixels = 128 + 40 * np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def plain_v2(size: int, hue: float = 0.4, jitter_prob: float = 1.0) -> v2.Compose:
    """The file transform as it was: one v2.Compose on the fully decoded PIL image."""
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, hue)
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                       v2.RandomApply([jitter], p=jitter_prob), v2.RandomGrayscale(0.2),
                       v2.RandomHorizontalFlip(), v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_undrafted_output_is_the_plain_v2_pipeline_bit_for_bit(mode):
    data = jpeg(photo(80, 60, 0), mode)  # too small to draft for 32 px crops
    fast, plain = TrainFileTransform(32, hue=0.4, jitter_prob=0.8), plain_v2(32, 0.4, 0.8)
    for seed in range(12):
        with seeded_cpu_rng(seed):
            a = fast(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            b = plain(decode_rgb(data)[0])
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32
        assert torch.equal(a, b), seed


def test_an_already_decoded_image_gives_the_same_output():
    data = jpeg(photo(80, 60, 1))
    transform = TrainFileTransform(24)
    with seeded_cpu_rng(3):
        a = transform(data)
    with seeded_cpu_rng(3):
        b = transform(decode_rgb(data)[0])
    assert torch.equal(a, b)


@pytest.mark.parametrize(("fraction", "k"), [(0.9, 1), (0.5, 2), (0.3, 2), (0.2, 4), (0.1, 8),
                                             (0.01, 8)])
def test_draft_picks_the_smallest_scale_that_keeps_the_fraction(fraction, k):
    image = Image.open(io.BytesIO(jpeg(photo(800, 600, 2))))
    assert draft_jpeg(image, fraction) == k
    image.load()
    assert image.size == (800 // k, 600 // k)
    assert image.size[0] >= fraction * 800 and image.size[1] >= fraction * 600


def test_drafted_size_keeps_the_fraction_whatever_the_size():
    rng = np.random.default_rng(0)
    for width, height, fraction in zip(rng.integers(40, 1500, 12), rng.integers(40, 1500, 12),
                                       rng.uniform(0.05, 1.0, 12)):
        image = Image.open(io.BytesIO(jpeg(photo(int(width), int(height), 0))))
        k = draft_jpeg(image, float(fraction))
        request = draft_request(int(width), int(height), float(fraction))
        assert (k == 1.0) == (request is None)
        image.load()
        assert image.size[0] >= fraction * width and image.size[1] >= fraction * height
        assert image.size == (-(-width // k), -(-height // k))


def test_png_and_small_files_are_never_drafted():
    png = io.BytesIO()
    Image.fromarray(photo(800, 600, 3)).save(png, format="PNG")
    assert draft_jpeg(Image.open(io.BytesIO(png.getvalue())), 0.1) == 1.0
    assert draft_jpeg(Image.open(io.BytesIO(jpeg(photo(40, 30, 3)))), 0.6) == 1.0


def test_drafted_crops_are_the_same_boxes_and_nearly_the_same_pixels():
    data = jpeg(photo(1200, 900, 4))
    drafted, full = TrainFileTransform(64, hue=0.0), TrainFileTransform(64, hue=0.0, draft=False)
    differences = []
    for seed in range(16):
        with seeded_cpu_rng(seed):
            a = drafted(data)
        with seeded_cpu_rng(seed):
            b = full(data)
        differences.append((a - b).abs().mean().item() / GREY_LEVEL)
    # Crops of a 1200 x 900 file are >= 402 px a side: for 64 px, all are decoded at 1/4 or 1/8.
    assert 0 < np.mean(differences) < 3, differences


def test_eval_transform_drafts_only_down_to_the_resize():
    data = jpeg(photo(1200, 900, 5))
    drafted, full = EvalFileTransform(56, 64), EvalFileTransform(56, 64, draft=False)
    a, b = drafted(data), full(data)
    assert a.shape == b.shape == (3, 56, 56)
    assert (a - b).abs().mean() < 3 * GREY_LEVEL
    image = Image.open(io.BytesIO(data))
    assert draft_jpeg(image, 64 / 900) == 8
    image.load()
    assert min(image.size) >= 64


def test_seeded_cpu_rng_is_manual_seed_for_the_cpu_and_restores_the_state():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with seeded_cpu_rng(11):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(4), inside)
