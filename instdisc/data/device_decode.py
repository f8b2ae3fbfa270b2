"""File-backed training batches decoded on the training device (`pretrain.decode`).

With decode "device" ("auto" picks it on CUDA; the default is "cpu"), DataLoader workers read
bytes (`FileBytesDataset`); the main process then, per batch:

1. decodes every JPEG in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on
   CUDA; libjpeg-turbo on the CPU, which is how the tests run this very path), and any other
   file, or a JPEG that call rejects, with Pillow (`decode_rgb`);
2. crops every image with RandomResizedCrop's box, drawn from the sample's own seed exactly as
   the CPU path (`TrainFileTransform`) draws it, and resizes it to S x S on the device (torch's
   antialiased bilinear);
3. flips, jitters, grayscales and normalises the S x S batch in one go (`BatchAugment`).

The crops are those of the CPU path; the colour augmentation is `BatchAugment`'s (its docstring
lists how it differs from torchvision's: fixed op order, hue as a rotation about the gray axis).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import io as tv_io
from torchvision.transforms import v2

from instdisc.data.augment import BatchAugment
from instdisc.data.decode import decode_rgb
from instdisc.data.file_transforms import seeded_cpu_rng

DECODES = ("auto", "cpu", "device")
JPEG_MAGIC = b"\xff\xd8\xff"


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """"cpu" or "device": `auto` is "device" on CUDA (nvJPEG) and "cpu" elsewhere."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {list(DECODES)}, got {decode!r}")
    if decode == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return decode


class FileBytesDataset(Dataset):
    """Item `(index, seed)` -> (the file's bytes as uint8 (n,), index, seed): no decoding."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = key
        data = bytearray(Path(self.paths[index]).read_bytes())
        return torch.frombuffer(data, dtype=torch.uint8), index, seed      # (n,)


def collate_bytes(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """A batch of `FileBytesDataset` items: ([uint8 (n_i,)], int64 (B,) indices, (B,) seeds)."""
    data, indices, seeds = zip(*items)
    return list(data), torch.tensor(indices), torch.tensor(seeds)


def decode_images(data: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """File bytes (uint8 (n_i,) on the CPU) -> RGB uint8 (3, H_i, W_i) on `device`, in order."""
    out: list[Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    if jpegs:
        for i, image in zip(jpegs, _decode_jpegs([data[i] for i in jpegs], device)):
            out[i] = image
    for i, image in enumerate(out):
        if image is None:  # not a JPEG, or one the JPEG decoder rejects (CMYK on nvJPEG, ...)
            pixels = np.asarray(decode_rgb(data[i].numpy().tobytes())[0])  # (H, W, 3)
            out[i] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(device)  # (3, H, W)
    return out  # type: ignore[return-value]


def _decode_jpegs(data: list[Tensor], device: torch.device | str) -> list[Tensor | None]:
    """One batched decode_jpeg call; if it fails, one call per image (None where that fails)."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(tv_io.decode_jpeg(data, mode=tv_io.ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        decoded: list[Tensor | None] = []
        for d in data:
            try:
                decoded.append(tv_io.decode_jpeg(d, mode=tv_io.ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


class DeviceDecoder:
    """(file bytes, seeds) of one batch -> augmented float (B, 3, h, w) on `device`.

    `augment` gives the output size, crop scale and ratio, and the colour augmentation.
    """

    def __init__(self, augment: BatchAugment, device: torch.device | str) -> None:
        self.augment = augment
        self.device = torch.device(device)
        self.crop = v2.RandomResizedCrop(augment.out_size, scale=augment.crop_scale,
                                         ratio=augment.ratio, antialias=True)

    def crop_boxes(self, images: Sequence[Tensor], seeds: Sequence[int]) -> list[dict[str, int]]:
        """RandomResizedCrop boxes {top, left, height, width}, each drawn under its seed."""
        boxes = []
        for image, seed in zip(images, seeds):
            with seeded_cpu_rng(int(seed)):
                boxes.append(self.crop.make_params([image]))  # reads only the shape
        return boxes

    def __call__(self, data: Sequence[Tensor], seeds: Tensor) -> Tensor:
        images = decode_images(data, self.device)                         # [(3, H_i, W_i)]
        boxes = self.crop_boxes(images, seeds.tolist())
        out_h, out_w = self.augment.out_size
        crops = torch.empty(len(images), 3, out_h, out_w, device=self.device)  # (B, 3, h, w)
        for i, (image, box) in enumerate(zip(images, boxes)):
            region = image[:, box["top"]:box["top"] + box["height"],
                           box["left"]:box["left"] + box["width"]]         # (3, h_i, w_i)
            crops[i] = F.interpolate(region[None].float(), size=(out_h, out_w), mode="bilinear",
                                     align_corners=False, antialias=True)[0]  # (3, h, w)
        return self.augment.augment_crops(crops.clamp_(0, 255))           # (B, 3, h, w)
