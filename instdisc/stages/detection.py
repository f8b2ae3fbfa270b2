"""DVC stage `detection`: Faster R-CNN on the encoder trunk, VOC fine-tune, mAP@0.5.

params.yaml: `seed`, `device`, `detection`. Protocol: Wu et al. 2018 (arXiv:1805.01978), Sec. 4.4;
docs/transfer.md. Writes data/detection (the VOC set used) and metrics/detection.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.stages import _common

NAME = "detection"
HELP = "Faster R-CNN + FPN on the encoder trunk, VOC fine-tune, mAP@0.5 (paper Sec. 4.4)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME)
    parser.add_argument("--out", type=Path, default=_common.DETECTION_DATA,
                        help="where the VOC-format dataset is materialised (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc import runtime
    from instdisc.transfer.detection import run_detection

    params, common = _common.load(args.params, NAME)
    device = runtime.resolve_device(common.device)
    started = time.perf_counter()
    with tracking.run(NAME, {"seed": common.seed, "device": str(device), NAME: params}):
        metrics = run_detection(params, args.encoder, args.out, device, common.seed)
        _common.finish(NAME, metrics, args.metrics, started)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
