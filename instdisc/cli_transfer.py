"""`instdisc linear | places | semi_supervised | detection`: the evaluation and transfer stages.

Each subcommand is one DVC stage of the same name and reads the params.yaml section of that name
(plus `seed` and `device`); it runs inside `tracking.run(<stage>)`, writes `metrics/<stage>.json`
atomically and logs the numeric metrics to MLflow. `register(sub)` adds them to the main parser.
Protocols: Wu et al. 2018 (arXiv:1805.01978), Sec. 4.2 (linear, places), 4.3 (semi_supervised),
4.4 (detection); see docs/transfer.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

from instdisc.cli import ENCODER, METRICS, PARAMS, PREPARED  # the stages' default paths

log = logging.getLogger(__name__)

PLACES_DATA = Path("data/places")
DETECTION_DATA = Path("data/detection")


def _setup(args: argparse.Namespace, stage: str):
    """(section params, common params, device) of `stage`."""
    from instdisc import config, runtime

    params = config.load_section(args.params, stage)
    common = config.load_common(args.params)
    return params, common, runtime.resolve_device(common.device)


def _finish(stage: str, metrics: dict[str, Any], path: Path, started: float) -> None:
    """Add the wall time, write the metrics JSON, log the numbers and the file to MLflow."""
    from instdisc import tracking
    from instdisc.cli import write_json

    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json(_json_safe(metrics), path)
    tracking.log_metrics(_flat(metrics))
    tracking.log_artifact(path)
    log.info("%s finished in %.1f s; metrics in %s", stage, metrics["seconds"], path)


def _check_fingerprint(encoder_path: Path, prepared: Any) -> None:
    """The encoder must have been trained on this prepared dataset (its train labels are used)."""
    from instdisc import checkpoint

    fingerprint = checkpoint.load(encoder_path).get("fingerprint")
    if fingerprint and fingerprint != prepared.fingerprint:
        raise ValueError(f"encoder {str(encoder_path)!r} was trained on dataset "
                         f"{fingerprint[:12]}, but {str(prepared.root)!r} is "
                         f"{prepared.fingerprint[:12]}: re-run pretraining")


def cmd_linear(args: argparse.Namespace) -> None:
    """Stage `linear`: linear probes on frozen conv1..conv5 features of the pretraining data."""
    from instdisc import tracking
    from instdisc.data.prepared import PreparedDataset
    from instdisc.evaluate.linear import probe_encoder_file

    params, common, device = _setup(args, "linear")
    started = time.perf_counter()
    with tracking.run("linear", {"seed": common.seed, "device": str(device), "linear": params}):
        prepared = PreparedDataset.open(args.data)
        _check_fingerprint(args.encoder, prepared)
        metrics = probe_encoder_file(params, args.encoder, prepared, device, common.seed)
        _finish("linear", metrics, args.metrics, started)
    log.info("linear probe top-1 (%%): %s", _rounded(metrics["top1"]))


def cmd_places(args: argparse.Namespace) -> None:
    """Stage `places`: prepare the scene dataset, then linear probes on the frozen encoder."""
    from instdisc import tracking
    from instdisc.transfer.places import run_places

    params, common, device = _setup(args, "places")
    started = time.perf_counter()
    with tracking.run("places", {"seed": common.seed, "device": str(device), "places": params}):
        metrics = run_places(params, args.encoder, args.out, device, common.seed)
        _finish("places", metrics, args.metrics, started)
    log.info("places linear probe top-1 (%%): %s", _rounded(metrics["top1"]))


def cmd_semi_supervised(args: argparse.Namespace) -> None:
    """Stage `semi_supervised`: fine-tune on 1% / 10% of the labels, pretrained vs. scratch."""
    from instdisc import tracking
    from instdisc.data.prepared import PreparedDataset
    from instdisc.transfer.semi_supervised import run_semi_supervised

    params, common, device = _setup(args, "semi_supervised")
    started = time.perf_counter()
    with tracking.run("semi_supervised", {"seed": common.seed, "device": str(device),
                                          "semi_supervised": params}):
        prepared = PreparedDataset.open(args.data)
        _check_fingerprint(args.encoder, prepared)
        metrics = run_semi_supervised(params, args.encoder, prepared, device, common.seed)
        _finish("semi_supervised", metrics, args.metrics, started)


def cmd_detection(args: argparse.Namespace) -> None:
    """Stage `detection`: Faster R-CNN on the encoder trunk, VOC fine-tune, mAP@0.5."""
    from instdisc import tracking
    from instdisc.transfer.detection import run_detection

    params, common, device = _setup(args, "detection")
    started = time.perf_counter()
    with tracking.run("detection", {"seed": common.seed, "device": str(device),
                                    "detection": params}):
        metrics = run_detection(params, args.encoder, args.out, device, common.seed)
        _finish("detection", metrics, args.metrics, started)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out[f"{prefix}{key}"] = value
    return out


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in values.items()}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `linear`, `places`, `semi_supervised` and `detection` subcommands."""
    def stage(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--params", type=Path, default=PARAMS,
                       help="params file (default: %(default)s)")
        p.add_argument("--encoder", type=Path, default=ENCODER,
                       help="encoder file (default: %(default)s)")
        p.add_argument("--metrics", type=Path, default=METRICS / f"{name}.json",
                       help="metrics JSON (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    p = stage("linear", cmd_linear,
              "Linear classifiers on frozen, pooled conv1..conv5 features (paper Table 2).")
    p.add_argument("--data", type=Path, default=PREPARED,
                   help="prepared dataset (default: %(default)s)")
    p = stage("places", cmd_places,
              "Prepare a scene dataset and run the linear probe on it (paper Table 3).")
    p.add_argument("--out", type=Path, default=PLACES_DATA,
                   help="where the scene dataset is prepared (default: %(default)s)")
    p = stage("semi_supervised", cmd_semi_supervised,
              "Fine-tune with 1%% / 10%% of the labels, pretrained vs. scratch (paper Fig. 6).")
    p.add_argument("--data", type=Path, default=PREPARED,
                   help="prepared dataset (default: %(default)s)")
    p = stage("detection", cmd_detection,
              "Faster R-CNN + FPN on the encoder trunk, VOC fine-tune, mAP@0.5 (paper Sec. 4.4).")
    p.add_argument("--out", type=Path, default=DETECTION_DATA,
                   help="where the VOC-format dataset is materialised (default: %(default)s)")
