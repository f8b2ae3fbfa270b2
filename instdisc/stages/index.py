"""DVC stage `index`: models/encoder.onnx + data/prepared -> models/index (what `serve` searches).

params.yaml: `index`, `device`. Embeds every image of the prepared split `index.split` with the
exported ONNX model, preprocessed as the service preprocesses uploads, into an index folder in
the layout `instdisc embed` writes (`instdisc.serving.index`); `index.ann: hnsw|ivf` adds a
FAISS index with its recall@10 against exact search. Ids are `<split>/<class>/<row>` (row = the
prepared row, 6 digits), `<split>/<row>` on an unlabelled set. After `make pipeline`:
`instdisc serve --model models/encoder.onnx --index models/index` (+ `--ann`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from instdisc.stages import _common

NAME = "index"
HELP = "Embed a prepared split with the exported model into an index for serve --index."
INDEX = Path("models/index")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_arguments(parser, NAME, encoder=False, data=True)
    parser.add_argument("--model", type=Path, default=_common.ONNX_MODEL,
                        help="exported ONNX model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=INDEX,
                        help="index folder, replaced (default: %(default)s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from instdisc import tracking
    from instdisc.data.prepared import PreparedDataset
    from instdisc.export import rows_pixels
    from instdisc.serving.embedder import Embedder
    from instdisc.serving.index import write_index

    params, common = _common.load(args.params, NAME)
    start, out = time.perf_counter(), Path(args.out)
    prepared = PreparedDataset.open(args.data)
    if params.split not in prepared.meta["splits"]:
        raise ValueError(f"params.yaml index.split = {params.split!r}: {args.data} has the "
                         f"splits {sorted(prepared.meta['splits'])}")
    split = prepared.split(params.split)
    embedder = Embedder(args.model, device="cpu" if common.device == "cpu" else "auto",
                        batch_size=params.batch_size)
    info = embedder.info
    with tracking.run(NAME, {"index": params, "device": common.device}):
        rows = np.arange(split.num_items)
        blocks = [embedder.embed(rows_pixels(split, rows[i:i + params.batch_size],
                                             info.image_size, info.resize))
                  for i in range(0, len(rows), params.batch_size)]
        embeddings = np.concatenate(blocks)                                     # (N, D)
        labels = split.labels.tolist()
        ids = [f"{params.split}/{prepared.classes[label]}/{row:06d}" if label >= 0
               else f"{params.split}/{row:06d}" for row, label in enumerate(labels)]
        staged = out.with_name(f".{out.name}.staged")
        shutil.rmtree(staged, ignore_errors=True)
        report = write_index(staged, ids, embeddings,
                             {"kind": "prepared", "location": str(args.data),
                              "split": params.split}, embedder)
        metrics: dict[str, Any] = {"split": params.split, "num_items": report["num_items"],
                                   "feature_dim": report["feature_dim"],
                                   "model_sha256": report["model"]["sha256"]}
        if params.ann != "none":
            from instdisc.serving.ann import build_for_index

            ann = build_for_index(staged, params.ann)
            metrics["ann"] = {"kind": params.ann, "recall_at_10": ann["recall@10"]}
        shutil.rmtree(out, ignore_errors=True)  # DVC removes the old out first; by hand, too
        staged.rename(out)
        metrics["index_seconds"] = round(time.perf_counter() - start, 2)
        _common.finish(NAME, metrics, args.metrics)
    _common.log.info("indexed %d %s images into %s%s", metrics["num_items"], params.split, out,
                     f" (+ FAISS {params.ann}, recall@10 {metrics['ann']['recall_at_10']:.3f})"
                     if params.ann != "none" else "")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
