"""Weighted kNN (arXiv:1805.01978, Sec. 3.4) against a literal transcription, plus toy problems."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instdisc.evaluate import knn
from instdisc.evaluate.knn import compute_features, knn_accuracy, weighted_knn_predict


def reference_scores(bank, bank_labels, queries, num_classes, k, sigma, self_rows=None):
    """The paper's vote, literally, one query at a time: sort sims, keep k, sum exp(s / sigma)."""
    bank, queries = bank.double().numpy(), queries.double().numpy()
    out = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        sims = [(float(bank[i] @ query), i) for i in range(len(bank))
                if self_rows is None or i != self_rows[q]]
        for s, i in sorted(sims, reverse=True)[:k]:
            out[q, int(bank_labels[i])] += math.exp(s / sigma)
    return torch.from_numpy(out)


def unit(n, dim, seed):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def random_problem(n=103, q=37, dim=8, num_classes=6, seed=0):
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return unit(n, dim, seed + 1), labels, unit(q, dim, seed + 2)


@pytest.mark.parametrize("k, chunk_size, bank_chunk_size",
                         [(1, 4096, 65536), (5, 10, 7), (20, 37, 103), (50, 1, 16), (103, 8, 50)])
def test_weighted_knn_matches_reference(k, chunk_size, bank_chunk_size):
    bank, labels, queries = random_problem()
    expected = reference_scores(bank, labels, queries, 6, k, sigma=0.1)
    scores = weighted_knn_predict(bank, labels, queries, 6, k=k, sigma=0.1,
                                  chunk_size=chunk_size, bank_chunk_size=bank_chunk_size)
    assert scores.shape == (37, 6) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_bank_chunked_equals_unchunked():
    bank, labels, queries = random_problem(n=1000, q=300, dim=16, num_classes=10, seed=3)
    whole = weighted_knn_predict(bank, labels, queries, 10, k=200, sigma=0.07)
    for bank_chunk_size in (64, 199, 333, 999):
        chunked = weighted_knn_predict(bank, labels, queries, 10, k=200, sigma=0.07,
                                       chunk_size=77, bank_chunk_size=bank_chunk_size)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def test_features_that_require_grad_are_accepted():
    bank, labels, queries = random_problem()
    scores = weighted_knn_predict(bank.requires_grad_(), labels, queries.requires_grad_(), 6, k=3)
    assert not scores.requires_grad


def test_float64_inputs_give_float64_scores():
    bank, labels, queries = random_problem()
    scores = weighted_knn_predict(bank.double(), labels, queries.double(), 6, k=10)
    assert scores.dtype == torch.float64


def test_separated_clusters_are_classified_perfectly():
    centres = unit(5, 32, seed=10)  # (C, D)
    def sample(per_class, seed):
        noise = 0.05 * torch.randn(5, per_class, 32, generator=torch.Generator().manual_seed(seed))
        points = F.normalize(centres[:, None] + noise, dim=2).reshape(-1, 32)  # (C * n, D)
        return points, torch.arange(5).repeat_interleave(per_class)
    bank, bank_labels = sample(60, seed=11)
    queries, query_labels = sample(20, seed=12)
    acc = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=5, k=50, sigma=0.07,
                       chunk_size=33)
    assert acc == {"top1": 100.0, "top5": 100.0}


def hand_built_2d():
    """Query (1, 0); one class-0 row at angle 0 (s = 1), two class-1 rows at +-60 deg (s = 0.5)."""
    angles = torch.tensor([0.0, math.pi / 3, -math.pi / 3, math.pi])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)  # (4, 2)
    return bank, torch.tensor([0, 1, 1, 0]), torch.tensor([[1.0, 0.0]])


def test_weighting_flips_the_unweighted_majority():
    bank, labels, query = hand_built_2d()
    sharp = weighted_knn_predict(bank, labels, query, 2, k=3, sigma=0.1)  # (1, 2)
    torch.testing.assert_close(sharp, torch.tensor([[math.exp(10.0), 2 * math.exp(5.0)]]))
    assert sharp.argmax().item() == 0  # one close neighbour outweighs two far ones
    flat = weighted_knn_predict(bank, labels, query, 2, k=3, sigma=100.0)  # ~ majority vote
    assert flat.argmax().item() == 1


