"""DVC stage `pretrain`: `fit`, then the encoder file, metrics JSON, history CSV/PNG and MLflow."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from instdisc import checkpoint, plots, runtime, tracking
from instdisc.config import CommonParams, PretrainParams
from instdisc.train import fit, preprocess_meta

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("loss", "knn_top1", "z", "images_per_second")


def run_pretrain(params: PretrainParams, common: CommonParams, *, device: torch.device,
                 dist: runtime.DistInfo, prepared_dir: Path, encoder_path: Path,
                 checkpoint_path: Path, metrics_path: Path, plots_dir: Path) -> dict[str, float]:
    """Train (resuming if possible) and write every output of the stage; returns the metrics."""
    from instdisc.cli import write_json

    log.info("pretraining %s (width %.3g) with the %s loss on %s", params.arch, params.width,
             params.loss, device)
    history_csv = plots_dir / "pretrain_history.csv"
    with tracking.run("pretrain", {"seed": common.seed, "device": str(device),
                                   "world_size": dist.world_size, "pretrain": params},
                      enabled=dist.is_main) as run_id:
        def on_epoch_end(row: dict[str, float], epoch: int, history: list[dict]) -> None:
            tracking.log_metrics({k: v for k, v in row.items() if math.isfinite(v)}, step=epoch + 1)
            plots.write_history_csv(history, history_csv)

        trainer = fit(params, seed=common.seed, device=device, prepared_dir=prepared_dir,
                      checkpoint_path=checkpoint_path, dist=dist, on_epoch_end=on_epoch_end)
        runtime.barrier()
        if not dist.is_main:
            return {}
        history = trainer.history
        plots.write_history_csv(history, history_csv)
        plots.plot_history(history_csv, plots_dir / "pretrain_history.png",
                           columns=HISTORY_COLUMNS)
        encoder = trainer.encoder
        encoder = getattr(encoder, "_orig_mod", encoder)
        encoder = getattr(encoder, "module", encoder)
        z = history[-1]["z"] if history else float("nan")
        checkpoint.save_encoder(encoder_path, encoder, preprocess_meta(trainer.data), extra={
            "mlflow_run_id": run_id or "", "fingerprint": trainer.data.prepared.fingerprint,
            "epochs": len(history), "log_z": math.log(z) if z > 0 else float("nan")})
        last = history[-1] if history else {}
        metrics = {"epochs": len(history), "loss": last.get("loss"), "z": last.get("z"),
                   "knn_top1_monitor": last.get("knn_top1"),
                   "images_per_second": last.get("images_per_second"),
                   "train_seconds": sum(r["seconds"] for r in history)}
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in metrics.items()}
        write_json(metrics, metrics_path)
        for path in (metrics_path, history_csv, plots_dir / "pretrain_history.png"):
            tracking.log_artifact(path)
        log.info("wrote %s (%d epochs, final loss %.4f)", encoder_path, len(history),
                 metrics["loss"] or float("nan"))
        return metrics
