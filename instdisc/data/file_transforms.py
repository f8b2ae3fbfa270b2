"""Per-image transforms of file-backed splits: a file in, a normalised float (3, S, S) out.

`TrainFileTransform` is the paper's augmentation (Wu et al. 2018, arXiv:1805.01978, Sec. 4:
RandomResizedCrop(scale=(0.2, 1)), ColorJitter, RandomGrayscale, RandomHorizontalFlip) as the
torchvision v2 transforms on PIL images, with two shortcuts that leave every random draw alone:

- the crop box is drawn from the image header, before any pixel is decoded, and a JPEG is then
  decoded at the smallest DCT scale 1/k (k = 2, 4, 8; Pillow's `Image.draft`) at which that box
  still spans at least S x S pixels, so the final resize still shrinks it, as it did at full
  size. The bound in whole-image terms: a crop has area a * H * W with a >= crop_scale_min = s
  and aspect r in [3/4, 4/3], so its shorter side is at least sqrt(s * H * W * 3/4); for a 4:3
  image even the smallest crop keeps S pixels iff the decoded shorter side is >= S / sqrt(s)
  (501 px for S = 224, s = 0.2). Larger crops allow more: a 1000 x 750 file is decoded at 1/2
  for crops of 448 px or more each way. A crop that needs full resolution (and every PNG) is
  decoded at full size, and then the output is bit for bit what the plain v2 pipeline gives;
- jitter, grayscale and flip run after the crop, on the S x S image (PIL, torchvision's own
  kernels), and the tensor conversion and normalisation skip v2's per-call dispatch.
Per-sample seeding (`seeded_cpu_rng`) swaps the CPU generator's state instead of calling
`torch.manual_seed`, which costs 0.2 ms a call on a CUDA build.

`EvalFileTransform` resizes the shorter side to `resize` and centre-crops S x S; a JPEG is
drafted only down to a shorter side >= `resize`.

Both take a file's bytes or path (or an already decoded PIL image: then nothing is drafted).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from instdisc.data.augment import MEAN, STD
from instdisc.data.decode import decode_rgb

FileSource = bytes | Path | Image.Image  # a file's bytes or path, or a decoded image


def draft_request(width: int, height: int, fraction: float) -> tuple[int, int] | None:
    """The size to ask `Image.draft` for so that at least `fraction` (<= 1) of the full
    resolution is kept each way; None when not even a 1/2 scale would keep it.

    Pillow decodes at 1/k for the largest k in (8, 4, 2) with width // request_w >= k and
    height // request_h >= k, so the decoded size is >= fraction * (width, height).
    """
    request = (max(1, math.ceil(width * fraction)), max(1, math.ceil(height * fraction)))
    if min(width // request[0], height // request[1]) < 2:
        return None
    return request


def draft_jpeg(image: Image.Image, fraction: float) -> float:
    """Set a not yet decoded JPEG to decode at the smallest DCT scale that keeps `fraction` of
    its resolution; returns the scale's divisor k (1.0: full size, also for other formats)."""
    if image.format != "JPEG":
        return 1.0
    width = image.size[0]
    request = draft_request(width, image.size[1], fraction)
    drafted = None if request is None else image.draft(image.mode, request)
    return 1.0 if drafted is None else width / drafted[1][2]  # box = (0, 0, width / k, ...)


def open_rgb(source: FileSource, before_load: Callable[[Image.Image], None]) -> Image.Image:
    """Decode `source` to RGB (as `decode_rgb`), calling `before_load` on the opened image."""
    if isinstance(source, Image.Image):
        before_load(source)  # the draws still happen; a loaded image ignores a draft
        return source if source.mode == "RGB" else source.convert("RGB")
    return decode_rgb(source, before_load=before_load)[0]


