"""The prepared dataset as the training loop sees it: augmented batches and monitor features."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from instdisc import runtime
from instdisc.config import PretrainParams
from instdisc.data import loaders
from instdisc.data.augment import BatchAugment
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate.knn import compute_features

log = logging.getLogger(__name__)


class TrainData:
    """Train split (augmented, sharded per rank) and test split (for the kNN monitor).

    In-memory splits are augmented batch-wise on the training device; file-backed splits go
    through DataLoader workers with the equivalent torchvision transforms.
    """

    def __init__(self, prepared: PreparedDataset, params: PretrainParams, device: torch.device,
                 dist: runtime.DistInfo) -> None:
        self.prepared = prepared
        self.params = params
        self.device = device
        self.dist = dist
        self.train = prepared.split("train")
        self.test = prepared.split("test") if "test" in prepared.meta["splits"] else None
        self.num_items = self.train.num_items
        self.num_classes = len(prepared.classes)
        self.train_labels = self.train.labels.to(device)                     # (n,)
        in_memory = self.train.storage == "array"
        size = tuple(self.train.image_size) if in_memory else (params.image_size,) * 2
        self.eval_image_size: tuple[int, int] = size
        self.eval_resize: int | None = None if in_memory else int(params.image_size / 0.875)
        self.augment = BatchAugment(
            out_size=size, crop_scale=(params.crop_scale_min, 1.0),
            color_jitter=params.color_jitter, grayscale_prob=params.grayscale_prob,
            hflip=params.hflip)
        self.file_transform = None if in_memory else loaders.train_file_transform(
            params.image_size, params.crop_scale_min, params.color_jitter,
            params.grayscale_prob, params.hflip)

    def epoch_batches(self) -> loaders.Batches:
        """One epoch of (images, indices) on the device, reshuffled from torch's global RNG."""
        return loaders.train_batches(
            self.train, self.params.batch_size, self.augment, self.device,
            file_transform=self.file_transform, num_workers=self.params.num_workers,
            rank=self.dist.rank, world_size=self.dist.world_size)

    def test_features(self, encoder: nn.Module, num_queries: int) -> tuple[Tensor, Tensor]:
        """Encoder features and labels of the first `num_queries` test images."""
        assert self.test is not None, "no test split"
        count = min(num_queries, self.test.num_items)
        batches = loaders.eval_batches(self.test, 256, self.device,
                                       image_size=self.eval_image_size[0], resize=self.eval_resize,
                                       num_workers=min(2, self.params.num_workers), limit=count)
        features = compute_features(encoder, batches, count, self.device, progress=False)
        return features, self.test.labels[:count].to(self.device)
