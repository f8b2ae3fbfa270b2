"""GPU check of the serving path (< 2 min on one H100): run where CUDA is, read the VERIFY lines.

    python benchmarks/gpu_onnx_check.py [--out DIR]
    python benchmarks/gpu_onnx_check.py --device cpu --seconds 0.2   # dry run of the script itself

1. In a fresh interpreter that never imports torch: `Embedder(device="cuda", strict=True)` gets
   CUDAExecutionProvider (ort.preload_dlls finds the nvidia-* wheels' CUDA/cuDNN), io_binding on,
   and `device="auto"` picks CUDA too.
2. fp32 ONNX on CUDA (TF32 off) vs torch fp32 on the CPU: max |diff| <= 1e-4 (the CPU gate's bound);
   fp16 ONNX on CUDA vs the same reference: <= 1e-2 (params.export.fp16_atol).
3. IO-binding and plain `session.run` give the same numbers on CUDA.
4. Throughput, images/s: ORT CUDA fp32 / fp16 vs torch CUDA eager fp32 / autocast fp16, ResNet-18
   at 224x224 (ImageNet stem) and 32x32 (CIFAR stem), batch 256.
5. `instdisc embed <folder> --device cuda --strict-device` on 300 JPEGs, then `instdisc search`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, sys
from instdisc.serving.embedder import Embedder
strict = Embedder(sys.argv[1], device=sys.argv[2], strict=True)
auto = Embedder(sys.argv[1], device="auto")
print(json.dumps({"strict_provider": strict.provider, "io_binding": strict.io_binding,
                  "auto_provider": auto.provider, "torch_imported": "torch" in sys.modules}))
"""


def verify(name: str, ok: bool, detail: str) -> bool:
    print(f"VERIFY {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def throughput(fn, batch: int, seconds: float) -> float:
    fn()
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write summary.json here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput figure")
    args = parser.parse_args()
    provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[args.device]

    import torch

    from instdisc.data.augment import MEAN, STD, eval_transform
    from instdisc.serving.embedder import Embedder
    from instdisc.export import model_info, reference_embeddings, to_onnx
    from instdisc.models.encoder import build_encoder

    results, ok = {"torch_cuda": torch.cuda.is_available()}, True
    tmp_dir = tempfile.TemporaryDirectory(prefix="gpu_onnx_check_")
    tmp = Path(tmp_dir.name)
    for size in (224, 32):
        torch.manual_seed(0)
        encoder = build_encoder("resnet18", 128, cifar_stem=size == 32).eval()
        meta = {"preprocess": {"mean": list(MEAN), "std": list(STD), "image_size": [size, size]},
                "encoder_config": encoder.config}
        info = model_info(encoder, meta, opset=20)
        paths = {dtype: tmp / f"r18_{size}_{dtype}.onnx" for dtype in ("fp32", "fp16")}
        start = time.perf_counter()
        for dtype, path in paths.items():
            to_onnx(encoder, info, path, half=dtype == "fp16")
        results[f"export_s_{size}"] = round(time.perf_counter() - start, 1)
        if size == 224:
            child = subprocess.run([sys.executable, "-c", CHILD, str(paths["fp32"]), args.device],
                                   capture_output=True, text=True)
            if child.returncode:
                print(child.stderr[-3000:])
            got = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {}
            results["no_torch_session"] = got
            ok &= verify("provider without torch", got.get("strict_provider") == provider
                         and not got.get("torch_imported"), str(got))
            ok &= verify("io binding default", got.get("io_binding") is (args.device == "cuda"),
                         str(got))
            ok &= verify("auto picks the device", got.get("auto_provider") == provider, str(got))
        pixels = np.random.default_rng(0).integers(0, 256, (256, size, size, 3), np.uint8)
        expected = reference_embeddings(encoder, pixels[:32])                    # (32, D) CPU fp32
        for dtype, bound in (("fp32", 1e-4), ("fp16", 1e-2)):
            embedder = Embedder(paths[dtype], device=args.device, strict=True, batch_size=256,
                                io_binding=True)
            diff = float(np.abs(embedder.run(pixels[:32]) - expected).max())
            ok &= verify(f"{dtype} {args.device} parity {size}", diff <= bound,
                         f"max|diff| {diff:.2e} <= {bound}")
            plain = embedder.session.run(None, {"images": pixels[:32]})[0]
            same = float(np.abs(plain - embedder.run(pixels[:32])).max())
            ok &= verify(f"{dtype} io binding == run {size}", same <= 1e-6, f"{same:.1e}")
            results[f"ort_{dtype}_img_s_{size}"] = round(
                throughput(lambda: embedder.run(pixels), 256, args.seconds))
        if args.device == "cuda":
            gpu = encoder.to("cuda")
            batch = torch.from_numpy(pixels).to("cuda")
            with torch.inference_mode():
                def eager(autocast: bool) -> None:
                    with torch.autocast("cuda", torch.float16, enabled=autocast):
                        gpu(eval_transform(batch))
                    torch.cuda.synchronize()
                for name, autocast in (("fp32", False), ("fp16", True)):
                    results[f"torch_{name}_img_s_{size}"] = round(
                        throughput(lambda: eager(autocast), 256, args.seconds))
        print(json.dumps({k: v for k, v in results.items() if k.endswith(f"_{size}")}),
              flush=True)

    folder = tmp / "photos"
    folder.mkdir()
    from PIL import Image

    photos = np.random.default_rng(1).integers(0, 256, (300, 96, 128, 3), np.uint8)
    for i, image in enumerate(photos):
        Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=90)
    model = ["--model", str(tmp / "r18_224_fp16.onnx"), "--device", args.device, "--strict-device"]
    start = time.perf_counter()
    embed = subprocess.run([sys.executable, "-m", "instdisc.cli", "embed", str(folder), "-o",
                            str(tmp / "index"), *model], capture_output=True, text=True)
    results["embed_cli_s"] = round(time.perf_counter() - start, 1)
    search = subprocess.run([sys.executable, "-m", "instdisc.cli", "search",
                             str(folder / "0007.jpg"), "--index", str(tmp / "index"), "-k", "3",
                             *model], capture_output=True, text=True)
    first = search.stdout.split("\n")[0].split()
    ok &= verify(f"embed + search CLI on {args.device}",
                 embed.returncode == 0 and search.returncode == 0
                 and first[1:] == ["1.0000", "0007.jpg"],
                 f"embed rc {embed.returncode}, search rc {search.returncode}, top hit {first}; "
                 f"{embed.stderr[-300:]}")
    results["all_passed"] = bool(ok)
    tmp_dir.cleanup()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
