"""Semi-supervised transfer (arXiv:1805.01978, Sec. 4.3): labelled subsets, fine-tune runs."""

from __future__ import annotations

import logging

import pytest
import torch

from instdisc.config import SemiSupervisedParams
from instdisc.transfer.semi_supervised import balanced_subset, run_semi_supervised, subset_split

from transfer_helpers import tiny_encoder, tiny_prepared  # noqa: F401 (fixtures)

SHUFFLE = torch.randperm(3000, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(10).repeat_interleave(300)[SHUFFLE]                  # 10 classes x 300


@pytest.mark.parametrize("fraction, per_class", [(0.01, 3), (0.1, 30), (0.0001, 1), (1.0, 300)])
def test_subsets_are_class_balanced_with_the_right_size(fraction, per_class):
    subset = balanced_subset(LABELS, fraction, seed=0)
    assert len(subset) == 10 * per_class
    assert torch.bincount(LABELS[subset], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(subset, subset.unique())                            # sorted, no repeats


def test_subsets_are_deterministic_nested_and_seed_dependent():
    one, ten = balanced_subset(LABELS, 0.01, seed=1), balanced_subset(LABELS, 0.1, seed=1)
    assert torch.equal(one, balanced_subset(LABELS, 0.01, seed=1))
    assert set(one.tolist()) <= set(ten.tolist())
    assert not torch.equal(ten, balanced_subset(LABELS, 0.1, seed=2))


def test_small_classes_give_what_they_have(caplog):
    labels = torch.tensor([0] * 10 + [1] * 2)
    with caplog.at_level(logging.WARNING):
        subset = balanced_subset(labels, 0.5, seed=0)                      # 3 per class asked
    assert torch.bincount(labels[subset]).tolist() == [3, 2]
    assert "class 1 has 2 images, fewer than the 3 asked for" in caplog.text


def test_fraction_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0.0"):
        balanced_subset(LABELS, 0.0, seed=0)


def test_subset_split_keeps_rows(tiny_prepared):
    train = tiny_prepared.split("train")
    rows = torch.tensor([0, 5, 59])
    sub = subset_split(train, rows)
    assert sub.num_items == 3 and torch.equal(sub.labels, train.labels[rows])
    assert torch.equal(sub.images[1], train.images[5])


def test_semi_supervised_runs_pretrained_and_scratch(tiny_prepared, tiny_encoder):
    params = SemiSupervisedParams(fractions=(0.1, 0.5), steps=2, batch_size=8)
    result = run_semi_supervised(params, tiny_encoder, tiny_prepared, torch.device("cpu"), seed=0)
    assert set(result) == {"labels_10pct", "labels_50pct"}
    assert result["labels_10pct"]["num_labelled"] == 6                    # 2 of each of 3 classes
    assert result["labels_50pct"]["num_labelled"] == 30
    for row in result.values():
        assert 0.0 <= row["pretrained"] <= 100.0 and 0.0 <= row["scratch"] <= 100.0
