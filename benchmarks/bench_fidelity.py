"""Fidelity on real data: kNN top-1 after pretraining on a CIFAR-10 subset (prints figures).

    .venv/bin/python benchmarks/bench_fidelity.py                       # softmax and NCE m=4096
    .venv/bin/python benchmarks/bench_fidelity.py --run nce-m1 loss=nce num_negatives=1 \
        --run hue0 loss=softmax hue=0.0 --epochs 30

The config is issue 7's CPU-scale check: 10% of every CIFAR-10 training class (5,000 images),
all 10,000 test images, quarter-width ResNet-18 with the CIFAR stem, 30 epochs, batch 128,
tau 0.1, constant lr 0.03, weighted kNN with k = 200 on features recomputed by the encoder (and
by a random-init encoder of the same architecture, the baseline). Every `--run NAME k=v ...`
overrides `PretrainParams` fields for one run. The prepared subset is cached in `--cache`.
Results are printed as a table and appended as JSON lines to `--out`; with `--plots DIR`, each
run's per-epoch monitor (kNN and the label-free metrics, epoch 0 = random init) also goes to
DIR/<run>_monitor.csv and DIR/<run>_label_free.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from instdisc import plots, runtime
from instdisc.config import PrepareParams, PretrainParams
from instdisc.data import loaders
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate import label_free
from instdisc.evaluate.knn import compute_features, knn_accuracy
from instdisc.models.encoder import build_encoder
from instdisc.train import fit

log = logging.getLogger("bench_fidelity")

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.zip"
# Issue 7's subset config; the paper's recipe differs in width (1.0), epochs (200), schedule.
SUBSET_CONFIG: dict[str, Any] = {
    "arch": "resnet18", "cifar_stem": True, "width": 0.25, "feature_dim": 128, "epochs": 30,
    "batch_size": 128, "temperature": 0.1, "lr": 0.03, "lr_milestones": (), "momentum": 0.9,
    "weight_decay": 5e-4, "bank_momentum": 0.5, "num_negatives": 4096, "monitor_queries": 1000,
    "num_workers": 0,
}
DEFAULT_RUNS = [("softmax", {"loss": "softmax"}), ("nce-m4096", {"loss": "nce"})]


def prepared_subset(source: Path, fraction: float, cache: Path) -> Path:
    """The prepared subset in `cache` (made once per source and fraction)."""
    out = cache / f"{source.stem}-{fraction:g}"
    if not (out / "meta.json").is_file() or PreparedDataset.open(out).normalization is None:
        log.info("preparing %s (train fraction %g) into %s", source, fraction, out)
        prepare(PrepareParams(source=str(source), train_fraction=fraction), seed=0, out_dir=out,
                progress=False)
    return out


def knn_top1(encoder: torch.nn.Module, prepared: PreparedDataset, device: torch.device, k: int,
             sigma: float) -> float:
    """Weighted-kNN top-1 (%) of all test images against all (unaugmented) training images."""
    feats = {}
    for name in ("train", "test"):
        split = prepared.split(name)
        feats[name] = compute_features(encoder, loaders.eval_batches(split, 512, device),
                                       split.num_items, device, progress=False)
    train, test = prepared.split("train"), prepared.split("test")
    return knn_accuracy(feats["train"], train.labels.to(device), feats["test"],
                        test.labels.to(device), num_classes=len(prepared.classes), k=k,
                        sigma=sigma)["top1"]


def write_monitor(name: str, rows: list[dict[str, float]], out_dir: Path) -> dict[str, float]:
    """<name>_monitor.csv and <name>_label_free.png in `out_dir`; returns the agreement of each
    label-free metric with the kNN monitor (Spearman rank correlation across epochs)."""
    agreement = label_free.agreement_with_knn(rows)
    columns = ("epoch", "knn_top1", *label_free.METRICS)
    plots.write_history_csv([{c: r.get(c) for c in columns} for r in rows],
                            out_dir / f"{name}_monitor.csv")
    plots.plot_monitor(rows, out_dir / f"{name}_label_free.png", columns[1:],
                       titles=label_free.monitor_titles(agreement))
    return agreement


def run_one(name: str, overrides: dict[str, Any], data_dir: Path, work: Path, seed: int,
            k: int, plots_dir: Path | None = None) -> dict[str, Any]:
    params = PretrainParams(**{**SUBSET_CONFIG, **overrides})
    device = torch.device("cpu")
    prepared = PreparedDataset.open(data_dir)
    start = time.perf_counter()
    ckpt = work / f"{name}.pt"
    ckpt.unlink(missing_ok=True)
    trainer = fit(params, seed=seed, device=device, prepared_dir=data_dir, checkpoint_path=ckpt)
    seconds = time.perf_counter() - start
    trained = knn_top1(trainer.encoder, prepared, device, k, params.temperature)
    runtime.seed_everything(seed)
    random_init = build_encoder(params.arch, params.feature_dim, params.cifar_stem,
                                params.width, params.init).to(device)
    baseline = knn_top1(random_init, prepared, device, k, params.temperature)
    history = trainer.history
    monitored = [trainer.initial, *history]
    agreement = write_monitor(name, monitored, plots_dir) if plots_dir else \
        label_free.agreement_with_knn(monitored)
    return {"run": name, "overrides": overrides, "knn_top1": round(trained, 2),
            "random_init_top1": round(baseline, 2), "final_loss": history[-1]["loss"],
            "z": [r["z"] for r in history], "loss": [r["loss"] for r in history],
            "monitor": [r["knn_top1"] for r in history], "train_seconds": round(seconds, 1),
            "label_free": [{m: r.get(m) for m in ("epoch", *label_free.METRICS)}
                           for r in monitored], "label_free_vs_knn": agreement,
            "images_per_second": round(history[-1]["images_per_second"], 1),
            "params": dataclasses.asdict(params)}


def parse_runs(groups: list[list[str]] | None) -> list[tuple[str, dict[str, Any]]]:
    if not groups:
        return DEFAULT_RUNS
    runs = []
    for name, *pairs in groups:
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise SystemExit(f"--run {name}: expected key=value, got {pair!r}")
            overrides[key] = yaml.safe_load(value)
            if isinstance(overrides[key], list):
                overrides[key] = tuple(overrides[key])
        runs.append((name, overrides))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=CIFAR10)
    parser.add_argument("--train-fraction", type=float, default=0.1)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--run", nargs="+", action="append", metavar="NAME K=V",
                        help="one run: a name and PretrainParams overrides")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs of every run")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/fidelity.jsonl"))
    parser.add_argument("--plots", type=Path, default=None,
                        help="folder for each run's monitor CSV and label-free PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found: the benchmark needs CIFAR-10 (../shared/data)")
    data_dir = prepared_subset(args.source, args.train_fraction, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name, overrides in parse_runs(args.run):
        if args.epochs is not None:
            overrides = {**overrides, "epochs": args.epochs}
        result = run_one(name, overrides, data_dir, args.cache, args.seed, args.k, args.plots)
        results.append(result)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        log.info("%s: kNN %.2f (random init %.2f) in %.0f s; label-free rank corr. with kNN %s",
                 name, result["knn_top1"], result["random_init_top1"], result["train_seconds"],
                 {m: round(rho, 2) for m, rho in result["label_free_vs_knn"].items()})
    print(f"{'run':<24} {'kNN top-1':>9} {'random':>7} {'loss':>8} {'train s':>8} {'img/s':>7}")
    for r in results:
        print(f"{r['run']:<24} {r['knn_top1']:>9.2f} {r['random_init_top1']:>7.2f} "
              f"{r['final_loss']:>8.3f} {r['train_seconds']:>8.0f} {r['images_per_second']:>7.0f}")


if __name__ == "__main__":
    main()
