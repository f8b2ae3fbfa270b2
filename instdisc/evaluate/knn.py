"""Weighted k-nearest-neighbour classification (Wu et al. 2018, arXiv:1805.01978, Sec. 3.4).

A query feature f_hat is compared with every labelled bank row f_i by cosine similarity
s_i = f_i . f_hat (all rows are unit vectors, so this is a dot product). Its k most similar rows
N_k vote for their class c_i with weight alpha_i = exp(s_i / sigma), and the class score is
w_c = sum_{i in N_k} alpha_i * 1(c_i = c). The paper uses k = 200 and sigma = 0.07 (Sec. 3.4;
lemniscate's `kNN` uses the same weights).

Memory: queries are scored `chunk_size` rows at a time against `bank_chunk_size` bank rows at a
time, and the per-bank-chunk top-k lists are merged into a running top-k. The largest buffer is one
(chunk_size, bank_chunk_size) similarity matrix, reused for every chunk, so a 1.28M-image bank
never needs a (Q, N) matrix.

k larger than the bank (or than N - 1 with `exclude_self`) is clamped to what the bank holds, with
a warning logged once per (k, available) pair: a tiny smoke-test dataset then still evaluates.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

log = logging.getLogger(__name__)

# 65536 bank rows per similarity block: bank chunks much smaller than this make the per-chunk
# top-k (k = 200) dominate on CPU (benchmarks/bench_knn.py); peak buffer 4 * chunk * 65536 bytes.
DEFAULT_BANK_CHUNK_SIZE = 65536


@torch.no_grad()
def compute_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_items: int,
                     device: torch.device | str, progress: bool = True) -> Tensor:
    """Encoder outputs of `num_items` images, row i = image i: a float32 (num_items, D) tensor.

    `batches` yields (images, indices) already on the device; each batch's output is written at
    its indices, so the order of batches does not matter. The encoder runs in eval mode (BatchNorm
    uses running statistics, so an image's feature does not depend on its batch-mates); every
    submodule's train/eval flag is restored afterwards. Raises ValueError if an index is out of range or a row is
    never written.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    device = torch.device(device)
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    features: Tensor | None = None
    written = torch.zeros(num_items, dtype=torch.bool, device=device)  # (N,)
    total = len(batches) if hasattr(batches, "__len__") else None
    show = progress and sys.stderr.isatty()
    try:
        for images, indices in tqdm(batches, total=total, disable=not show, desc="features",
                                    leave=False):
            if indices.numel() == 0:
                continue
            out = encoder(images).float()  # (B, D)
            if out.ndim != 2 or out.shape[0] != indices.shape[0]:
                raise ValueError(f"encoder output of shape {tuple(out.shape)} does not match "
                                 f"{indices.shape[0]} indices; expected (B, D)")
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= num_items:
                raise ValueError(f"batch indices span [{low}, {high}], outside [0, {num_items})")
            if features is None:
                features = torch.zeros(num_items, out.shape[1], dtype=torch.float32,
                                       device=device)  # (N, D)
            indices = indices.to(device)  # (B,)
            features[indices] = out.to(device)
            written[indices] = True
    finally:
        for module, was_training in modes:
            module.training = was_training
    if features is None:
        raise ValueError("batches yielded no images; cannot compute features")
    missing = int((~written).sum())
    if missing:
        raise ValueError(f"{missing} of {num_items} rows were never written by `batches`")
    return features


@torch.no_grad()
def weighted_knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int,
                         k: int = 200, sigma: float = 0.07, chunk_size: int = 4096,
                         bank_chunk_size: int = DEFAULT_BANK_CHUNK_SIZE,
                         exclude_self: bool = False,
                         query_indices: Tensor | None = None) -> Tensor:
    """Class scores w_c (Q, num_classes) of each query (arXiv:1805.01978, Sec. 3.4).

    w_c = sum over the k bank rows most similar to the query of exp(s_i / sigma) * 1(c_i = c),
    with s_i the dot product of unit vectors. Scores are float32 (float64 for float64 inputs).

    exclude_self: the queries are themselves bank rows (monitoring on the training set); row
    `query_indices[q]` of the bank is dropped from query q's neighbours. Without
    `query_indices` the queries must be the whole bank, in order (query q = bank row q).
    k is clamped to the number of candidate rows (N, or N - 1 with exclude_self), with a
    warning. Peak extra memory: one (chunk_size, bank_chunk_size) similarity block in the bank's
    dtype, plus the (Q, num_classes) result.
    """
    chunks = _iter_scores(bank, bank_labels, queries, num_classes, k, sigma, chunk_size,
                          bank_chunk_size, exclude_self, query_indices)
    scores = torch.empty(queries.shape[0], num_classes, dtype=_score_dtype(bank),
                         device=queries.device)  # (Q, C)
    for start, chunk_scores in chunks:
        scores[start:start + chunk_scores.shape[0]] = chunk_scores  # (Qc, C)
    return scores


