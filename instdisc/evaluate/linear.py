"""Linear classifiers on frozen conv1..conv5 features (Wu et al. 2018, arXiv:1805.01978, Sec. 4.2).

The paper's Table 2 (ImageNet) and Table 3 (Places) train one linear classifier per ResNet stage on
the features of the frozen network, each stage's map average-pooled to a small spatial grid
(~9000 dimensions per layer). Here the grid of a stage with C channels is g x g with
g = round(sqrt(target_dim / C)), clamped to [1, H], so every layer gives about `target_dim`
features (C * g * g; 2048 by default for CPU runs instead of ~9000).

Protocol:
1. the encoder is frozen (eval mode, `requires_grad=False` everywhere) and run once over each
   split without augmentation; the pooled features are cached in memory, (N, C*g*g) per layer;
2. every feature is standardised with the mean and std of the training features (a fixed affine
   map, not learned; it only makes one learning rate fit all layers);
3. one `nn.Linear(C*g*g, num_classes)` per layer is trained with cross-entropy for `epochs`
   passes (SGD with momentum or Adam, cosine-decayed learning rate); only these heads have
   `requires_grad`, which `check_frozen` asserts;
4. top-1 accuracy (%) on the test split, per layer.

Memory: N * target_dim * 4 bytes per layer and split (50k CIFAR images, 9000 dims: 1.8 GB).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from instdisc import checkpoint, runtime
from instdisc.config import LinearParams
from instdisc.data import loaders
from instdisc.data.augment import MEAN, STD
from instdisc.data.prepared import PreparedDataset, SplitData
from instdisc.models.encoder import build_encoder

log = logging.getLogger(__name__)


def grid_size(channels: int, height: int, target_dim: int) -> int:
    """Side g of the pooling grid: round(sqrt(target_dim / channels)), clamped to [1, height]."""
    return max(1, min(height, round(math.sqrt(target_dim / channels))))


def freeze(encoder: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses running statistics) and no gradients, for every parameter."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def check_frozen(encoder: nn.Module, heads: nn.Module) -> None:
    """Assert that only the heads are trainable (the encoder is a fixed feature extractor)."""
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert not trainable, f"encoder parameters must be frozen, found trainable {trainable[:3]}"
    assert all(p.requires_grad for p in heads.parameters()), "every head parameter must train"


@torch.no_grad()
def stage_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_items: int,
                   layers: Sequence[str], target_dim: int,
                   progress: bool = True) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Pooled, flattened features of `layers` for `num_items` images: ({layer: (N, C*g*g)}, grids).

    `batches` yields (images, indices) on one device; row i of every output is image i. The grid
    of each layer is fixed by the first batch (same image size throughout).
    """
    features: dict[str, Tensor] = {}
    grids: dict[str, int] = {}
    show = progress and sys.stderr.isatty()
    for images, indices in tqdm(batches, disable=not show, desc="features", leave=False):
        maps = encoder.stages(images)                                   # {layer: (B, C, H, W)}
        for name in layers:
            fmap = maps[name]
            if name not in grids:
                grids[name] = grid_size(fmap.shape[1], fmap.shape[2], target_dim)
                dim = fmap.shape[1] * grids[name] ** 2
                features[name] = torch.zeros(num_items, dim, device=images.device)  # (N, C*g*g)
            pooled = F.adaptive_avg_pool2d(fmap.float(), grids[name])  # (B, C, g, g)
            features[name][indices] = pooled.flatten(1)                 # (B, C*g*g)
    if not features:
        raise ValueError("batches yielded no images; cannot compute features")
    return features, grids


