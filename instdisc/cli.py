"""`instdisc <stage>` (one subcommand per DVC stage) and `instdisc embed | search | serve`.

Argument parsing only: a stage subcommand is `instdisc/stages/<stage>.py` (its options, its run),
`embed`, `search` and `serve` call `instdisc.serving`. Nothing imports this module. They need only
onnxruntime, numpy and Pillow at run time (`serve` also fastapi, uvicorn and python-multipart;
mlflow for a registry URI): importing this module imports neither torch, dvc nor prefect.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from instdisc.stages import (
    _common, detection, evaluate, export, index, linear, places, prepare, pretrain,
    semi_supervised)

log = logging.getLogger("instdisc")

STAGE_MODULES = (prepare, pretrain, evaluate, export, index, linear, places, semi_supervised,
                 detection)


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def _open_embedder(args: argparse.Namespace, strict: bool | None = None):
    from instdisc.serving.embedder import Embedder

    model = str(args.model)
    if _is_uri(model):
        from instdisc import tracking

        model = tracking.download_onnx_model(model)
    return Embedder(model, device=args.device,
                    strict=args.strict_device if strict is None else strict,
                    batch_size=args.batch_size, threads=args.threads)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve /embed, /search, /health, /ready, /metadata over HTTP (blocks until stopped)."""
    import os

    from instdisc.serving.app import Limits, create_app
    from instdisc.serving.search import load_index
    from instdisc.serving.server import ServerLimits, serve

    version = None
    if _is_uri(str(args.model)) and str(args.model).startswith("models:/"):
        from instdisc import tracking

        version = tracking.registry_version(str(args.model))
    given = {key: getattr(args, key) for key in ("max_body_bytes", "max_pixels", "max_aspect",
                                                 "max_images", "max_k", "body_timeout_s",
                                                 "max_pending")}
    limits = Limits(**{key: value for key, value in given.items() if value is not None})
    given = {key: getattr(args, key) for key in ("max_connections", "header_timeout_s",
                                                 "keep_alive_s", "shutdown_timeout_s")}
    server_limits = ServerLimits(**{k: v for k, v in given.items() if v is not None})
    api_key = os.environ.get("INSTDISC_API_KEY") or None
    if args.api_key_file is not None:
        api_key = args.api_key_file.read_text().strip()
        if not api_key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(--api-key-file or INSTDISC_API_KEY)", args.host)
    index = load_index(args.index) if args.index else None
    ann, kind = None, None
    if args.ann:
        if index is None:
            raise ValueError("serve --ann needs --index <folder written by instdisc embed --ann>")
        from instdisc.serving.ann import load_faiss_with_meta

        ann, meta = load_faiss_with_meta(args.index)
        kind = meta["kind"]
        log.info("/search answers from the FAISS %s index (recall@10 %.3f vs exact when built); "
                 "?exact=true for exact search", kind, meta.get("recall@10", float("nan")))
    app = create_app(_open_embedder(args, strict=not args.allow_cpu_fallback), index=index,
                     model_version=version, limits=limits, max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, decode_threads=args.decode_threads,
                     ann=ann, ann_kind=kind, api_key=api_key, docs=args.docs,
                     server_limits=server_limits)
    serve(app, host=args.host, port=args.port, limits=server_limits,
          access_log=not args.no_access_log)


def cmd_embed(args: argparse.Namespace) -> None:
    """Embed every image of a folder, archive or list file into an index folder."""
    from instdisc.serving.index import build_index

    report = build_index(_open_embedder(args), args.source, args.output,
                         shard_size=args.shard_size, overwrite=args.overwrite)
    log.info("embedded %d images into %s (%d unreadable, listed in %s)", report["num_items"],
             args.output, len(report["failed"]), Path(args.output) / "index.json")
    if args.ann:
        from instdisc.serving.ann import build_for_index

        build_for_index(args.output, args.ann)  # logs recall@10 against exact search


