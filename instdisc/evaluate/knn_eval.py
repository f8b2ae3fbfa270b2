"""Weighted kNN (arXiv:1805.01978, Sec. 3.4) and label-free metrics (`label_free.py`) of a trained
encoder beside a random-init one.

Features of the train and test splits are recomputed by the final encoder in eval mode (not read
from the memory bank), and the same numbers are computed for a randomly initialised encoder of the
same architecture, so every report shows what pretraining bought, with a flag per metric
(`beats_random_init`) and a logged warning where it bought nothing. Without labels the kNN is
skipped (its entry says why) and the label-free metrics remain. The DVC stage is
`instdisc/stages/evaluate.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from instdisc import runtime
from instdisc.data import loaders
from instdisc.data.prepared import PreparedDataset
from instdisc.data.augment import BatchAugment
from instdisc.evaluate import label_free
from instdisc.evaluate.knn import compute_features, knn_accuracy
from instdisc.models.encoder import build_encoder

log = logging.getLogger(__name__)

NO_LABELS = "no labels: the prepared dataset comes from an unlabelled source"


def knn_of(encoder: nn.Module, prepared: PreparedDataset, device: torch.device, *, k: int,
           sigma: float, batch_size: int, chunk_size: int, image_size: int,
           resize: int | None, mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    """Top-1/top-5 (%) of test images classified by their k nearest training images."""
    train, test = prepared.split("train"), prepared.split("test")
    feats = {}
    for split in (train, test):
        batches = loaders.eval_batches(split, batch_size, device, image_size=image_size,
                                       resize=resize, mean=mean, std=std)
        feats[split.name] = compute_features(encoder, batches, split.num_items, device)
    k_eff = min(k, train.num_items)
    if k_eff < k:
        log.warning("k = %d exceeds the %d training images; using k = %d", k, train.num_items, k_eff)
    return knn_accuracy(feats["train"], train.labels.to(device), feats["test"],
                        test.labels.to(device), num_classes=len(prepared.classes), k=k_eff,
                        sigma=sigma, chunk_size=chunk_size)


def evaluate_encoder(encoder: nn.Module, meta: dict[str, Any], prepared: PreparedDataset,
                     device: torch.device, *, k: int, sigma: float, batch_size: int,
                     chunk_size: int, seed: int, augment: BatchAugment | None = None,
                     label_free_images: int = 0) -> dict[str, Any]:
    """Metrics dict: {"knn": {top1, top5} or {"skipped": why}, "random_init": {"knn", ...},
    "k", "sigma", "label_free"?, "beats_random_init": {metric: bool}}.

    `encoder, meta` as `checkpoint.load_encoder` returns them. With `augment` (the training
    augmentation) and `label_free_images` > 0, the label-free metrics of that many test images
    are added for both encoders ("label_free", "random_init.label_free").
    """
    pre = meta["preprocess"]
    opts = dict(k=k, sigma=sigma, batch_size=batch_size, chunk_size=chunk_size,
                image_size=pre["image_size"][0], resize=pre.get("resize"), mean=pre["mean"],
                std=pre["std"])
    if not prepared.labeled:
        log.warning("kNN skipped: %s", NO_LABELS)
    skipped = {"skipped": NO_LABELS}
    trained = knn_of(encoder, prepared, device, **opts) if prepared.labeled else skipped
    runtime.seed_everything(seed)
    random_init = build_encoder(**meta["encoder_config"]).to(device).eval()
    baseline = knn_of(random_init, prepared, device, **opts) if prepared.labeled else skipped
    metrics: dict[str, Any] = {"knn": trained, "random_init": {"knn": baseline}, "k": k,
                               "sigma": sigma}
    pairs = {"knn_top1": (trained["top1"], baseline["top1"])} if prepared.labeled else {}
    if augment is not None and label_free_images > 0:
        images = label_free.heldout_images(prepared.split("test"), label_free_images, seed,
                                           pre["image_size"][0], pre.get("resize"))
        scores = [label_free.label_free_metrics(model, images, augment, mean=pre["mean"],
                                                std=pre["std"], batch_size=batch_size,
                                                device=device, seed=seed)
                  for model in (encoder, random_init)]
        metrics["label_free"], metrics["random_init"]["label_free"] = scores
        pairs |= {name: (scores[0][name], scores[1][name]) for name in label_free.COMPARED}
    beats = {name: label_free.is_better(name, *pair) for name, pair in pairs.items()}
    for name, (value, baseline_value) in pairs.items():
        if not beats[name]:
            log.warning("the trained encoder does not beat its random init on %s: %.4g vs %.4g",
                        name, value, baseline_value)
    metrics["beats_random_init"] = beats
    return metrics