weighted_knn = weighted_knn_predict  # the name docs/DESIGN.md uses


@torch.no_grad()
def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = 200, sigma: float = 0.07, chunk_size: int = 4096,
                 bank_chunk_size: int = DEFAULT_BANK_CHUNK_SIZE, exclude_self: bool = False,
                 query_indices: Tensor | None = None) -> dict[str, float]:
    """Weighted-kNN accuracy in percent: {"top1": ..., "top5": ...} (arXiv:1805.01978, Sec. 3.4).

    top5 counts a query as correct when its label is among the min(5, num_classes) highest
    class scores (so it is 100 with fewer than 5 classes). Queries are scored `chunk_size` at a
    time, so no (Q, num_classes) score matrix is held. Other arguments: `weighted_knn_predict`.
    """
    if query_labels.shape != (queries.shape[0],):
        raise ValueError(f"query_labels must have shape ({queries.shape[0]},), got "
                         f"{tuple(query_labels.shape)}")
    if queries.shape[0] == 0:
        raise ValueError("queries is empty: accuracy of zero queries is undefined")
    top_n = min(5, num_classes)
    hits1 = hits5 = 0
    for start, scores in _iter_scores(bank, bank_labels, queries, num_classes, k, sigma,
                                      chunk_size, bank_chunk_size, exclude_self, query_indices):
        ranked = scores.topk(top_n, dim=1).indices  # (Qc, top_n)
        labels = query_labels[start:start + scores.shape[0], None].to(ranked.device)  # (Qc, 1)
        hits = ranked == labels  # (Qc, top_n)
        hits1 += int(hits[:, 0].sum())
        hits5 += int(hits.any(dim=1).sum())
    return {"top1": 100.0 * hits1 / queries.shape[0], "top5": 100.0 * hits5 / queries.shape[0]}


def _iter_scores(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int,
                 sigma: float, chunk_size: int, bank_chunk_size: int, exclude_self: bool,
                 query_indices: Tensor | None) -> Iterator[tuple[int, Tensor]]:
    """Validate now (not at the first `next`), then score lazily via `_score_chunks`."""
    num_items = _check_inputs(bank, bank_labels, queries, num_classes, sigma, chunk_size,
                              bank_chunk_size)
    self_rows = _resolve_query_indices(exclude_self, query_indices, queries.shape[0], num_items,
                                       bank.device)
    k = _effective_k(k, num_items - int(exclude_self))
    score_dtype = _score_dtype(bank)
    log_max = math.log(torch.finfo(score_dtype).max)
    if 1.0 / sigma + math.log(k) >= log_max:
        raise ValueError(f"sigma = {sigma} is too small: k * exp(1 / sigma) overflows "
                         f"{score_dtype}; use sigma > {1.0 / (log_max - math.log(k)):.4g}")
    return _score_chunks(bank, bank_labels.long(), queries, num_classes, k, sigma, chunk_size,
                         bank_chunk_size, self_rows, score_dtype)