def test_exclude_self_drops_the_query_row():
    bank, labels, _ = random_problem(n=40, q=1, seed=5)
    expected = reference_scores(bank, labels, bank, 6, 7, 0.1, self_rows=list(range(40)))
    scores = weighted_knn_predict(bank, labels, bank, 6, k=7, sigma=0.1, bank_chunk_size=9,
                                  exclude_self=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    # Without exclusion each row is its own nearest neighbour (s = 1), with it never.
    with_self = weighted_knn_predict(bank, labels, bank, 6, k=1, sigma=0.1)
    torch.testing.assert_close(with_self.sum(1), torch.full((40,), math.exp(10.0)), rtol=1e-5,
                               atol=0)


def test_exclude_self_with_query_indices():
    bank, labels, _ = random_problem(n=50, q=1, seed=6)
    rows = torch.tensor([3, 49, 0, 17])
    expected = reference_scores(bank, labels, bank[rows], 6, 5, 0.07, self_rows=rows.tolist())
    scores = weighted_knn_predict(bank, labels, bank[rows], 6, k=5, sigma=0.07, chunk_size=3,
                                  bank_chunk_size=16, exclude_self=True, query_indices=rows)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    acc = knn_accuracy(bank, labels, bank[rows], labels[rows], 6, k=5, chunk_size=3,
                       exclude_self=True, query_indices=rows)
    ranked = expected.argmax(1)
    assert acc["top1"] == pytest.approx(100.0 * (ranked == labels[rows]).double().mean().item())


def test_k_larger_than_bank_is_clamped_with_one_warning(caplog):
    knn._warn_k_clamped.cache_clear()
    bank, labels, queries = random_problem(n=12, q=5)
    with caplog.at_level(logging.WARNING, logger="instdisc.evaluate.knn"):
        for _ in range(3):
            scores = weighted_knn_predict(bank, labels, queries, 6, k=200, sigma=0.1)
    expected = reference_scores(bank, labels, queries, 6, 12, 0.1)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [
        "k = 200 exceeds the 12 candidate bank rows; using k = 12"]


def test_knn_accuracy_top1_top5_values():
    # Scores from the 2D example: class 0 wins, and with 2 classes top-5 means top-2 (always hit).
    bank, labels, query = hand_built_2d()
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), 2, k=3, sigma=0.1) == {
        "top1": 100.0, "top5": 100.0}
    assert knn_accuracy(bank, labels, query, torch.tensor([1]), 2, k=3, sigma=0.1) == {
        "top1": 0.0, "top5": 100.0}
    # Ten classes, one row each: query = row 0; ranks of the other classes follow similarity.
    bank, labels = unit(10, 16, seed=8), torch.arange(10)
    order = (bank @ bank[0]).argsort(descending=True)  # class ranking of query bank[0]
    queries, query_labels = bank[[0, 0, 0]], torch.stack([order[0], order[4], order[5]])
    acc = knn_accuracy(bank, labels, queries, query_labels, 10, k=10, sigma=0.07, chunk_size=2)
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top5"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), r"k must be >= 1, got 0"),
    (dict(sigma=0.0), r"sigma must be > 0, got 0.0"),
    (dict(sigma=0.001), r"sigma = 0.001 is too small"),
    (dict(chunk_size=0), r"chunk_size must be >= 1, got 0"),
    (dict(bank_chunk_size=-1), r"bank_chunk_size must be >= 1, got -1"),
    (dict(queries=torch.ones(3, 5)), r"queries must have shape \(Q, 8\).*got \(3, 5\)"),
    (dict(bank_labels=torch.zeros(4, dtype=torch.long)), r"bank_labels must have shape \(103,\)"),
    (dict(num_classes=2), r"bank_labels span \[0, 5\], outside \[0, 2\)"),
    (dict(exclude_self=True), r"needs the queries to be the bank itself.*37 queries for 103"),
    (dict(query_indices=torch.arange(37)), r"query_indices is only used with exclude_self"),
])
def test_invalid_arguments_raise(kwargs, message):
    bank, labels, queries = random_problem()
    args = dict(bank=bank, bank_labels=labels, queries=queries, num_classes=6) | kwargs
    with pytest.raises(ValueError, match=message):
        weighted_knn_predict(**args)


def test_knn_accuracy_rejects_mismatched_labels():
    bank, labels, queries = random_problem()
    with pytest.raises(ValueError, match=r"query_labels must have shape \(37,\), got \(36,\)"):
        knn_accuracy(bank, labels, queries, torch.zeros(36, dtype=torch.long), 6)


class RowEncoder(nn.Module):
    """Maps image x (a scalar per image) to (x, 2x); BatchNorm only to observe train/eval."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(1)

    def forward(self, images):
        assert not self.training and not self.norm.training, "features must run in eval mode"
        return torch.cat([images, 2 * images], dim=1).half()  # (B, 2), float16 on purpose


def test_compute_features_writes_rows_at_indices_and_restores_mode():
    encoder = RowEncoder()
    encoder.train()
    encoder.norm.eval()  # a mixed state must be restored exactly, not by encoder.train()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))  # shuffled order
    batches = [(perm[i:i + 4, None].float(), perm[i:i + 4]) for i in range(0, 10, 4)]
    features = compute_features(encoder, batches, 10, "cpu", progress=False)
    expected = torch.stack([torch.arange(10.0), 2 * torch.arange(10.0)], dim=1)  # (10, 2)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected)
    assert encoder.training and not encoder.norm.training


def test_compute_features_rejects_uncovered_or_out_of_range_rows():
    encoder = RowEncoder().train()
    with pytest.raises(ValueError, match=r"2 of 5 rows were never written"):
        compute_features(encoder, [(torch.ones(3, 1), torch.arange(3))], 5, "cpu")
    with pytest.raises(ValueError, match=r"batch indices span \[0, 5\], outside \[0, 5\)"):
        compute_features(encoder, [(torch.ones(2, 1), torch.tensor([0, 5]))], 5, "cpu")
    assert encoder.training  # restored even when it raised


def test_half_precision_bank_sums_weights_in_float32():
    # exp(1 / 0.07) = 1.6e6 would overflow float16; scores must come back finite, in float32.
    bank, labels, queries = random_problem(n=200, q=20, dim=16, seed=9)
    scores = weighted_knn_predict(bank.half(), labels, queries.half(), 6, k=50, sigma=0.07)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    expected = weighted_knn_predict(bank, labels, queries, 6, k=50, sigma=0.07)
    torch.testing.assert_close(scores, expected, rtol=0.1, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    bank, labels, queries = random_problem(n=5000, q=700, dim=32, num_classes=10, seed=4)
    expected = weighted_knn_predict(bank, labels, queries, 10, k=200, sigma=0.07)
    cuda = torch.device("cuda")
    scores = weighted_knn_predict(bank.to(cuda), labels.to(cuda), queries.to(cuda), 10, k=200,
                                  sigma=0.07, chunk_size=256, bank_chunk_size=1500,
                                  exclude_self=False)
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), expected, rtol=1e-4, atol=0)
