"""DVC stage `evaluate`: weighted kNN of the trained and of a random-init encoder.

params.yaml: `seed`, `device`, `evaluate`, `pretrain.temperature` (sigma when `evaluate.sigma` is
0). Writes metrics/evaluate.json: {"knn": {top1, top5}, "random_init": {"knn": ...}, "k", "sigma"}.
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
        metrics = evaluate_encoder(encoder, meta, prepared, device, k=params.k, sigma=sigma,
                                   batch_size=params.batch_size, chunk_size=params.chunk_size,
                                   seed=common.seed)
        _common.finish(NAME, metrics, args.metrics)
    _common.log.info("kNN top-1 %.2f%% (random init %.2f%%)", metrics["knn"]["top1"],
                     metrics["random_init"]["knn"]["top1"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
