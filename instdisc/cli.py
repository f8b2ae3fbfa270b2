"""`instdisc <stage>`: one subcommand per DVC stage, each reading its own params.yaml section.

Paths default to the ones in dvc.yaml, relative to the working directory (the repository root
under `dvc repro`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("instdisc")

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
ENCODER = Path("models/encoder.pt")
CHECKPOINT = Path("models/checkpoints/last.pt")
METRICS = Path("metrics")
PLOTS = Path("plots")


def write_json(data: dict[str, Any], path: Path) -> None:
    """Atomic JSON write (temp file in the same folder, then rename)."""
    from instdisc.atomic import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def cmd_prepare(args: argparse.Namespace) -> None:
    """Stage `prepare`: synthetic data or an image folder/archive -> data/prepared."""
    from instdisc import config, tracking
    from instdisc.data.prepare import prepare

    params = config.load_section(args.params, "prepare")
    common = config.load_common(args.params)
    with tracking.run("prepare", {"seed": common.seed, "prepare": params}):
        report = prepare(params, seed=common.seed, out_dir=args.out)
        counts = report["counts"]
        metrics = {"fingerprint": report["fingerprint"], "num_classes": len(counts["train"]),
                   **{f"{split}_images": sum(per_class.values())
                      for split, per_class in counts.items()},
                   "skipped": len(report["skipped"]), "storage": report["storage"]}
        write_json(metrics, args.metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifact(args.out / "report.json")
        tracking.set_tags({"dataset.fingerprint": metrics["fingerprint"]})
    log.info("prepared %s", {k: v for k, v in metrics.items() if k != "fingerprint"})


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Stage `pretrain`: InstDisc training -> models/encoder.pt, metrics, per-epoch plots."""
    from instdisc import config, runtime
    from instdisc.pretrain_stage import run_pretrain

    params = config.load_section(args.params, "pretrain")
    common = config.load_common(args.params)
    dist = runtime.init_distributed(common.device)
    device = runtime.resolve_device(common.device, dist.local_rank)
    run_pretrain(params, common, device=device, dist=dist, prepared_dir=args.data,
                 encoder_path=args.out, checkpoint_path=args.checkpoint,
                 metrics_path=args.metrics, plots_dir=args.plots)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Stage `evaluate`: weighted kNN of the trained and of a random-init encoder."""
    from instdisc import config, runtime, tracking
    from instdisc.evaluate.stage import evaluate_encoder

    params = config.load_section(args.params, "evaluate")
    pretrain = config.load_section(args.params, "pretrain")
    common = config.load_common(args.params)
    device = runtime.resolve_device(common.device)
    sigma = params.sigma or pretrain.temperature
    with tracking.run("evaluate", {"seed": common.seed, "evaluate": params, "sigma": sigma}):
        metrics = evaluate_encoder(args.encoder, args.data, device, k=params.k, sigma=sigma,
                                   batch_size=params.batch_size, chunk_size=params.chunk_size,
                                   seed=common.seed)
        write_json(metrics, args.metrics)
        tracking.log_metrics(_flat(metrics))
        tracking.log_artifact(args.metrics)
    log.info("kNN top-1 %.2f%% (random init %.2f%%)", metrics["knn"]["top1"],
             metrics["random_init"]["knn"]["top1"])


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instdisc", description="Non-parametric instance discrimination pipeline stages.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def stage(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", type=Path, default=PARAMS, help="params file (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    p = stage("prepare", cmd_prepare, "Prepare the dataset (synthetic or image folder/archive).")
    p.add_argument("--out", type=Path, default=PREPARED, help="output folder (default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=METRICS / "prepare.json")

    p = stage("pretrain", cmd_pretrain, "Train the encoder by instance discrimination.")
    p.add_argument("--data", type=Path, default=PREPARED, help="prepared dataset (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ENCODER, help="encoder file (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                   help="resumable training checkpoint (default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=METRICS / "pretrain.json")
    p.add_argument("--plots", type=Path, default=PLOTS)

    p = stage("evaluate", cmd_evaluate, "Weighted kNN evaluation on recomputed features.")
    p.add_argument("--data", type=Path, default=PREPARED)
    p.add_argument("--encoder", type=Path, default=ENCODER)
    p.add_argument("--metrics", type=Path, default=METRICS / "evaluate.json")

    from instdisc import cli_serving

    cli_serving.register(sub)
    from instdisc import cli_transfer

    cli_transfer.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `instdisc` console script."""
    logging.basicConfig(level=os.environ.get("INSTDISC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from instdisc.errors import StageError

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, StageError) as err:
        log.error("%s failed: %s", args.command, err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
