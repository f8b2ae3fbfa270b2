"""GPU check of `pretrain.decode: device` (< 2 min on one H100/H200): read the VERIFY lines.

    python benchmarks/gpu_decode_check.py [--count 512]
    python benchmarks/gpu_decode_check.py --device cpu --count 32     # dry run of the script

The device path has only run on the CPU (libjpeg-turbo through the same torchvision call); this is
what must hold on CUDA before `decode: auto` may become the default:

1. `decode_images` on the device (nvJPEG) vs on the CPU: same shapes for every file (JPEG RGB,
   grayscale JPEG, CMYK JPEG and PNG through the Pillow fallback), mean |diff| <= 2 grey levels
   (decoders may round IDCT differently).
2. `DeviceDecoder` draws the same crop boxes on either device for the same seeds, and its output
   is finite, normalised float (B, 3, 224, 224).
3. Throughput, images/s: DataLoader (bytes only, 4 workers) + `DeviceDecoder` on the device vs
   the CPU path (`FileDataset` + `TrainFileTransform`, 4 workers), 500x375 JPEGs at 224 px.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large_images import photo  # noqa: E402  (the photo-like JPEG generator)

from instdisc.data.augment import BatchAugment  # noqa: E402
from instdisc.data.device_decode import (  # noqa: E402
    DeviceDecoder,
    FileBytesDataset,
    collate_bytes,
    decode_images,
)
from instdisc.data.loaders import FileDataset, train_file_transform  # noqa: E402


def verify(name: str, ok: bool, detail: str) -> bool:
    print(f"VERIFY {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def write_files(root: Path, count: int) -> list[Path]:
    """`count` 500x375 RGB JPEGs, then one grayscale JPEG, one CMYK JPEG and one PNG."""
    paths = []
    for i in range(count):
        paths.append(root / f"{i:05d}.jpg")
        Image.fromarray(photo(500, 375, i)).save(paths[-1], format="JPEG", quality=90)
    extra = Image.fromarray(photo(320, 240, count))
    for name, image, fmt in (("gray.jpg", extra.convert("L"), "JPEG"),
                             ("cmyk.jpg", extra.convert("CMYK"), "JPEG"),
                             ("plain.png", extra, "PNG")):
        paths.append(root / name)
        image.save(paths[-1], format=fmt)
    return paths


def throughput(loader: DataLoader, step, device: torch.device) -> float:
    """Images per second over one pass of `loader`, `step(batch)` -> a (B, ...) tensor."""
    seen, start = 0, time.perf_counter()
    for batch in loader:
        out = step(batch)
        seen += out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(Path(tmp), args.count)
        sample = [FileBytesDataset(paths)[(i, 0)][0] for i in range(len(paths))]
        sample = sample[:16] + sample[-3:]                                 # RGB, gray, CMYK, PNG
        on_device = decode_images(sample, device)
        on_cpu = decode_images(sample, torch.device("cpu"))
        shapes = all(a.shape == b.shape for a, b in zip(on_device, on_cpu))
        diffs = [float((a.cpu().float() - b.float()).abs().mean())
                 for a, b in zip(on_device, on_cpu)]
        ok &= verify("decode", shapes and max(diffs) <= 2.0,
                     f"shapes equal {shapes}, mean |diff| max {max(diffs):.3f} grey levels "
                     f"(JPEG {np.mean(diffs[:16]):.3f}, gray/CMYK/PNG "
                     f"{', '.join(f'{d:.3f}' for d in diffs[16:])})")
        augment = BatchAugment(224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        seeds = list(range(len(sample)))
        gpu_boxes = DeviceDecoder(augment, device).crop_boxes(on_device, seeds)
        cpu_boxes = DeviceDecoder(augment, torch.device("cpu")).crop_boxes(on_cpu, seeds)
        out = DeviceDecoder(augment, device)(sample, torch.tensor(seeds))
        ok &= verify("crops", gpu_boxes == cpu_boxes and tuple(out.shape) == (len(sample), 3,
                                                                              224, 224)
                     and bool(torch.isfinite(out).all()),
                     f"boxes equal {gpu_boxes == cpu_boxes}, output {tuple(out.shape)} "
                     f"{out.dtype} on {out.device}, mean {float(out.mean()):+.3f} "
                     f"std {float(out.std()):.3f}")

        keys = [[(i, i) for i in range(s, min(s + 128, args.count))]
                for s in range(0, args.count, 128)]
        bytes_loader = DataLoader(FileBytesDataset(paths), batch_sampler=keys,
                                  num_workers=args.workers, collate_fn=collate_bytes)
        decoder = DeviceDecoder(augment, device)
        device_rate = throughput(bytes_loader, lambda b: decoder(b[0], b[2]), device)
        cpu_loader = DataLoader(FileDataset(paths, train_file_transform(224)),
                                batch_sampler=keys, num_workers=args.workers)
        cpu_rate = throughput(cpu_loader, lambda b: b[0].to(device, non_blocking=True), device)
        print(f"THROUGHPUT device decode {device_rate:.0f} img/s, CPU workers ({args.workers}) "
              f"{cpu_rate:.0f} img/s on {device}", flush=True)
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