def _score_chunks(bank: Tensor, labels: Tensor, queries: Tensor, num_classes: int, k: int,
                  sigma: float, chunk_size: int, bank_chunk_size: int, self_rows: Tensor | None,
                  score_dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """Yield (first query row, (Qc, C) class scores) per chunk of `chunk_size` queries.

    One similarity buffer serves every chunk: re-allocating a block of hundreds of MB per chunk
    costs page faults that, on CPU, took about as long as the top-k itself.
    """
    num_queries, bank_rows = queries.shape[0], min(bank_chunk_size, bank.shape[0])
    sims_buffer = bank.new_empty(min(chunk_size, num_queries) * bank_rows)  # (Qc * Bc,)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        rows = None if self_rows is None else self_rows[start:stop]  # (Qc,)
        top_sims, top_idx = _top_k_over_bank(queries[start:stop], bank, k, bank_chunk_size,
                                             sims_buffer, rows)  # (Qc, k) each
        weights = (top_sims.to(score_dtype) / sigma).exp()  # alpha_i, (Qc, k)
        scores = torch.zeros(stop - start, num_classes, dtype=score_dtype,
                             device=queries.device)  # (Qc, C)
        yield start, scores.scatter_add_(1, labels[top_idx], weights)


def _score_dtype(bank: Tensor) -> torch.dtype:
    """Weights are summed in at least float32: exp(1 / 0.07) = 1.6e6 overflows float16."""
    return torch.promote_types(bank.dtype, torch.float32)


def _top_k_over_bank(queries: Tensor, bank: Tensor, k: int, bank_chunk_size: int,
                     sims_buffer: Tensor, self_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Running top-k merge over bank chunks: the k largest s_i per query and their bank rows."""
    best_sims: Tensor | None = None
    best_idx: Tensor | None = None
    rows = torch.arange(queries.shape[0], device=queries.device)  # (Qc,)
    for start in range(0, bank.shape[0], bank_chunk_size):
        block = bank[start:start + bank_chunk_size]  # (Bc, D)
        sims = sims_buffer[:queries.shape[0] * block.shape[0]].view(
            queries.shape[0], block.shape[0])  # (Qc, Bc), reused: no allocation per chunk
        torch.mm(queries, block.t(), out=sims)
        if self_rows is not None:
            local = self_rows - start  # (Qc,)
            inside = (local >= 0) & (local < block.shape[0])  # (Qc,)
            cols = local.clamp(0, block.shape[0] - 1)  # (Qc,)
            sims[rows, cols] = torch.where(inside, -math.inf, sims[rows, cols])  # drop self
        # Order inside the top-k is irrelevant (votes are summed), so skip sorting it.
        sims_k, idx_k = sims.topk(min(k, block.shape[0]), dim=1, sorted=False)  # (Qc, kc)
        idx_k += start
        if best_sims is not None:
            sims_k = torch.cat([best_sims, sims_k], dim=1)  # (Qc, k' + kc)
            idx_k = torch.cat([best_idx, idx_k], dim=1)  # (Qc, k' + kc)
            sims_k, pos = sims_k.topk(min(k, sims_k.shape[1]), dim=1, sorted=False)  # (Qc, k)
            idx_k = idx_k.gather(1, pos)  # (Qc, k)
        best_sims, best_idx = sims_k, idx_k
    assert best_sims is not None and best_idx is not None, "empty bank slipped past validation"
    return best_sims, best_idx


def _check_inputs(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int,
                  sigma: float, chunk_size: int, bank_chunk_size: int) -> int:
    """Validate shapes, devices, dtypes and hyper-parameters; returns the bank size N."""
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"bank must be a non-empty (N, D) tensor, got shape {tuple(bank.shape)}")
    if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries must have shape (Q, {bank.shape[1]}) to match the bank, got "
                         f"{tuple(queries.shape)}")
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must have shape ({bank.shape[0]},), got "
                         f"{tuple(bank_labels.shape)}")
    if queries.device != bank.device or bank_labels.device != bank.device:
        raise ValueError(f"bank ({bank.device}), bank_labels ({bank_labels.device}) and queries "
                         f"({queries.device}) must be on one device")
    if queries.dtype != bank.dtype or not bank.dtype.is_floating_point:
        raise ValueError(f"bank and queries must share one floating dtype, got {bank.dtype} and "
                         f"{queries.dtype}")
    if bank_labels.dtype.is_floating_point or bank_labels.dtype == torch.bool:
        raise ValueError(f"bank_labels must be an integer tensor, got {bank_labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    low, high = int(bank_labels.min()), int(bank_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"bank_labels span [{low}, {high}], outside [0, {num_classes})")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if bank_chunk_size < 1:
        raise ValueError(f"bank_chunk_size must be >= 1, got {bank_chunk_size}")
    return bank.shape[0]


def _resolve_query_indices(exclude_self: bool, query_indices: Tensor | None, num_queries: int,
                           num_items: int, device: torch.device) -> Tensor | None:
    """The bank row of each query when `exclude_self`, else None."""
    if not exclude_self:
        if query_indices is not None:
            raise ValueError("query_indices is only used with exclude_self=True")
        return None
    if query_indices is None:
        if num_queries != num_items:
            raise ValueError(f"exclude_self without query_indices needs the queries to be the "
                             f"bank itself, but got {num_queries} queries for {num_items} rows")
        return torch.arange(num_items, device=device)  # (Q,)
    if query_indices.shape != (num_queries,):
        raise ValueError(f"query_indices must have shape ({num_queries},), got "
                         f"{tuple(query_indices.shape)}")
    low, high = (int(query_indices.min()), int(query_indices.max())) if num_queries else (0, 0)
    if low < 0 or high >= num_items:
        raise ValueError(f"query_indices span [{low}, {high}], outside [0, {num_items})")
    return query_indices.to(device=device, dtype=torch.long)  # (Q,)


def _effective_k(k: int, available: int) -> int:
    """k clamped to the candidate rows; ValueError for k <= 0 or no candidates at all."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if available < 1:
        raise ValueError("the bank has no candidate neighbours (one row, excluded as self)")
    if k > available:
        _warn_k_clamped(k, available)
    return min(k, available)


@functools.lru_cache(maxsize=None)
def _warn_k_clamped(k: int, available: int) -> None:
    """Logged once per (k, available): per-epoch monitoring would otherwise repeat it."""
    log.warning("k = %d exceeds the %d candidate bank rows; using k = %d", k, available,
                available)
