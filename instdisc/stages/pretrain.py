"""DVC stage `pretrain`: InstDisc training -> models/encoder.pt, metrics, per-epoch plots.

params.yaml: `seed`, `device`, `pretrain`. With `pretrain.nproc_per_node` > 1 (or `nnodes` > 1)
the stage re-runs itself under torchrun, so `dvc repro` and `dvc exp run -S
pretrain.nproc_per_node=8` train on several GPUs and dvc.lock records it; every rank trains, only
rank 0 writes outputs and MLflow runs. The encoder file holds no run id or timing, so the same inputs
give the same bytes (the MLflow run records which run wrote it).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.errors import StageError
from instdisc.io import file_sha256
from instdisc.stages import _common

NAME = "pretrain"
MODULE = "instdisc.stages.pretrain"  # what torchrun runs when nproc_per_node > 1
HELP = "Train the encoder by instance discrimination."
HISTORY_COLUMNS = ("loss", "knn_top1", "z", "images_per_second")
MONITOR_COLUMNS = ("knn_top1", "retrieval_top1", "uniformity", "alignment", "alignment_ratio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME, encoder=False, data=True)
    parser.add_argument("--out", type=Path, default=_common.ENCODER,
                        help="encoder file (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=_common.CHECKPOINT,
                        help="resumable training checkpoint (default: %(default)s)")
    parser.add_argument("--plots", type=Path, default=_common.PLOTS,
                        help="folder of the history CSV/PNG (default: %(default)s)")


def stage_arguments(args: argparse.Namespace) -> list[str]:
    """This invocation's options, for the processes torchrun starts."""
    return ["--params", str(args.params), "--data", str(args.data), "--metrics",
            str(args.metrics), "--out", str(args.out), "--checkpoint", str(args.checkpoint),
            "--plots", str(args.plots)]


def launch(command: list[str]) -> dict[str, Any]:
    """Run the stage as `command` (torchrun); its workers write the outputs. Returns {}."""
    _common.log.info("pretrain.nproc_per_node > 1: launching %s", " ".join(command[1:]))
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise StageError(f"torchrun exited with {code} (see the worker logs above)")
    return {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (resuming if possible) and write every output of the stage; returns the metrics."""
    from instdisc import checkpoint, plots, runtime
    from instdisc.evaluate import label_free
    from instdisc.train import fit, preprocess_meta

    params, common = _common.load(args.params, NAME)
    command = runtime.launch_command(MODULE, stage_arguments(args), params.nproc_per_node,
                                     params.nnodes, params.rdzv_endpoint)
    if command is not None:
        return launch(command)
    dist = runtime.init_distributed(common.device)
    device = runtime.resolve_device(common.device, dist.local_rank)
    _common.log.info("pretraining %s (width %.3g) with the %s loss on %s", params.arch,
                     params.width, params.loss, device)
    history_csv = args.plots / "pretrain_history.csv"
    history_png = args.plots / "pretrain_history.png"
    monitor_png = args.plots / "pretrain_label_free.png"
    with tracking.run(NAME, {"seed": common.seed, "device": str(device),
                             "world_size": dist.world_size, "pretrain": params},
                      enabled=dist.is_main):
        def on_epoch_end(row: dict[str, float], epoch: int, history: list[dict]) -> None:
            tracking.log_metrics(row, step=epoch + 1)
            plots.write_history_csv(history, history_csv)

        trainer = fit(params, seed=common.seed, device=device, prepared_dir=args.data,
                      checkpoint_path=args.checkpoint, dist=dist, on_epoch_end=on_epoch_end)
        runtime.barrier()
        if not dist.is_main:
            return {}
        history = trainer.history
        plots.write_history_csv(history, history_csv)
        plots.plot_history(history_csv, history_png, columns=HISTORY_COLUMNS)
        monitored = [trainer.initial, *history] if trainer.initial else history
        agreement = label_free.agreement_with_knn(monitored)
        plots.plot_monitor(monitored, monitor_png, MONITOR_COLUMNS,
                           titles=label_free.monitor_titles(agreement))
        artifacts = [history_csv, history_png, monitor_png]
        if trainer.initial:
            tracking.log_metrics(trainer.initial, step=0)
        tracking.log_metrics({f"label_free_vs_knn.{k}": v for k, v in agreement.items()})
        encoder = getattr(trainer.encoder, "_orig_mod", trainer.encoder)
        encoder = getattr(encoder, "module", encoder)
        z = history[-1]["z"] if history else float("nan")
        checkpoint.save_encoder(args.out, encoder, preprocess_meta(trainer.data), extra={
            "fingerprint": trainer.data.prepared.fingerprint, "epochs": len(history),
            "log_z": math.log(z) if z > 0 else float("nan")})
        tracking.set_tags({_common.ENCODER_TAG: file_sha256(args.out)})  # export finds this run by it
        last = history[-1] if history else {}
        metrics = {"epochs": len(history),
                   "steps": len(history) * trainer.schedule.steps_per_epoch,
                   "loss": last.get("loss"), "z": last.get("z"),
                   "knn_top1_monitor": last.get("knn_top1"),
                   "images_per_second": last.get("images_per_second"),
                   "train_seconds": sum(r["seconds"] for r in history),
                   "monitor_seconds": sum(r.get("monitor_seconds", 0.0) for r in history),
                   "label_free": {name: last[name] for name in label_free.METRICS
                                  if name in last},
                   "random_init": {k: v for k, v in trainer.initial.items() if k != "epoch"},
                   "label_free_vs_knn": agreement}
        _common.finish(NAME, metrics, args.metrics, artifacts=artifacts,
                       log_metrics=False)  # per-epoch values are logged by on_epoch_end
    loss = metrics["loss"]
    _common.log.info("wrote %s (%d epochs, final loss %.4f)", args.out, len(history),
                     loss if loss is not None else float("nan"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
