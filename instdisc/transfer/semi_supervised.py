"""Semi-supervised transfer: fine-tune with few labels (Wu et al. 2018, arXiv:1805.01978, Sec. 4.3).

The paper (Fig. 6) pretrains on all of ImageNet without labels, then fine-tunes the whole network
plus a new classifier on a small labelled subset (1%, 2%, 4%, 10%, 20% of the images), and
compares with the same network trained from random initialisation ("scratch") on that subset.

Here the labelled subset is drawn from the pretraining dataset's train split by
`balanced_subset`: the same number of images per class (round(fraction * N / C), at least one),
chosen by a seeded permutation per class. Because the permutation does not depend on the fraction,
the 1% subset is contained in the 10% subset. Each run trains the encoder's trunk (the 128-d
embedding head is dropped) plus `nn.Linear(trunk_dim, num_classes)` for a fixed number of SGD
steps with a cosine learning rate, random-resized-crop + flip augmentation (no colour jitter, the
supervised recipe), and reports top-1 (%) on the whole test split. Pretrained and scratch runs of
one fraction see the same batches and augmentations (the global RNG is reseeded per run).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from instdisc import checkpoint, runtime
from instdisc.config import SemiSupervisedParams
from instdisc.errors import StageError
from instdisc.data import loaders
from instdisc.data.augment import MEAN, STD, BatchAugment
from instdisc.data.prepared import PreparedDataset, SplitData
from instdisc.models.encoder import build_encoder

log = logging.getLogger(__name__)


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of round(fraction * N / C) images of every class (at least 1): int64 (k*C,).

    Deterministic for a given (labels, seed); subsets of one seed are nested (smaller fractions
    take a prefix of the same per-class permutation). A class with fewer images gives all it has,
    with a warning.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = labels.cpu()
    classes = torch.unique(labels)                                       # (C,), sorted
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes.tolist():
        members = (labels == c).nonzero().squeeze(1)                     # (n_c,)
        order = torch.randperm(len(members), generator=generator)         # (n_c,)
        if len(members) < per_class:
            log.warning("class %d has %d images, fewer than the %d asked for", c, len(members),
                        per_class)
        picks.append(members[order[:per_class]])
    return torch.cat(picks).sort().values                                # (k*C,)


def subset_split(split: SplitData, indices: Tensor) -> SplitData:
    """The rows `indices` of `split` as a new in-memory or manifest split (row j = indices[j])."""
    rows = indices.tolist()
    return SplitData(name=f"{split.name}-subset", labels=split.labels[indices],
                     storage=split.storage,
                     images=None if split.images is None else split.images[indices],
                     paths=None if split.paths is None else [split.paths[i] for i in rows],
                     image_size=split.image_size)


class Classifier(nn.Module):
    """ResNet trunk (pooled conv5) + a new linear classifier: logits (B, num_classes)."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(trunk_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.trunk(x))                                    # (B, num_classes)


def finetune(model: nn.Module, labelled: SplitData, augment: BatchAugment, device: torch.device,
             *, steps: int, batch_size: int, lr: float, momentum: float,
             weight_decay: float) -> float:
    """`steps` SGD steps of cross-entropy on `labelled` (reshuffled every pass); last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    labels = labelled.labels.to(device)                                  # (n,)
    model.train()
    step, loss = 0, torch.zeros(())
    bar = tqdm(total=steps, desc="fine-tune", disable=not sys.stderr.isatty(), leave=False)
    while step < steps:
        for images, indices in loaders.train_batches(labelled, batch_size, augment, device,
                                                     drop_last=False):
            loss = F.cross_entropy(model(images), labels[indices])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            bar.update()
            if step == steps:
                break
    bar.close()
    if not torch.isfinite(loss):
        raise StageError(f"fine-tuning diverged (loss {loss.item()}); lower lr ({lr})")
    return loss.item()


@torch.no_grad()
def evaluate_top1(model: nn.Module, test: SplitData, device: torch.device, batch_size: int,
                  image_size: int | None, resize: int | None = None,
                  mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> float:
    """Top-1 accuracy (%) of `model` on every image of `test` (eval mode, no augmentation)."""
    model.eval()
    correct = 0
    labels = test.labels.to(device)                                      # (N,)
    batches = loaders.eval_batches(test, batch_size, device, image_size=image_size, resize=resize,
                                   mean=mean, std=std)
    for images, indices in batches:
        correct += int((model(images).argmax(1) == labels[indices]).sum())
    return 100.0 * correct / test.num_items


def run_semi_supervised(params: SemiSupervisedParams, encoder_path: Path,
                        prepared: PreparedDataset, device: torch.device,
                        seed: int) -> dict[str, Any]:
    """Every fraction x {pretrained, scratch}: fine-tune, then test top-1.

    Returns {"labels_<p>pct": {"num_labelled", "pretrained", "scratch"?}} with p = 100 * fraction.
    """
    _, meta = checkpoint.load_encoder(encoder_path, "cpu")
    train, test = prepared.split("train"), prepared.split("test")
    in_memory = train.storage == "array"
    size = train.image_size[0] if in_memory else int(meta["preprocess"]["image_size"][0])
    pre = meta["preprocess"]
    augment = BatchAugment(size, crop_scale=(params.crop_scale_min, 1.0), color_jitter=0.0,
                           grayscale_prob=0.0, hflip=params.hflip, mean=pre["mean"],
                           std=pre["std"]).to(device)
    inits = ["pretrained"] + (["scratch"] if params.scratch_baseline else [])
    results: dict[str, Any] = {}
    for fraction in params.fractions:
        subset = balanced_subset(train.labels, fraction, seed)
        labelled = subset_split(train, subset)
        row: dict[str, Any] = {"fraction": fraction, "num_labelled": len(subset)}
        for init in inits:
            runtime.seed_everything(seed)
            encoder = (checkpoint.load_encoder(encoder_path, device)[0] if init == "pretrained"
                       else build_encoder(**meta["encoder_config"]).to(device))
            model = Classifier(encoder.trunk, encoder.trunk_dim, len(prepared.classes)).to(device)
            loss = finetune(model, labelled, augment, device, steps=params.steps,
                            batch_size=params.batch_size, lr=params.lr,
                            momentum=params.momentum, weight_decay=params.weight_decay)
            row[init] = evaluate_top1(model, test, device, params.eval_batch_size,
                                      None if in_memory else size, pre.get("resize"),
                                      pre["mean"], pre["std"])
            row[f"{init}_final_loss"] = loss
            log.info("%g%% labels (%d images), %s: top-1 %.2f%%", 100 * fraction, len(subset),
                     init, row[init])
        results[f"labels_{100 * fraction:g}pct"] = row
    return results