def cmd_search(args: argparse.Namespace) -> None:
    """Print the k nearest neighbours of one image in an index (exact cosine search)."""
    from instdisc.serving.search import load_index, nearest, save_grid

    index = load_index(args.index)
    embedder = _open_embedder(args)
    if args.ann:  # approximate; exact search is the default and the reference
        from instdisc.serving.ann import ann_search, load_faiss

        index.check_model(embedder)
        scores, rows = ann_search(load_faiss(args.index), embedder.embed([args.image]), args.k)
        hits = [(index.ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
    else:
        hits = nearest(index, embedder, args.image, k=args.k, chunk_size=args.chunk_size)
    if args.json:
        json.dump([{"id": i, "score": s} for i, s in hits], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for rank, (item_id, score) in enumerate(hits, 1):
            sys.stdout.write(f"{rank:>3}  {score:.4f}  {item_id}\n")
    if args.grid:
        save_grid(args.image, hits, index, args.grid)
        log.info("wrote %s", args.grid)


def _add_runtime_args(p: argparse.ArgumentParser, strict_flag: bool = True) -> None:
    p.add_argument("--model", default=str(_common.ONNX_MODEL),
                   help="ONNX file, or a registry URI such as models:/instdisc-encoder@candidate "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider: cuda first, cpu, or auto (default: %(default)s)")
    if strict_flag:
        p.add_argument("--strict-device", action="store_true",
                       help="fail instead of falling back to the CPU when CUDA cannot be used")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: onnxruntime's, one per physical core)")


def _add_serving(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--ann", choices=("hnsw", "ivf"), default=None,
                   help="also build a FAISS index (faiss.index) and report its recall@10 "
                        "against exact search; `search --ann` uses it")
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
    p.add_argument("--ann", action="store_true",
                   help="use the index's FAISS index (approximate) instead of exact search")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_search)
    _add_serve(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    text = "Serve the encoder (and an index) over HTTP: /embed, /search, /ready, /metadata."
    p = sub.add_parser("serve", help=text, description=text)
    _add_runtime_args(p, strict_flag=False)
    p.add_argument("--allow-cpu-fallback", action="store_true",
                   help="start on the CPU when CUDA was asked for (--device cuda, or auto on a "
                        "host with an NVIDIA driver) but cannot be used; default: refuse")
    p.add_argument("--index", type=Path, default=None,
                   help="index folder written by `instdisc embed`, for /search")
    p.add_argument("--ann", action="store_true",
                   help="answer /search from the index's FAISS index (`instdisc embed --ann`); "
                        "?exact=true still searches exactly")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most images grouped into one session run (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long the first request of a group waits for others "
                        "(default: %(default)s)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="image decoding threads (default: min(4, CPU count))")
    for flag, what in [("--max-body-bytes", "largest request body, else 413 (default: 16 MiB)"),
                       ("--max-pixels", "largest image, width x height read before decoding, "
                                        "else 413 (default: 40 million)"),
                       ("--max-aspect", "largest longer/shorter side ratio, read before "
                                        "decoding, else 413 (default: 20)"),
                       ("--max-images", "most files in one multipart request (default: 64)"),
                       ("--max-k", "largest k for /search (default: 1000)"),
                       ("--max-pending", "most images being decoded or embedded at once, "
                                         "else 503 (default: 256)"),
                       ("--max-connections", "open connections; more are closed at once "
                                             "(default: 1000)")]:
        p.add_argument(flag, type=int, default=None, help=what)  # defaults: Limits, ServerLimits
    for flag, dest, what in [
            ("--body-timeout", "body_timeout_s", "seconds for a request body to arrive, else "
                                                 "408 (default: 30)"),
            ("--header-timeout", "header_timeout_s", "seconds for a request head to arrive, "
                                                     "else the connection is closed (default: 10)"),
            ("--keep-alive", "keep_alive_s", "idle keep-alive seconds (default: 5)"),
            ("--shutdown-timeout", "shutdown_timeout_s", "seconds requests in flight get on "
                                                         "SIGTERM before exit (default: 10)")]:
        p.add_argument(flag, dest=dest, type=float, default=None, help=what)
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="file holding the API key every route but /health requires as "
                        "'Authorization: Bearer <key>' (or set INSTDISC_API_KEY)")
    p.add_argument("--docs", action="store_true", help="publish /docs and /openapi.json")
    p.add_argument("--no-access-log", action="store_true",
                   help="no log line per request (default: uvicorn's access log)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instdisc", description="Non-parametric instance discrimination pipeline stages.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for module in STAGE_MODULES:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    _add_serving(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `instdisc` console script."""
    args = build_parser().parse_args(argv)
    return _common.run_logged(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
