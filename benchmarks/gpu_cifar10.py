"""ResNet-18 InstDisc on CIFAR-10 on one GPU: img/s and kNN top-1 per epoch (one command, <= 8 min).

    python benchmarks/gpu_cifar10.py --zip ../shared/data/cifar10/cifar10.zip --minutes 6

Prepares the CIFAR-10 archive (60k JPEGs -> one uint8 array), then trains the paper's network
(full-width ResNet-18, CIFAR stem, NCE m=4096, tau 0.07, SGD lr 0.03) with the whole training set
held on the GPU, batch augmentation on the GPU, bf16 autocast and channels_last. Each epoch prints
training img/s and the kNN top-1 (k=200) of the bank vs 10k test features. Stops at --epochs or
when the time budget would be exceeded. Needs only torch, torchvision, numpy, pillow, pyyaml, tqdm.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instdisc.config import PrepareParams, PretrainParams  # noqa: E402
from instdisc.data.prepare import prepare  # noqa: E402
from instdisc.train import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=Path("../shared/data/cifar10/cifar10.zip"))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepare(PrepareParams(source=str(args.zip)), seed=0, out_dir=Path(tmp) / "cifar",
                progress=False)
        print(f"prepare: {time.perf_counter() - start:.1f} s", flush=True)
        deadline = time.perf_counter() + args.minutes * 60
        epochs = args.epochs
        params = PretrainParams(num_negatives=4096, temperature=0.07, batch_size=args.batch_size,
                                lr=args.lr, epochs=epochs, compile=args.compile,
                                monitor_queries=10_000)

        def on_epoch_end(row, epoch, history):
            print(f"epoch {row['epoch']:3d}  loss {row['loss']:.3f}  "
                  f"{row['images_per_second']:8.0f} img/s  kNN top-1 {row['knn_top1']:.2f}%  "
                  f"({row['seconds']:.1f} s)", flush=True)
            per_epoch = sum(r["seconds"] for r in history) / len(history) + 2.0
            if time.perf_counter() + per_epoch > deadline:
                raise TimeoutError

        try:
            fit(params, seed=0, device=device, prepared_dir=Path(tmp) / "cifar",
                checkpoint_path=Path(tmp) / "last.pt", on_epoch_end=on_epoch_end)
        except TimeoutError:
            print("time budget reached", flush=True)
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
