"""Batched data augmentation on any device: every sample gets its own random parameters.

`BatchAugment` is the augmentation of Wu et al. 2018 (arXiv:1805.01978, Sec. 4; lemniscate's
RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(0.2),
RandomHorizontalFlip) written as a handful of whole-batch tensor ops instead of a per-image PIL
pipeline: the crop and the flip are one `F.grid_sample` with a per-sample grid, and saturation,
hue and grayscale are one per-sample 3x3 colour matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet statistics, as in torchvision's references: the default where a dataset's own (stored by
# `prepare`, see PreparedDataset.normalization) is not given.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params


def normalize(x: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """(x - mean) / std per channel; x float (B, 3, H, W) with values in [0, 1]."""
    mean_t, std_t = _mean_std(x.device, x.dtype, tuple(mean), tuple(std))  # (1, 3, 1, 1) each
    return (x - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, dtype: torch.dtype, mean: tuple[float, ...],
              std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """mean and std as (1, 3, 1, 1) tensors, made once per device (no host copy per batch)."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1))


def channels_first(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> (B, 3, H, W); channels-last when dim -1 is 3."""
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"expected images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[3] == 3 and images.shape[1] != 3:
        return images.permute(0, 3, 1, 2)  # (B, 3, H, W), a view
    return images


def eval_transform(images: Tensor, size: int | None = None, mean: Sequence[float] = MEAN,
                   std: Sequence[float] = STD) -> Tensor:
    """uint8 images -> normalised float (B, 3, S, S); resized (bilinear, antialiased) if `size`."""
    x = channels_first(images).float().div_(255)  # (B, 3, H, W) in [0, 1]
    if size is not None and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)  # (B, 3, S, S)
    return normalize(x, mean, std)


class BatchAugment(nn.Module):
    """Random resized crop, colour jitter, grayscale and flip for a whole uint8 batch.

    Crop areas and aspect ratios follow torchvision's RandomResizedCrop.get_params (area
    U(scale) * H * W, log-aspect uniform, 10 tries, the same fallback; checked distribution-wise
    in tests/data/test_augment.py); brightness, contrast, saturation factors are
    U(1 - jitter, 1 + jitter), hue shifts U(-hue, hue), the jitter is applied with probability
    `jitter_prob` (torchvision's RandomApply), and contrast, saturation and grayscale use its
    luma weights. Differences from the torchvision pipeline, all deliberate for speed:
    - crop boxes are continuous (sub-pixel, not rounded to whole pixels) and resampled
      bilinearly without antialiasing (upsampling, as on 32x32 CIFAR crops, needs none);
    - jitter runs in a fixed order: brightness, contrast, then saturation, hue and grayscale as
      one per-sample 3x3 matrix (so no clamp between those three); torchvision draws a random
      order of the four per image;
    - hue is a rotation about the gray axis of RGB space by 2*pi*h, which approximates
      torchvision's HSV hue shift by h (see `_hue_matrix`).
    On CIFAR-10 (docs/fidelity.md) hue 0.4, the paper's, costs kNN points against hue 0 (the
    PretrainParams default); on the embedded set, whose colours are a nuisance, it is needed.
    """

    def __init__(self, out_size: int | tuple[int, int],
                 crop_scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4,
                 grayscale_prob: float = 0.2, hflip: bool = True, hue: float | None = None,
                 jitter_prob: float = 1.0, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> None:
        super().__init__()
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"out_size must be an int or (height, width) >= 1, got {out_size}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0.0 <= color_jitter <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter}")
        if not 0.0 <= grayscale_prob <= 1.0:
            raise ValueError(f"grayscale_prob must be in [0, 1], got {grayscale_prob}")
        hue = color_jitter if hue is None else hue
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if not 0.0 <= jitter_prob <= 1.0:
            raise ValueError(f"jitter_prob must be in [0, 1], got {jitter_prob}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values (std > 0), got {mean}, {std}")
        self.out_size: tuple[int, int] = (int(size[0]), int(size[1]))  # (height, width)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.color_jitter = float(color_jitter)
        self.grayscale_prob = float(grayscale_prob)
        self.hflip = hflip
        self.hue = float(hue)
        self.jitter_prob = float(jitter_prob)
        self.register_buffer("luma", torch.tensor(LUMA), persistent=False)            # (3,)
        k = 1 / math.sqrt(3)  # the unit gray axis is (k, k, k)
        self.register_buffer("gray_cross", torch.tensor(
            [[0, -k, k], [k, 0, -k], [-k, k, 0]]), persistent=False)  # [axis]_x, (3, 3)
        self.register_buffer("mean", torch.tensor(tuple(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std)).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, crop_scale={self.crop_scale}, ratio={self.ratio}, "
                f"color_jitter={self.color_jitter}, hue={self.hue}, "
                f"jitter_prob={self.jitter_prob}, grayscale_prob={self.grayscale_prob}, "
                f"hflip={self.hflip}, mean={tuple(self.mean.flatten().tolist())}, "
                f"std={tuple(self.std.flatten().tolist())}")

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) -> normalised float32 (B, 3, *out_size).

        Random numbers come from `generator` (on its device) or else from the global RNG of the
        images' device, so a seeded run is reproducible on the same device.
        """
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        x = channels_first(images)                                         # (B, 3, H, W)
        B, device = x.shape[0], x.device
        if self.luma.device != device:
            self.to(device)  # once: the constants follow the images (no host copies per batch)
        gen_device = generator.device if generator is not None else device
        u = torch.rand(B, 2 * _CROP_TRIES + 9, generator=generator, device=gen_device)  # (B, 29)
        u = u.to(device)
        grid = self._crop_grid(u[:, :2 * _CROP_TRIES + 3], x.shape[2], x.shape[3])  # (B, h, w, 2)
        x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)                             # (B, 3, h, w), 0..255
        return self._color(x, u[:, 2 * _CROP_TRIES + 3:])

    @torch.no_grad()
    def augment_crops(self, crops: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`forward` without the crop, for crops already made: (B, 3, h, w) uint8, or float
        with values 0..255 -> flipped, jittered, grayscaled, normalised float32 (B, 3, h, w).

        The file path's device decode (`instdisc.data.device_decode`) crops each image itself.
        """
        x = channels_first(crops)                                          # (B, 3, h, w)
        B, device = x.shape[0], x.device
        if self.luma.device != device:
            self.to(device)
        gen_device = generator.device if generator is not None else device
        u = torch.rand(B, 7, generator=generator, device=gen_device).to(device)  # (B, 7)
        flip = ((u[:, 6] < 0.5) & self.hflip).view(B, 1, 1, 1)            # (B, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x).float()                        # (B, 3, h, w), a copy
        return self._color(x, u[:, :6])

    def _crop_grid(self, u: Tensor, H: int, W: int) -> Tensor:
        """RandomResizedCrop + flip as a `grid_sample` grid (B, h, w, 2). u: (B, 2*tries+3).

        The map is axis-aligned, so the grid is built from (B, w) and (B, h) coordinate rows
        instead of by `F.affine_grid` (a (B, h*w, 3) matmul, slower than the sampling itself).
        """
        x0, y0, w, h, flip = self.crop_boxes(u, H, W)                      # (B,) each
        # Output pixel centres in [-1, 1] (align_corners=False), mapped into the crop box.
        out_h, out_w = self.out_size
        cx = (2 * torch.arange(out_w, device=u.device) + 1) / out_w - 1   # (w,)
        cy = (2 * torch.arange(out_h, device=u.device) + 1) / out_h - 1   # (h,)
        gx = torch.where(flip, -w, w)[:, None] / W * cx + ((2 * x0 + w) / W - 1)[:, None]  # (B, w)
        gy = (h / H)[:, None] * cy + ((2 * y0 + h) / H - 1)[:, None]       # (B, h)
        return torch.stack([gx[:, None, :].expand(-1, out_h, -1),
                            gy[:, :, None].expand(-1, -1, out_w)], dim=-1)  # (B, h, w, 2)

    def crop_boxes(self, u: Tensor, H: int, W: int) -> tuple[Tensor, ...]:
        """Crop boxes as torchvision's RandomResizedCrop.get_params draws them, from uniforms
        u (B, 2*tries+3): (left, top, width, height) in pixels (continuous) and flip, (B,) each.
        """
        tries = _CROP_TRIES
        lo, hi = self.crop_scale
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = H * W * (lo + (hi - lo) * u[:, :tries])                     # (B, tries)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, tries:2 * tries])  # (B, tries)
        w = torch.sqrt(area * aspect)                                      # (B, tries)
        h = torch.sqrt(area / aspect)                                      # (B, tries)
        ok = (w <= W) & (h <= H)                                           # (B, tries)
        first = ok.int().argmax(dim=1, keepdim=True)                       # (B, 1), first success
        # Fallback as torchvision: the whole image, cropped to the nearest allowed aspect ratio.
        in_ratio = W / H
        fb_w = W if in_ratio <= self.ratio[1] else H * self.ratio[1]
        fb_h = H if in_ratio >= self.ratio[0] else W / self.ratio[0]
        any_ok = ok.any(dim=1)                                             # (B,)
        w = torch.where(any_ok, w.gather(1, first).squeeze(1), torch.full_like(any_ok, fb_w,
                        dtype=w.dtype))                                     # (B,)
        h = torch.where(any_ok, h.gather(1, first).squeeze(1), torch.full_like(any_ok, fb_h,
                        dtype=h.dtype))                                     # (B,)
        x0 = u[:, 2 * tries] * (W - w)                                     # (B,) left edge, pixels
        y0 = u[:, 2 * tries + 1] * (H - h)                                 # (B,) top edge
        flip = (u[:, 2 * tries + 2] < 0.5) & self.hflip                    # (B,)
        return x0, y0, w, h, flip

    def _color(self, x: Tensor, u: Tensor) -> Tensor:
        """Jitter, grayscale and normalise x (B, 3, h, w) with values 0..255; u: (B, 6) uniforms.

        Jitter is applied to a sample with probability `jitter_prob` (torchvision's
        RandomApply([ColorJitter], p)); a sample that skips it keeps factors 1 and hue 0.
        """
        B, s = x.shape[0], self.color_jitter
        luma, mean_rgb, std_rgb = self.luma, self.mean, self.std
        apply = (u[:, 5] < self.jitter_prob).to(x.dtype)                   # (B,) 1 = jitter
        brightness = 1 + apply * s * (2 * u[:, 0] - 1)                     # (B,) in [1-s, 1+s]
        contrast = 1 + apply * s * (2 * u[:, 1] - 1)                       # (B,)
        saturation = 1 + apply * s * (2 * u[:, 2] - 1)                     # (B,)
        hue = apply * 2 * math.pi * self.hue * (2 * u[:, 3] - 1)           # (B,) radians
        if s > 0 or self.hue > 0:
            x.mul_((brightness / 255).view(B, 1, 1, 1)).clamp_(0, 1)
            # Contrast blends towards the mean luma: the luma of the per-channel means.
            mean = (x.mean(dim=(2, 3)) @ luma).view(B, 1, 1, 1)            # (B, 1, 1, 1)
            c = contrast.view(B, 1, 1, 1)
            x.mul_(c).add_((1 - c) * mean).clamp_(0, 1)
        else:
            x.div_(255)
            if self.grayscale_prob == 0:
                return x.sub_(mean_rgb).div_(std_rgb)
        gray = u[:, 4] < self.grayscale_prob                               # (B,)
        matrix = _hue_matrix(hue, self.gray_cross) @ _blend_matrix(saturation, luma)  # (B, 3, 3)
        to_gray = _blend_matrix(torch.zeros_like(hue), luma)               # (B, 3, 3)
        matrix = torch.where(gray.view(B, 1, 1), to_gray @ matrix, matrix)  # (B, 3, 3)
        x = torch.bmm(matrix, x.flatten(2)).view_as(x).clamp_(0, 1)        # (B, 3, h, w)
        return x.sub_(mean_rgb).div_(std_rgb)


def _blend_matrix(factor: Tensor, luma: Tensor) -> Tensor:
    """factor * x + (1 - factor) * gray(x) as matrices (B, 3, 3): saturation; 0 is grayscale."""
    eye = torch.eye(3, device=factor.device)                               # (3, 3)
    gray = luma.expand(3, 3)                                               # (3, 3), rows = luma
    f = factor.view(-1, 1, 1)
    return f * eye + (1 - f) * gray                                        # (B, 3, 3)


def _hue_matrix(angle: Tensor, cross: Tensor) -> Tensor:
    """Rotations by `angle` (B,) about the gray axis of RGB space: (B, 3, 3).

    This approximates torchvision's HSV hue shift by angle / (2 pi): exact for shifts by thirds
    of the circle, and a mean |difference| of 0.04-0.07 for shifts of 0.05-0.4 on uniform random
    colours, against 0.05-0.38 for no shift at all. `cross` is the cross-product
    matrix of the unit gray axis (`BatchAugment.gray_cross`); Rodrigues' formula.
    """
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    eye = torch.eye(3, device=angle.device)                                # (3, 3)
    axis = torch.full((3, 3), 1 / 3, device=angle.device)                 # k k^T, (3, 3)
    return cos * eye + (1 - cos) * axis + sin * cross                     # (B, 3, 3)
