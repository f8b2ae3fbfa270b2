"""The prepared dataset as the training loop sees it: augmented batches and monitor features."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from instdisc import runtime
from instdisc.config import PretrainParams
from instdisc.data import loaders
from instdisc.data.augment import MEAN, STD, BatchAugment
from instdisc.data.prepared import PreparedDataset, SplitData
from instdisc.evaluate import label_free
from instdisc.evaluate.knn import compute_features

log = logging.getLogger(__name__)


class TrainData:
    """Train split (augmented, sharded per rank) and test split (for the kNN monitor).

    In-memory splits are augmented batch-wise on the training device; file-backed splits go
    through DataLoader workers with the equivalent torchvision transforms.
    """

    def __init__(self, prepared: PreparedDataset, params: PretrainParams, device: torch.device,
                 dist: runtime.DistInfo, seed: int = 0) -> None:
        self.prepared = prepared
        self.params = params
        self.device = device
        self.dist = dist
        self.train = prepared.split("train")
        self.test = prepared.split("test") if "test" in prepared.meta["splits"] else None
        # The kNN monitor scores a fixed, class-stratified subset: prepared splits are sorted by
        # class, so the first images of the test split would all be of one class. Without labels
        # (an unlabelled source) there is nothing to score: knn_top1 is nan.
        self.monitor = None if self.test is None or params.monitor_queries == 0 \
            or not prepared.labeled else \
            self.test.subset(stratified_subset(self.test.labels, params.monitor_queries, seed))
        if not prepared.labeled:
            log.info("%s has no labels: the per-epoch kNN monitor is off", prepared.root)
        self.num_items = self.train.num_items
        self.num_classes = len(prepared.classes)
        self.train_labels = self.train.labels.to(device)                     # (n,)
        in_memory = self.train.storage == "array"
        size = tuple(self.train.image_size) if in_memory else (params.image_size,) * 2
        self.eval_image_size: tuple[int, int] = size
        self.eval_resize: int | None = None if in_memory else int(params.image_size / 0.875)
        self.mean, self.std = MEAN, STD
        if params.normalization == "dataset":
            if prepared.normalization is None:
                log.warning("%s has no channel statistics (prepared by an older version): "
                            "normalising with ImageNet's; re-run `instdisc prepare`",
                            prepared.root)
            else:
                self.mean, self.std = prepared.normalization
        self.augment = BatchAugment(
            out_size=size, crop_scale=(params.crop_scale_min, 1.0),
            color_jitter=params.color_jitter, grayscale_prob=params.grayscale_prob,
            hflip=params.hflip, hue=params.hue, jitter_prob=params.color_jitter_prob,
            mean=self.mean, std=self.std)
        # Held-out uint8 images for the per-epoch label-free metrics: the seeded subset that
        # `evaluate` scores with the same seed and count, so the last epoch's row matches it.
        self.label_free_images = None if self.test is None or params.monitor_label_free == 0 \
            else label_free.heldout_images(self.test, params.monitor_label_free, seed, size[0],
                                           self.eval_resize)                # (M, 3, H, W)
        self.file_transform = None if in_memory else loaders.train_file_transform(
            params.image_size, params.crop_scale_min, params.color_jitter,
            params.grayscale_prob, params.hflip, hue=params.hue,
            jitter_prob=params.color_jitter_prob, mean=self.mean, std=self.std)
        self.decode = loaders.resolve_decode(params.decode, device)  # "cpu" | "device" (files)

    def epoch_batches(self, seed: int, epoch: int) -> loaders.Batches:
        """One epoch of (images, indices) on the device.

        The shuffle is seeded by (seed, epoch), the same on every rank, so the shards partition
        the training set; then torch's global RNG is reseeded by (seed, epoch, rank) for this
        rank's augmentation and NCE noise.
        """
        torch.manual_seed(runtime.epoch_seed(seed, epoch))
        return loaders.train_batches(
            self.train, self.params.batch_size, self.augment, self.device,
            file_transform=self.file_transform, num_workers=self.params.num_workers,
            rank=self.dist.rank, world_size=self.dist.world_size,
            after_shard_seed=runtime.rank_seed(seed, epoch, self.dist.rank), decode=self.decode)

    def steps_per_epoch(self) -> int:
        """Training steps of one epoch on this rank (batches are full: drop_last)."""
        per_rank = self.num_items // self.dist.world_size
        return loaders.num_batches(per_rank, self.params.batch_size, drop_last=True)

    def monitor_features(self, encoder: nn.Module) -> tuple[Tensor, Tensor]:
        """Encoder features and labels of the monitor's fixed, class-stratified test subset."""
        assert self.monitor is not None, "no test split"
        return self.features(encoder, self.monitor), self.monitor.labels.to(self.device)

    def train_features(self, encoder: nn.Module) -> Tensor:
        """Encoder features of every training image, unaugmented (the bank's counterpart)."""
        return self.features(encoder, self.train)

    def features(self, encoder: nn.Module, split: SplitData) -> Tensor:
        """Encoder features (N, D) of `split`'s images, unaugmented, as evaluation reads them."""
        batches = loaders.eval_batches(split, 256, self.device,
                                       image_size=self.eval_image_size[0], resize=self.eval_resize,
                                       num_workers=min(2, self.params.num_workers),
                                       mean=self.mean, std=self.std)
        return compute_features(encoder, batches, split.num_items, self.device, progress=False)

    def label_free_metrics(self, encoder: nn.Module, seed: int) -> dict[str, float]:
        """Alignment, alignment ratio, uniformity and augmentation retrieval of `encoder` on the
        held-out images ({} when off or without a test split), as `evaluate` measures them."""
        if self.label_free_images is None:
            return {}
        scores = label_free.label_free_metrics(encoder, self.label_free_images, self.augment,
                                               mean=self.mean, std=self.std, batch_size=256,
                                               device=self.device, seed=seed)
        return {name: scores[name] for name in label_free.METRICS}


def stratified_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """`count` indices into `labels`, as equal per class as possible, drawn with `seed`.

    Every class's indices are shuffled by a generator seeded with `seed`, then taken round-robin
    over the classes (class order by label), so any prefix is balanced. int64 (min(count, N),).
    """
    generator = torch.Generator().manual_seed(seed)
    per_class = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()                 # (N_c,)
        per_class.append(members[torch.randperm(len(members), generator=generator)])
    depth = max(len(m) for m in per_class)
    rows = torch.full((depth, len(per_class)), -1, dtype=torch.long)       # (depth, C)
    for c, members in enumerate(per_class):
        rows[:len(members), c] = members
    order = rows.flatten()                                                 # round-robin
    return order[order >= 0][:count]                                       # (count,)
