"""DVC stage `places`: prepare a scene dataset, then linear probes on the frozen encoder.

params.yaml: `seed`, `device`, `places`. Protocol: Wu et al. 2018 (arXiv:1805.01978), Sec. 4.2
(Places); docs/transfer.md. Writes data/places and metrics/places.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.stages import _common

NAME = "places"
HELP = "Prepare a scene dataset and run the linear probe on it (paper Table 3)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME)
    parser.add_argument("--out", type=Path, default=_common.PLACES_DATA,
                        help="where the scene dataset is prepared (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc import runtime
    from instdisc.transfer.places import run_places

    params, common = _common.load(args.params, NAME)
    device = runtime.resolve_device(common.device)
    started = time.perf_counter()
    with tracking.run(NAME, {"seed": common.seed, "device": str(device), NAME: params}):
        metrics = run_places(params, args.encoder, args.out, device, common.seed)
        _common.log.info("places linear probe top-1 (%%): %s",
                         {k: round(v, 2) for k, v in metrics["top1"].items()})
        _common.finish(NAME, metrics, args.metrics, started)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
