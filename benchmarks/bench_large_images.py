"""File-backed training images: decode + RandomResizedCrop + colour jitter img/s per core.

    .venv/bin/python benchmarks/bench_large_images.py [--count 32] [--repeats 3] [--scene15]

Inputs are generated ImageNet-like JPEGs (quality 90, smooth gradients, blobs and sensor-like
noise: photo statistics, not white noise) at 500x375, 1000x750 and 2000x1500, read through the
real code path: `FileDataset` + `train_file_transform` at 224 px output, as pretrain runs it on
a file-backed split. Rows, all measured in this one run (the machine is shared: compare ratios):

- before: the code as it was before the file-path speedups (decode_rgb with its copy, per-sample
  `fork_rng` + `torch.manual_seed`, one v2.Compose on the full image), inlined below;
- after: `TrainFileTransform` (crop drawn before decoding, JPEG drafted to the crop's need,
  fused tensor conversion, cheap per-sample seeding) on the original files;
- after + prepare N: the same on the files `prepare` re-encodes with max_shorter_side N.

"per core" is images per CPU-second of this process with torch.set_num_threads(1) and no
workers; "2 workers" is wall-clock images per second through a DataLoader with that many workers.
With --scene15, the 200x200 JPEGs of ../shared/data/scene15/scene15.zip are measured too.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from instdisc.config import PrepareParams
from instdisc.data.augment import MEAN, STD
from instdisc.data.file_transforms import seeded_cpu_rng
from instdisc.data.loaders import FileDataset, train_file_transform
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.data.decode import decode_rgb

log = logging.getLogger("bench_large_images")
SIZES = ((500, 375), (1000, 750), (2000, 1500))
SCENE15 = Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15" / "scene15.zip"


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): gradients, soft blobs, edges and noise, about a photo's JPEG size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / 500
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        image[..., c] = (128 + 70 * np.sin(7 * (a * x + b * y) + 6 * p)
                         + 30 * np.cos(3 * (b * x - a * y)))
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width / 500), rng.uniform(0, height / 500), rng.uniform(.03, .3)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        hard = (mask > 0.5) * 0.6                         # an object edge inside the blob
        image = image * (1 - mask * 0.4 - hard) + rng.uniform(0, 255, 3) * (mask * 0.4 + hard)
    image += rng.normal(0, 9, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(root: Path, size: tuple[int, int], count: int) -> list[Path]:
    """`count` photo-like JPEGs (quality 90) as train/a/<i>.jpg under root, plus one test file."""
    paths = []
    for i in range(count + 1):
        path = root / ("test" if i == count else "train") / "a" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(*size, i)).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths[:-1]


def prepared_paths(source: Path, out: Path, max_shorter_side: int) -> list[Path]:
    """The training files of `source` as `prepare` stores them with that max_shorter_side."""
    prepare(PrepareParams(source=str(source), max_in_memory_size=64,
                          max_shorter_side=max_shorter_side, holdout_fraction=0.0),
            seed=0, out_dir=out, progress=False)
    return PreparedDataset.open(out).split("train").paths


class BeforeDataset(Dataset):
    """The file path as it was: full decode (+ copy), fork_rng + manual_seed, one v2.Compose."""

    def __init__(self, paths: list[Path], hue: float) -> None:
        self.paths = paths
        jitter = v2.ColorJitter(0.4, 0.4, 0.4, hue)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True), jitter,
            v2.RandomGrayscale(0.2), v2.RandomHorizontalFlip(), v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = decode_rgb(self.paths[index])[0].copy()  # the old decode_rgb copied
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), index


def per_core(dataset: Dataset, repeats: int) -> float:
    """Images per CPU-second, one thread, no workers: the best of `repeats` passes."""
    keys = [(i, 1000 + i) for i in range(len(dataset))]
    dataset[keys[0]]  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for key in keys:
            dataset[key]
        best = min(best, time.process_time() - start)
    return len(keys) / best


def with_workers(dataset: Dataset, workers: int, repeats: int) -> float:
    """Wall-clock images per second through a DataLoader with `workers` persistent workers."""
    keys = [(i, 1000 + i) for i in range(len(dataset))]
    batches = [keys[i:i + 16] for i in range(0, len(keys), 16)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                        persistent_workers=True)
    for _ in loader:  # warm-up epoch: worker start-up
        pass
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    return len(keys) / best


def drafting_error(paths: list[Path], hue: float) -> float:
    """Mean |drafted - full-size decode| of the same crops, in grey levels."""
    full = train_file_transform(224, hue=hue)
    full.draft = False
    drafted = train_file_transform(224, hue=hue)
    errors = []
    for i, path in enumerate(paths[:16]):
        with seeded_cpu_rng(i):
            a = drafted(path)
        with seeded_cpu_rng(i):
            b = full(path)
        errors.append((a - b).abs().mean().item() * 255 * float(np.mean(STD)))
    return float(np.mean(errors))


def measure(name: str, rows: dict[str, Callable[[], Dataset]], args: argparse.Namespace,
            mean_bytes: float) -> None:
    """Print per-core and 2-worker figures of each row, and ratios to the first (before)."""
    figures = {}
    for row, make in rows.items():
        torch.set_num_threads(1)
        core = per_core(make(), args.repeats)
        wall = with_workers(make(), args.workers, args.repeats) if args.workers else float("nan")
        figures[row] = (core, wall)
    base_core, base_wall = figures[next(iter(rows))]
    for row, (core, wall) in figures.items():
        print(f"{name:>20} {row:<26} {core:8.0f} {core / base_core:6.2f}x   "
              f"{wall:8.0f} {wall / base_wall:6.2f}x")
    log.info("%s: mean file %.0f kB", name, mean_bytes / 1e3)


def rows_for(paths: dict[str, list[Path]], hue: float) -> dict[str, Callable[[], Dataset]]:
    rows: dict[str, Callable[[], Dataset]] = {
        "before": lambda: BeforeDataset(paths["originals"], hue),
        "after": lambda: FileDataset(paths["originals"], train_file_transform(224, hue=hue))}
    for key, files in paths.items():
        if key != "originals":
            rows[f"after + {key}"] = (lambda f: lambda: FileDataset(
                f, train_file_transform(224, hue=hue)))(files)
    return rows


def scene15_paths(root: Path, count: int) -> list[Path]:
    """The first `count` training JPEGs of scene15.zip, extracted under root."""
    with zipfile.ZipFile(SCENE15) as archive:
        names = sorted(n for n in archive.namelist() if "/train/" in f"/{n}" and
                       n.lower().endswith(".jpg"))[:count]
        paths = []
        for i, name in enumerate(names):
            path = root / f"{i:04d}.jpg"
            path.write_bytes(archive.read(name))
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32, help="images per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="0: skip the DataLoader rows")
    parser.add_argument("--hues", type=float, nargs="+", default=[0.0, 0.4],
                        help="0.0: PretrainParams' default; 0.4: the paper's ColorJitter")
    parser.add_argument("--reencode", type=int, nargs="+", default=[256, 500],
                        help="prepare.max_shorter_side values to measure")
    parser.add_argument("--scene15", action="store_true", help=f"also {SCENE15} (if present)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("instdisc", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for width, height in SIZES:
            root = Path(tmp) / f"{width}x{height}"
            log.info("writing %d JPEGs of %dx%d", args.count, width, height)
            paths = {"originals": write_jpegs(root / "src", (width, height), args.count)}
            for side in args.reencode:
                paths[f"prepare {side}"] = prepared_paths(root / "src", root / f"p{side}", side)
            sets[f"{width}x{height}"] = paths
        if args.scene15 and SCENE15.is_file():
            (Path(tmp) / "scene15").mkdir()
            sets["scene15 200x200"] = {"originals": scene15_paths(Path(tmp) / "scene15",
                                                                  args.count)}
        print(f"224 px output, crop scale (0.2, 1), jitter 0.4, grayscale 0.2, flip; "
              f"{args.count} images a set; torch {torch.__version__}")
        for hue in args.hues:
            print(f"\nhue {hue}:  {'images':>11} {'pipeline':<26} {'img/s/core':>10} "
                  f"{'ratio':>6}  {f'{args.workers} workers':>10} {'ratio':>6}")
            for name, paths in sets.items():
                mean_bytes = np.mean([p.stat().st_size for p in paths["originals"]])
                measure(name, rows_for(paths, hue), args, mean_bytes)
        print("\nmean |drafted - full decode| of the same crops (grey levels, hue 0): " + ", ".join(
            f"{name} {drafting_error(p['originals'], 0.0):.2f}" for name, p in sets.items()))


if __name__ == "__main__":
    main()
