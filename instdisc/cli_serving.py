"""`instdisc export | embed | search`: serving subcommands, added to the main parser by `register`.

`export` is the DVC stage (params.yaml section `export`); `embed` and `search` are user tools that
need only onnxruntime, numpy and Pillow at run time (torch is imported by `export` alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
ENCODER = Path("models/encoder.pt")
PREPARED = Path("data/prepared")
ONNX_MODEL = Path("models/encoder.onnx")
METRICS = Path("metrics/export.json")


def cmd_export(args: argparse.Namespace) -> None:
    """Stage `export`: models/encoder.pt -> models/encoder.onnx (+ fp16), parity gate, registry."""
    from instdisc import config
    from instdisc.cli import write_json
    from instdisc.export import run_export

    params = config.load_section(args.params, "export")
    common = config.load_common(args.params)
    metrics = run_export(params, args.encoder, args.data, args.out, device=common.device)
    write_json(metrics, args.metrics)
    log.info("exported %s: parity max |diff| %.2e, min cosine %.7f%s", args.out,
             metrics["parity"]["max_abs_diff"], metrics["parity"]["min_cosine"],
             f", registered as version {metrics['registry']['version']}"
             if metrics.get("registry") else "")


def _open_embedder(args: argparse.Namespace):
    from instdisc.embedder import Embedder

    model = str(args.model)
    if "://" in model or model.startswith("models:/") or model.startswith("runs:/"):
        from instdisc import tracking

        model = tracking.download_onnx_model(model)
    return Embedder(model, device=args.device, strict=args.strict_device,
                    batch_size=args.batch_size, threads=args.threads)


def cmd_embed(args: argparse.Namespace) -> None:
    """Embed every image of a folder, archive or list file into an index folder."""
    from instdisc.embed_index import build_index

    embedder = _open_embedder(args)
    report = build_index(embedder, args.source, args.output, shard_size=args.shard_size,
                         overwrite=args.overwrite)
    log.info("embedded %d images into %s (%d unreadable, listed in %s)", report["num_items"],
             args.output, len(report["failed"]), Path(args.output) / "index.json")


def cmd_search(args: argparse.Namespace) -> None:
    """Print the k nearest neighbours of one image in an index (exact cosine search)."""
    from instdisc.search import load_index
    from instdisc.search import save_grid, search

    index = load_index(args.index)
    embedder = _open_embedder(args)
    index.check_model(embedder)
    query = embedder.embed([args.image])                         # (1, D)
    scores, rows = search(index.embeddings, query, k=args.k, chunk_size=args.chunk_size)
    hits = [(index.ids[r], float(s)) for r, s in zip(rows[0].tolist(), scores[0].tolist())]
    if args.json:
        json.dump([{"id": i, "score": s} for i, s in hits], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for rank, (item_id, score) in enumerate(hits, 1):
            sys.stdout.write(f"{rank:>3}  {score:.4f}  {item_id}\n")
    if args.grid:
        save_grid(args.image, hits, index, args.grid)
        log.info("wrote %s", args.grid)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(ONNX_MODEL),
                   help="ONNX file, or a registry URI such as models:/instdisc-encoder@candidate "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider: cuda first, cpu, or auto (default: %(default)s)")
    p.add_argument("--strict-device", action="store_true",
                   help="fail instead of falling back to the CPU when CUDA cannot be used")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: onnxruntime's, one per physical core)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export`, `embed` and `search` subcommands to the `instdisc` parser."""
    text = "Export the encoder to ONNX, check parity with PyTorch, register it in MLflow."
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("--params", type=Path, default=PARAMS, help="params file (default: %(default)s)")
    p.add_argument("--encoder", type=Path, default=ENCODER,
                   help="encoder file (default: %(default)s)")
    p.add_argument("--data", type=Path, default=PREPARED,
                   help="prepared dataset whose test images drive the parity check "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=ONNX_MODEL,
                   help="ONNX file; the fp16 variant goes next to it as *.fp16.onnx "
                        "(default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=METRICS, help="(default: %(default)s)")
    p.set_defaults(func=cmd_export)

    text = "Embed the images of a folder, .zip/.tar archive or list file into an index folder."
    p = sub.add_parser("embed", help=text, description=text)
    p.add_argument("source", type=Path, nargs="+",
                   help="a folder (searched recursively), a .zip/.tar/.tar.gz archive, a .txt "
                        "file listing one image path per line, or image files")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="index folder: embeddings.npy, ids.txt, index.json; an unfinished run "
                        "resumes from the shards it left there")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="images per resumable shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished index")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_embed)

    text = "Find the nearest neighbours of an image in an index (exact cosine similarity)."
    p = sub.add_parser("search", help=text, description=text)
    p.add_argument("image", type=Path, help="query image file")
    p.add_argument("--index", type=Path, required=True, help="index folder written by `embed`")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=65536,
                   help="index rows scored at a time; bounds memory (default: %(default)s)")
    p.add_argument("--grid", type=Path, default=None,
                   help="also save a PNG of the query and its neighbours here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_search)
