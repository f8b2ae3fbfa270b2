"""What every stage does the same way: default paths, params, device, fingerprint check, metrics.

Paths default to the ones in dvc.yaml, relative to the working directory (the repository root
under `dvc repro`). `finish` is the one place metrics leave a stage: JSON with NaN/inf as null
(`instdisc.io.write_json`), the finite numbers to MLflow under flattened names (`knn.top1`), the
file as an artifact. `main` is the stages' entry point: a bad value, a missing file or a
`StageError` is logged as one line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from instdisc import config, tracking
from instdisc.errors import StageError
from instdisc.io import flatten, write_json

log = logging.getLogger("instdisc")

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
ENCODER = Path("models/encoder.pt")
CHECKPOINT = Path("models/checkpoints/last.pt")
ONNX_MODEL = Path("models/encoder.onnx")
PLACES_DATA = Path("data/places")
DETECTION_DATA = Path("data/detection")
METRICS = Path("metrics")
PLOTS = Path("plots")
ENCODER_TAG = "instdisc.encoder.sha256"  # MLflow tag: the pretrain run that wrote an encoder


def add_arguments(parser: argparse.ArgumentParser, stage: str, *, encoder: bool = True,
                  data: bool = False) -> None:
    """--params and --metrics for every stage; --encoder and --data for those that read them."""
    parser.add_argument("--params", type=Path, default=PARAMS,
                        help="params file (default: %(default)s)")
    if encoder:
        parser.add_argument("--encoder", type=Path, default=ENCODER,
                            help="encoder file (default: %(default)s)")
    if data:
        parser.add_argument("--data", type=Path, default=PREPARED,
                            help="prepared dataset (default: %(default)s)")
    parser.add_argument("--metrics", type=Path, default=METRICS / f"{stage}.json",
                        help="metrics JSON (default: %(default)s)")


def load(params_file: Path, section: str) -> tuple[Any, config.CommonParams]:
    """(the stage's params section, the shared `seed` and `device`)."""
    return config.load_section(params_file, section), config.load_common(params_file)


def check_fingerprint(trained_on: str | None, prepared: Any, encoder_path: Path) -> None:
    """The encoder must have been trained on this prepared dataset (its rows and labels are used).

    `trained_on` is the fingerprint stored in the encoder file (None or "": not checked).
    """
    if trained_on and trained_on != prepared.fingerprint:
        raise ValueError(f"encoder {str(encoder_path)!r} was trained on dataset "
                         f"{trained_on[:12]}, but {str(prepared.root)!r} is "
                         f"{prepared.fingerprint[:12]}: re-run pretraining")


def no_labels_reason(stage: str) -> str:
    """Why a stage that needs class labels has nothing to do on an unlabelled prepared dataset."""
    return (f"no labels: the prepared dataset comes from an unlabelled source (prepare.labels "
            f"none, or no class folders), and {stage} needs class labels")


def skip_without_labels(stage: str, prepared: Any, path: Path) -> dict[str, Any] | None:
    """On unlabelled data: log why, write {"skipped": reason} as the metrics and return them;
    None when `prepared` has labels (the stage then runs)."""
    if prepared.labeled:
        return None
    reason = no_labels_reason(stage)
    log.warning("%s skipped: %s", stage, reason)
    return finish(stage, {"skipped": reason}, path)


def finish(stage: str, metrics: dict[str, Any], path: Path, started: float | None = None,
           artifacts: Sequence[Path] = (), log_metrics: bool = True) -> dict[str, Any]:
    """Write `metrics` (plus `seconds` since `started`, if given) and log them; returns them.

    `log_metrics=False` where the run already logged the same names per step (pretrain's epochs).
    """
    if started is not None:
        metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json(metrics, path)
    if log_metrics:
        tracking.log_metrics(flatten(metrics))
    for artifact in (path, *artifacts):
        tracking.log_artifact(artifact)
    log.info("%s: metrics in %s", stage, path)
    return metrics


def main(stage: str, description: str, add: Callable[[argparse.ArgumentParser], None],
         run: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None = None) -> int:
    """`python -m instdisc.stages.<stage>`: parse the stage's options, run it, exit 0 or 2."""
    parser = argparse.ArgumentParser(prog=f"python -m instdisc.stages.{stage}",
                                     description=description)
    add(parser)
    args = parser.parse_args(argv)
    args.command = stage
    return run_logged(run, args)


def run_logged(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Configure logging, call `run(args)`; user errors -> one log line and exit code 2."""
    logging.basicConfig(level=os.environ.get("INSTDISC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        run(args)
    except (ValueError, FileNotFoundError, StageError) as err:
        log.error("%s failed: %s", args.command, err)
        return 2
    return 0