def standardize(train: Tensor, test: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(x - mean) / std with the training rows' statistics, applied to both splits."""
    mean = train.mean(dim=0, keepdim=True)                              # (1, D)
    std = train.std(dim=0, keepdim=True).clamp_min(eps)                 # (1, D)
    return (train - mean) / std, (test - mean) / std


def train_heads(features: dict[str, Tensor], labels: Tensor, num_classes: int, *, epochs: int,
                batch_size: int, lr: float, optimizer: str = "adam", momentum: float = 0.9,
                weight_decay: float = 0.0, seed: int = 0) -> nn.ModuleDict:
    """One linear head per layer, all trained in the same loop on the cached features.

    The heads are independent (a sum of per-layer losses has per-head gradients), so training them
    together costs one pass over the batches. The shuffle comes from a generator seeded by `seed`.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    device = labels.device
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded head init, caller's RNG left alone
        torch.manual_seed(seed)
        heads = nn.ModuleDict({n: nn.Linear(x.shape[1], num_classes) for n, x in features.items()})
    heads.to(device).train()
    params = list(heads.parameters())
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam" else
           torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    n = len(labels)
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in tqdm(range(epochs), desc="linear heads", disable=not sys.stderr.isatty(), leave=False):
        order = torch.randperm(n, generator=generator).to(device)       # (N,)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]                       # (b,)
            loss = sum(F.cross_entropy(head(features[name][idx]), labels[idx])
                       for name, head in heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return heads.eval()


@torch.no_grad()
def top1(heads: nn.ModuleDict, features: dict[str, Tensor], labels: Tensor) -> dict[str, float]:
    """Top-1 accuracy (%) of every head on its layer's features."""
    return {name: 100.0 * (head(features[name]).argmax(1) == labels).float().mean().item()
            for name, head in heads.items()}


def linear_probe(encoder: nn.Module, train: SplitData, test: SplitData, num_classes: int,
                 device: torch.device, *, image_size: int | None, resize: int | None = None,
                 layers: Sequence[str], target_dim: int, epochs: int, batch_size: int, lr: float,
                 optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
                 feature_batch_size: int = 256, seed: int = 0, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> dict[str, Any]:
    """Freeze `encoder`, cache pooled features, train one linear head per layer, test top-1.

    Returns {"top1": {layer: %}, "train_top1": {layer: %}, "dims": {layer: C*g*g},
    "grids": {layer: g}}. `image_size` is the side images are fed at (None: as stored, for
    in-memory splits); file-backed images are resized to `resize` (default image_size / 0.875)
    and centre-cropped.
    """
    freeze(encoder)
    cached = []
    for split in (train, test):
        batches = loaders.eval_batches(split, feature_batch_size, device, image_size=image_size,
                                       resize=resize, mean=mean, std=std)
        cached.append(stage_features(encoder, batches, split.num_items, layers, target_dim))
    (train_feats, grids), (test_feats, _) = cached
    for name in layers:
        train_feats[name], test_feats[name] = standardize(train_feats[name], test_feats[name])
    train_labels, test_labels = train.labels.to(device), test.labels.to(device)
    heads = train_heads(train_feats, train_labels, num_classes, epochs=epochs,
                        batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                        weight_decay=weight_decay, seed=seed)
    check_frozen(encoder, heads)
    result = {"top1": top1(heads, test_feats, test_labels),
              "train_top1": top1(heads, train_feats, train_labels),
              "dims": {n: int(x.shape[1]) for n, x in train_feats.items()}, "grids": grids}
    log.info("linear probe top-1 %s", {n: round(v, 2) for n, v in result["top1"].items()})
    return result


def probe_encoder_file(params: LinearParams, encoder_path: Path, prepared: PreparedDataset,
                       device: torch.device, seed: int) -> dict[str, Any]:
    """The stage body shared by `linear` and `places`: the trained encoder, then random init.

    Images are fed at the encoder's training size (its `preprocess.image_size`) when stored as
    files, and as stored when in memory. Returns linear_probe's dict (+ "random_init": top1).
    """
    encoder, meta = checkpoint.load_encoder(encoder_path, device)
    train, test = prepared.split("train"), prepared.split("test")
    pre = meta["preprocess"]
    size = None if train.storage == "array" else int(pre["image_size"][0])
    opts = dict(image_size=size, resize=pre.get("resize"), layers=params.layers,
                target_dim=params.target_dim, epochs=params.epochs, batch_size=params.batch_size,
                lr=params.lr, optimizer=params.optimizer, momentum=params.momentum,
                weight_decay=params.weight_decay, feature_batch_size=params.feature_batch_size,
                seed=seed, mean=pre["mean"], std=pre["std"])
    num_classes = len(prepared.classes)
    result = linear_probe(encoder, train, test, num_classes, device, **opts)
    if params.random_init_baseline:
        runtime.seed_everything(seed)
        random_init = build_encoder(**meta["encoder_config"]).to(device)
        baseline = linear_probe(random_init, train, test, num_classes, device, **opts)
        result["random_init"] = {"top1": baseline["top1"]}
    return result
