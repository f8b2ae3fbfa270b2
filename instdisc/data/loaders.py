"""Batches of a prepared split: (normalised float images on the device, indices on the device).

Two paths, one interface:
- array storage: the whole uint8 split is copied to the device once (cached on the `SplitData`)
  and whole batches are gathered and augmented there by `BatchAugment`;
- manifest storage: a `FileDataset` decodes files in DataLoader workers (persistent, pinned memory
  on CUDA) with the per-image transforms of `instdisc.data.file_transforms`; or, for training with
  decode "device", workers only read the bytes and `instdisc.data.device_decode` decodes and
  augments each batch on the device.

Shuffling uses `torch.randperm` on torch's global CPU RNG, so a reseeded epoch is reproduced exactly
(docs/DESIGN.md, "Random numbers"); under DDP every rank draws the same permutation and keeps its
strided shard. File transforms (and the device path's crops) are seeded per sample from that same
RNG, whichever worker runs them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from instdisc.data.augment import MEAN, STD, BatchAugment, eval_transform
from instdisc.data.decode import decode_rgb
from instdisc.data.device_decode import (DeviceDecoder, FileBytesDataset, collate_bytes,
                                         resolve_decode)
from instdisc.data.file_transforms import (EvalFileTransform, TrainFileTransform,
                                           eval_file_transform, seeded_cpu_rng,
                                           train_file_transform)
from instdisc.data.prepared import SplitData

__all__ = ["Batches", "FileDataset", "TrainLoader", "eval_batches", "eval_file_transform",
           "num_batches", "resolve_decode", "shard_order", "train_batches",
           "train_file_transform"]

Batches = Iterator[tuple[Tensor, Tensor]]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches `n` items make."""
    return n // batch_size if drop_last else -(-n // batch_size)


