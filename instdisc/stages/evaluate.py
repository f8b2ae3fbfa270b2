"""DVC stage `evaluate`: weighted kNN and label-free metrics of the trained and of a random-init
encoder.

params.yaml: `seed`, `device`, `evaluate`, `pretrain.temperature` (sigma when `evaluate.sigma` is
0) and pretrain's augmentation keys (the views of the label-free metrics). Writes
metrics/evaluate.json: {"knn": {top1, top5}, "random_init": {"knn": ..., "label_free": ...},
"k", "sigma", "label_free": {alignment, alignment_ratio, uniformity, retrieval_top1, images},
"beats_random_init": {knn_top1, alignment, ...: bool}}; "knn" is {"skipped": why} without labels.
The flags also go to MLflow as tags `evaluate.beats_random_init.<metric>` (MLflow metrics are
numbers only).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from instdisc import config, tracking
from instdisc.stages import _common

NAME = "evaluate"
HELP = "Weighted kNN evaluation on recomputed features."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME, data=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc import checkpoint, runtime
    from instdisc.data.augment import BatchAugment
    from instdisc.data.prepared import PreparedDataset
    from instdisc.evaluate.knn_eval import evaluate_encoder

    params, common = _common.load(args.params, NAME)
    pretrain = config.load_section(args.params, "pretrain")
    device = runtime.resolve_device(common.device)
    sigma = params.sigma or pretrain.temperature
    with tracking.run(NAME, {"seed": common.seed, "evaluate": params, "sigma": sigma}):
        prepared = PreparedDataset.open(args.data)
        encoder, meta = checkpoint.load_encoder(args.encoder, device)
        _common.check_fingerprint(meta.get("fingerprint"), prepared, args.encoder)
        pre = meta["preprocess"]
        augment = BatchAugment(  # the training augmentation, with the encoder's mean/std
            tuple(pre["image_size"]), crop_scale=(pretrain.crop_scale_min, 1.0),
            color_jitter=pretrain.color_jitter, grayscale_prob=pretrain.grayscale_prob,
            hflip=pretrain.hflip, hue=pretrain.hue, jitter_prob=pretrain.color_jitter_prob,
            mean=pre["mean"], std=pre["std"])
        metrics = evaluate_encoder(encoder, meta, prepared, device, k=params.k, sigma=sigma,
                                   batch_size=params.batch_size, chunk_size=params.chunk_size,
                                   seed=common.seed, augment=augment,
                                   label_free_images=params.label_free_images)
        tracking.set_tags({f"{NAME}.beats_random_init.{name}": str(flag).lower()
                           for name, flag in metrics["beats_random_init"].items()})
        _common.finish(NAME, metrics, args.metrics)
    knn, base = metrics["knn"], metrics["random_init"]["knn"]
    if "top1" in knn:
        _common.log.info("kNN top-1 %.2f%% (random init %.2f%%)", knn["top1"], base["top1"])
    if "label_free" in metrics:
        _common.log.info("label-free (trained / random init): %s", {
            name: f"{value:.4g} / {metrics['random_init']['label_free'][name]:.4g}"
            for name, value in metrics["label_free"].items() if name != "images"})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
