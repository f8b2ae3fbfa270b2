"""Training throughput and peak memory on CPU for a fixed small config (prints figures).

    .venv/bin/python benchmarks/bench_train.py [--width 0.25] [--epochs 2] [--threads 2]

Defaults: ResNet-18 (CIFAR stem) at width 0.25 and 1.0, NCE m=1024, batch 128, 32x32 synthetic
images (2,560 train). Reports img/s of the last epoch (the first warms up) and peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
from pathlib import Path

import torch

from instdisc.config import PrepareParams, PretrainParams, SyntheticParams
from instdisc.data.prepare import prepare
from instdisc.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--loss", default="nce")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prepared"
        prepare(PrepareParams(synthetic=SyntheticParams(10, args.per_class, 20, 32)), seed=0,
                out_dir=data, progress=False)
        print(f"{'width':>6} {'loss':>10} {'img/s':>8} {'epoch s':>8} {'peak RSS MiB':>13}")
        for width in args.widths:
            params = PretrainParams(width=width, loss=args.loss, num_negatives=256,
                                    epochs=args.epochs, monitor_queries=0, num_workers=0)
            trainer = fit(params, seed=0, device=torch.device("cpu"), prepared_dir=data,
                          checkpoint_path=Path(tmp) / f"ckpt-{width}.pt")
            last = trainer.history[-1]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{width:>6.2f} {args.loss:>10} {last['images_per_second']:>8.0f} "
                  f"{last['seconds']:>8.1f} {peak:>13.0f}")


if __name__ == "__main__":
    main()
