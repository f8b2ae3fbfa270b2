"""DVC stage `prepare`: the synthetic set or an image folder/archive -> data/prepared.

params.yaml: `seed`, `prepare`. Writes the prepared dataset (format: docs/DESIGN.md), its
report.json, and metrics/prepare.json (counts, skipped files, duplicate groups, labelled or
not, storage, fingerprint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.stages import _common

NAME = "prepare"
HELP = "Prepare the dataset (synthetic or image folder/archive)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME, encoder=False)
    parser.add_argument("--out", type=Path, default=_common.PREPARED,
                        help="output folder (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instdisc.data.prepare import prepare

    params, common = _common.load(args.params, NAME)
    with tracking.run(NAME, {"seed": common.seed, "prepare": params}):
        report = prepare(params, seed=common.seed, out_dir=args.out)
        metrics = {"fingerprint": report["fingerprint"], "num_classes": len(report["classes"]),
                   **{f"{split}_images": info["num_items"]
                      for split, info in report["splits"].items()},
                   "skipped": len(report["skipped"]), "storage": report["storage"],
                   "labeled": report["labeled"], "duplicates": len(report["duplicates"]),
                   "reencoded": (report.get("reencoded") or {}).get("count", 0)}
        tracking.set_tags({"dataset.fingerprint": metrics["fingerprint"]})
        _common.finish(NAME, metrics, args.metrics, artifacts=[args.out / "report.json"])
    _common.log.info("prepared %s", {k: v for k, v in metrics.items() if k != "fingerprint"})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