class ToNormalizedTensor:
    """PIL RGB image -> float (3, h, w), (pixels / 255 - mean) / std with torchvision's ops
    (PILToTensor, ToDtype(scale=True), Normalize), without their per-call dispatch."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)    # (3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))         # (h, w, 3)
        x = pixels.permute(2, 0, 1).to(torch.float32).mul_(1.0 / 255)       # (3, h, w)
        return x.sub(self.mean).div_(self.std)


class TrainFileTransform:
    """File -> augmented, normalised float (3, S, S); see the module docstring.

    `hue` defaults to `color_jitter` (capped at 0.5); jitter is applied with `jitter_prob`.
    `draft=False` decodes every file at full size (the plain v2 pipeline, bit for bit).
    """

    def __init__(self, image_size: int | tuple[int, int], crop_scale_min: float = 0.2,
                 color_jitter: float = 0.4, grayscale_prob: float = 0.2, hflip: bool = True,
                 hue: float | None = None, jitter_prob: float = 1.0,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 draft: bool = True) -> None:
        hue = min(color_jitter, 0.5) if hue is None else hue
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))  # (height, width)
        self.draft = draft
        self.crop = v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True)
        jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, hue)
        steps = [v2.RandomApply([jitter], p=jitter_prob) if jitter_prob < 1.0 else jitter,
                 v2.RandomGrayscale(grayscale_prob)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.colour = v2.Compose(steps)
        self.to_tensor = ToNormalizedTensor(mean, std)

    def __call__(self, source: FileSource) -> Tensor:
        plan: dict[str, Any] = {}

        def before_load(image: Image.Image) -> None:
            box = self.crop.make_params([image])  # top, left, height, width: v2's own draw
            plan["box"], plan["k"] = box, 1.0
            if self.draft:
                plan["k"] = draft_jpeg(image, max(self.size[0] / box["height"],
                                                  self.size[1] / box["width"]))

        image = open_rgb(source, before_load)
        box, k, (height, width) = plan["box"], plan["k"], self.size
        if k == 1.0:
            image = F.resized_crop(image, box["top"], box["left"], box["height"], box["width"],
                                   [height, width], antialias=True)
        else:  # the same box in the drafted image's coordinates (sub-pixel, no rounding)
            left, top = box["left"] / k, box["top"] / k
            image = image.resize((width, height), Image.Resampling.BILINEAR, box=(
                left, top, left + box["width"] / k, top + box["height"] / k))
        return self.to_tensor(self.colour(image))                           # (3, S, S)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop}, colour={self.colour}, "
                f"draft={self.draft})")


class EvalFileTransform:
    """File -> normalised float (3, S, S): shorter side to `resize` (default int(S / 0.875),
    256 for S = 224), then the centre S x S crop."""

    def __init__(self, image_size: int, resize: int | None = None,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 draft: bool = True) -> None:
        self.resize = int(image_size / 0.875) if resize is None else resize
        self.draft = draft
        self.steps = v2.Compose([v2.Resize(self.resize, antialias=True),
                                 v2.CenterCrop(image_size)])
        self.to_tensor = ToNormalizedTensor(mean, std)

    def __call__(self, source: FileSource) -> Tensor:
        def before_load(image: Image.Image) -> None:
            if self.draft:
                draft_jpeg(image, self.resize / min(image.size))

        return self.to_tensor(self.steps(open_rgb(source, before_load)))   # (3, S, S)


def train_file_transform(image_size: int | tuple[int, int], crop_scale_min: float = 0.2,
                         color_jitter: float = 0.4, grayscale_prob: float = 0.2,
                         hflip: bool = True, hue: float | None = None, jitter_prob: float = 1.0,
                         mean: Sequence[float] = MEAN,
                         std: Sequence[float] = STD) -> TrainFileTransform:
    """File -> normalised float (3, S, S): the paper's augmentation, per image."""
    return TrainFileTransform(image_size, crop_scale_min, color_jitter, grayscale_prob, hflip,
                              hue, jitter_prob, mean, std)


def eval_file_transform(image_size: int, resize: int | None = None,
                        mean: Sequence[float] = MEAN,
                        std: Sequence[float] = STD) -> EvalFileTransform:
    """File -> normalised float (3, S, S): resize, then the centre S x S crop."""
    return EvalFileTransform(image_size, resize, mean, std)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block and restored after.

    What `torch.random.fork_rng(devices=[])` + `torch.manual_seed(seed)` do for the CPU, without
    their device bookkeeping (0.2 ms a call on a CUDA build) and without reseeding the CUDA
    generators of the calling process (which a per-sample `torch.manual_seed` would do).
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
