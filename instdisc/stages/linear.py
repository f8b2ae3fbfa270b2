"""DVC stage `linear`: linear probes on frozen conv1..conv5 features of the pretraining data.

params.yaml: `seed`, `device`, `linear`. Protocol: Wu et al. 2018 (arXiv:1805.01978), Sec. 4.2;
docs/transfer.md. Writes metrics/linear.json ({"top1": {layer: %}, "random_init": ..., "seconds"}),
or {"skipped": reason} when the prepared dataset has no labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from instdisc import tracking
from instdisc.stages import _common

NAME = "linear"
HELP = "Linear classifiers on frozen, pooled conv1..conv5 features (paper Table 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME, data=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc import checkpoint, runtime
    from instdisc.data.prepared import PreparedDataset
    from instdisc.evaluate.linear import probe_encoder_file

    params, common = _common.load(args.params, NAME)
    device = runtime.resolve_device(common.device)
    started = time.perf_counter()
    with tracking.run(NAME, {"seed": common.seed, "device": str(device), NAME: params}):
        prepared = PreparedDataset.open(args.data)
        skipped = _common.skip_without_labels(NAME, prepared, args.metrics)
        if skipped is not None:
            return skipped
        _common.check_fingerprint(checkpoint.load(args.encoder).get("fingerprint"), prepared,
                                  args.encoder)
        metrics = probe_encoder_file(params, args.encoder, prepared, device, common.seed)
        _common.log.info("linear probe top-1 (%%): %s",
                         {k: round(v, 2) for k, v in metrics["top1"].items()})
        _common.finish(NAME, metrics, args.metrics, started)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
