"""Optional approximate search: a FAISS index (HNSW or IVF) built from an index's embeddings.npy.

Exact search (`instdisc.serving.search.search`) stays the default and the reference: building
an ANN index measures its recall@k against exact search on `num_queries` rows of the index
itself and records it next to the index:

    <index>/faiss.index   faiss.write_index of IndexHNSWFlat or IndexIVFFlat, inner product
    <index>/faiss.json    kind, parameters, build seconds, recall@k vs exact, num_items, sha256 of
                          embeddings.npy (a rebuilt index makes the ANN index stale: refused)

Vectors are unit norm, so inner product = cosine. Needs faiss-cpu (imported only here).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from instdisc.io import file_sha256, write_json
from instdisc.serving.search import search

log = logging.getLogger(__name__)

KINDS = ("hnsw", "ivf")
INDEX_FILE, META_FILE = "faiss.index", "faiss.json"


def build_faiss(embeddings: np.ndarray, kind: str = "hnsw", *, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 64, nlist: int | None = None,
                nprobe: int = 16, train_size: int = 100_000, seed: int = 0):
    """A FAISS inner-product index over `embeddings` (N, D) float32 unit rows.

    hnsw: IndexHNSWFlat(M = hnsw_m); ivf: IndexIVFFlat with `nlist` lists (default ~4 sqrt(N))
    trained on up to `train_size` rows, searched with `nprobe` lists.
    """
    import faiss

    if kind not in KINDS:
        raise ValueError(f"ANN kind {kind!r}: allowed {', '.join(KINDS)}")
    n, dim = embeddings.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = ef_construction, ef_search
    else:
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rows = np.random.default_rng(seed).choice(n, min(n, train_size), replace=False)
        index.train(np.ascontiguousarray(embeddings[np.sort(rows)], dtype=np.float32))
        index.nprobe = nprobe
    for start in range(0, n, 65536):  # memory-mapped input: add in blocks
        index.add(np.ascontiguousarray(embeddings[start:start + 65536], dtype=np.float32))
    return index


def recall_at_k(index: Any, embeddings: np.ndarray, k: int = 10, num_queries: int = 1000,
                seed: int = 0) -> dict[str, float]:
    """Mean |ANN top-k & exact top-k| / k over `num_queries` index rows used as queries, and the
    mean latency per query: ANN one query at a time; exact amortised over a batch of 50."""
    rows = np.random.default_rng(seed).choice(len(embeddings), min(num_queries, len(embeddings)),
                                              replace=False)
    queries = np.ascontiguousarray(embeddings[np.sort(rows)], dtype=np.float32)  # (Q, D)
    start = time.perf_counter()
    ann = np.concatenate([index.search(q[None], k)[1] for q in queries])         # (Q, k)
    ann_seconds = (time.perf_counter() - start) / len(queries)
    exact_queries = queries[:min(len(queries), 50)]  # exact scans everything: time a few
    start = time.perf_counter()
    exact = search(embeddings, exact_queries, k=k)[1]                            # (q, k)
    exact_seconds = (time.perf_counter() - start) / len(exact_queries)
    if len(exact_queries) < len(queries):
        exact = np.concatenate([exact, search(embeddings, queries[len(exact_queries):], k=k)[1]])
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(ann, exact)]
    return {f"recall@{k}": float(np.mean(hits)) / k, "num_queries": len(queries),
            "ann_ms_per_query": 1000 * ann_seconds, "exact_ms_per_query": 1000 * exact_seconds}


def build_for_index(root: Path, kind: str = "hnsw", k: int = 10, num_queries: int = 1000,
                    **options: Any) -> dict[str, Any]:
    """Build `<root>/faiss.index` from `<root>/embeddings.npy`, measure recall@k vs exact,
    write `<root>/faiss.json` and return it."""
    import faiss

    root = Path(root)
    embeddings = np.load(root / "embeddings.npy", mmap_mode="r")                 # (N, D)
    start = time.perf_counter()
    index = build_faiss(embeddings, kind, **options)
    build_seconds = time.perf_counter() - start
    report = {"kind": kind, "options": options, "num_items": int(len(embeddings)),
              "build_seconds": round(build_seconds, 2),
              "embeddings_sha256": file_sha256(root / "embeddings.npy"),
              **recall_at_k(index, embeddings, k, num_queries)}
    faiss.write_index(index, str(root / INDEX_FILE))
    write_json(report, root / META_FILE, indent=1)
    log.info("FAISS %s index of %d vectors in %.1f s: recall@%d %.3f vs exact (%.2f vs %.1f ms "
             "per query)", kind, len(embeddings), build_seconds, k, report[f"recall@{k}"],
             report["ann_ms_per_query"], report["exact_ms_per_query"])
    return report


def load_faiss(root: Path):
    """The FAISS index of an index folder; ValueError when missing or built from other
    embeddings."""
    return load_faiss_with_meta(root)[0]


def load_faiss_with_meta(root: Path) -> tuple[Any, dict[str, Any]]:
    """(FAISS index, its faiss.json) of an index folder; ValueError as `load_faiss`."""
    import faiss

    root = Path(root)
    if not (root / META_FILE).is_file():
        raise ValueError(f"{str(root)!r} has no FAISS index: build one with "
                         "`instdisc embed ... --ann hnsw` (or ivf)")
    meta = json.loads((root / META_FILE).read_text())
    if meta["embeddings_sha256"] != file_sha256(root / "embeddings.npy"):
        raise ValueError(f"{str(root / INDEX_FILE)!r} was built from other embeddings: rebuild "
                         "it (`instdisc embed --ann`)")
    return faiss.read_index(str(root / INDEX_FILE)), meta


def ann_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `search.search`: scores float32 (Q, k') and rows int64 (Q, k'), best first; a row
    of -1 means FAISS found fewer than k' neighbours.

    HNSW is searched with efSearch >= k (its candidate list bounds how many hits come back;
    the index's own efSearch is left as it is: the per-call parameters are thread safe)."""
    import faiss

    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))               # (Q, D)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    k = min(k, index.ntotal)
    params = None
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=max(index.hnsw.efSearch, k))
    return index.search(np.ascontiguousarray(queries), k, params=params)
