"""Weighted kNN of a trained encoder beside a random-init one (arXiv:1805.01978, Sec. 3.4).

Features of the train and test splits are recomputed by the final encoder in eval mode (not read
from the memory bank), and the same numbers are computed for a randomly initialised encoder of the
same architecture, so every report shows what pretraining bought. The DVC stage is
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
from instdisc.evaluate.knn import compute_features, knn_accuracy
from instdisc.models.encoder import build_encoder

log = logging.getLogger(__name__)


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
                     chunk_size: int, seed: int) -> dict[str, Any]:
    """Metrics dict: {"knn": {top1, top5}, "random_init": {"knn": {...}}, "k", "sigma"}.

    `encoder, meta` as `checkpoint.load_encoder` returns them.
    """
    pre = meta["preprocess"]
    opts = dict(k=k, sigma=sigma, batch_size=batch_size, chunk_size=chunk_size,
                image_size=pre["image_size"][0], resize=pre.get("resize"), mean=pre["mean"],
                std=pre["std"])
    trained = knn_of(encoder, prepared, device, **opts)
    runtime.seed_everything(seed)
    random_init = build_encoder(**meta["encoder_config"]).to(device).eval()
    baseline = knn_of(random_init, prepared, device, **opts)
    return {"knn": trained, "random_init": {"knn": baseline}, "k": k, "sigma": sigma}