def shard_order(n: int, rank: int = 0, world_size: int = 1, drop_last: bool = True) -> Tensor:
    """This rank's share of one `torch.randperm(n)` (global RNG): int64 (n // world_size or so,).

    With drop_last the permutation is first cut to a multiple of world_size, so every rank gets
    the same number of items (DDP needs equal step counts); otherwise the shards cover all n.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    order = torch.randperm(n)                                              # (n,)
    if drop_last:
        order = order[:n // world_size * world_size]
    return order[rank::world_size]                                         # (~n / world_size,)


class TrainLoader:
    """`train_batches` with its arguments fixed: every `iter()` is a new shuffled epoch."""

    def __init__(self, split: SplitData, batch_size: int, augment: BatchAugment,
                 device: torch.device | str, *, file_transform: Callable | None = None,
                 num_workers: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, decode: str = "cpu") -> None:
        self.split, self.batch_size, self.augment, self.device = split, batch_size, augment, device
        self.options = dict(file_transform=file_transform, num_workers=num_workers,
                            drop_last=drop_last, rank=rank, world_size=world_size, decode=decode)

    def __iter__(self) -> Batches:
        return train_batches(self.split, self.batch_size, self.augment, self.device,
                             **self.options)

    def __len__(self) -> int:
        n, rank, world = self.split.num_items, self.options["rank"], self.options["world_size"]
        drop_last = self.options["drop_last"]
        per_rank = n // world if drop_last else len(range(rank, n, world))
        return num_batches(per_rank, self.batch_size, drop_last)


def train_batches(split: SplitData, batch_size: int, augment: BatchAugment,
                  device: torch.device | str, *, file_transform: Callable | None = None,
                  num_workers: int = 0, drop_last: bool = True, rank: int = 0,
                  world_size: int = 1, after_shard_seed: int | None = None,
                  decode: str = "cpu") -> Batches:
    """One shuffled epoch of augmented batches: (float (B, 3, h, w), int64 (B,)), both on `device`.

    The permutation is drawn from torch's global RNG when this is called (the same on every
    rank); then, if `after_shard_seed` is given, the global RNG is reseeded with it, so the
    augmentation draws (and whatever the caller draws next) are this rank's own. Array splits
    are augmented on `device` by `augment`; manifest splits by `file_transform` in workers
    (default: `train_file_transform` with `augment`'s settings), or, with `decode` "device"
    ("auto": on CUDA), decoded and augmented batch-wise on `device` by `DeviceDecoder` with
    `augment`'s settings (`file_transform` is then not used).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    decode = resolve_decode(decode, device)
    order = shard_order(split.num_items, rank, world_size, drop_last)      # (n_rank,)
    if after_shard_seed is not None:
        torch.manual_seed(after_shard_seed)
    count = num_batches(len(order), batch_size, drop_last)
    if split.storage == "array":
        return _array_batches(split.images_on(device), order.to(device), batch_size, count,
                              augment)
    seeds = torch.randint(0, 2**62, (len(order),))                         # (n_rank,)
    batches = [list(zip(order[i * batch_size:(i + 1) * batch_size].tolist(),
                        seeds[i * batch_size:(i + 1) * batch_size].tolist()))
               for i in range(count)]
    if decode == "device":
        return _device_batches(split, augment, batches, device, num_workers)
    if file_transform is None:
        file_transform = _default_train_transform(augment)
    return _file_batches(split, "train", file_transform, batches, device, num_workers)


def eval_batches(split: SplitData, batch_size: int, device: torch.device | str, *,
                 image_size: int | None = None, resize: int | None = None, num_workers: int = 0,
                 limit: int | None = None, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> Batches:
    """Items 0..n-1 (or 0..limit-1) in order, unaugmented: (float (B, 3, h, w), int64 (B,)).

    Array splits keep their size unless `image_size` is given (then resized to a square; `resize`
    is ignored). Manifest splits need `image_size`: `eval_file_transform(image_size, resize)`.
    Pixels are normalised with `mean`/`std` (the encoder's, from its `preprocess` metadata).
    """
    device = torch.device(device)
    mean, std = tuple(mean), tuple(std)
    n = split.num_items if limit is None else min(limit, split.num_items)
    if split.storage == "array":
        images = split.images_on(device)                                   # (N, 3, H, W) uint8
        return ((eval_transform(images[i:min(i + batch_size, n)], image_size, mean, std),
                 torch.arange(i, min(i + batch_size, n), device=device))
                for i in range(0, n, batch_size))
    if image_size is None:
        raise ValueError(f"split {split.name!r} is stored as files: eval_batches needs image_size")
    batches = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    return _file_batches(split, "eval", _eval_file_transform(image_size, resize, mean, std),
                         batches, device, num_workers)


_eval_file_transform = functools.lru_cache(maxsize=8)(eval_file_transform)  # stable ids, see below


class FileDataset(Dataset):
    """Files of a manifest split; item `(index, seed)` -> (transformed image, index).

    The transform runs with torch's CPU generator seeded with `seed` (`seeded_cpu_rng`), so the
    result does not depend on which worker (or the main process) runs it, and the caller's RNG
    is left alone. A `TrainFileTransform` or `EvalFileTransform` gets the file's path and decodes
    it itself (drafting large JPEGs); any other transform gets the decoded RGB PIL image.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        source = self.paths[index]
        if not isinstance(self.transform, (TrainFileTransform, EvalFileTransform)):
            source, _ = decode_rgb(source)
        with seeded_cpu_rng(seed):
            return self.transform(source), index                           # (3, S, S)


class _EpochBatches:
    """A batch sampler whose batches are replaced every epoch (lets workers persist)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# Per split and role ("train", "eval", "train-bytes"): one DataLoader whose workers persist
# across epochs.
# Entries go away with the split.
_LOADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loader(split: SplitData, role: str, key: tuple, make: Callable[[], Dataset],
            batches: list[list[tuple[int, int]]], num_workers: int, pin_memory: bool,
            collate: Callable | None = None, keep: object = None) -> DataLoader:
    """The persistent DataLoader of (split, role), rebuilt when `key` changes; `keep` is held
    with it (a transform whose id is part of the key stays alive, so the id stays unique)."""
    roles = _LOADERS.setdefault(split, {})
    if role not in roles or roles[role][0] != key:
        sampler = _EpochBatches()
        loader = DataLoader(make(), batch_sampler=sampler, num_workers=num_workers,
                            persistent_workers=num_workers > 0, pin_memory=pin_memory,
                            collate_fn=collate)
        roles[role] = (key, loader, sampler, keep)
    _, loader, sampler, _ = roles[role]
    sampler.batches = batches
    return loader


def _file_batches(split: SplitData, role: str, transform: Callable,
                  batches: list[list[tuple[int, int]]], device: torch.device,
                  num_workers: int) -> Batches:
    loader = _loader(split, role, (id(transform), num_workers, device.type),
                     lambda: FileDataset(split.paths, transform), batches, num_workers,
                     pin_memory=device.type == "cuda", keep=transform)

    def generate() -> Batches:
        for images, indices in loader:
            yield (images.to(device, non_blocking=True),                   # (B, 3, S, S)
                   indices.to(device, non_blocking=True))                  # (B,)
    return generate()


def _device_batches(split: SplitData, augment: BatchAugment,
                    batches: list[list[tuple[int, int]]], device: torch.device,
                    num_workers: int) -> Batches:
    """Workers read bytes; each batch is decoded and augmented on `device` (`DeviceDecoder`)."""
    loader = _loader(split, "train-bytes", (num_workers,), lambda: FileBytesDataset(split.paths),
                     batches, num_workers, pin_memory=False, collate=collate_bytes)
    decoder = DeviceDecoder(augment, device)

    def generate() -> Batches:
        for data, indices, seeds in loader:
            yield decoder(data, seeds), indices.to(device, non_blocking=True)  # (B, 3, h, w), (B,)
    return generate()


_DEFAULT_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _default_train_transform(augment: BatchAugment) -> TrainFileTransform:
    """`train_file_transform` with `augment`'s settings, built once per augment module."""
    if augment not in _DEFAULT_TRANSFORMS:
        _DEFAULT_TRANSFORMS[augment] = train_file_transform(
            augment.out_size, augment.crop_scale[0], augment.color_jitter,
            augment.grayscale_prob, augment.hflip, augment.hue, augment.jitter_prob,
            augment.mean.flatten().tolist(), augment.std.flatten().tolist())
    return _DEFAULT_TRANSFORMS[augment]


def _array_batches(images: Tensor, order: Tensor, batch_size: int, count: int,
                   augment: BatchAugment) -> Batches:
    for i in range(count):
        indices = order[i * batch_size:(i + 1) * batch_size]               # (B,)
        yield augment(images[indices]), indices                            # (B, 3, S, S), (B,)
