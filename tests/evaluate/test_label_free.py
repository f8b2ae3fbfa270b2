"""Label-free metrics: alignment and uniformity (Wang & Isola 2020) and augmentation retrieval."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instdisc.data.augment import BatchAugment
from instdisc.evaluate.label_free import (
    alignment,
    is_better,
    label_free_metrics,
    mean_pair_distance,
    retrieval_top1,
    uniformity,
)
from instdisc.models.encoder import build_encoder

from transfer_helpers import tiny_encoder, tiny_prepared  # noqa: F401 (fixtures)

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def unit(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def reference_uniformity(x, t=2.0):
    """The paper's formula literally: log mean over pairs i < j of exp(-t ||x_i - x_j||^2)."""
    terms = [math.exp(-t * float((x[i] - x[j]).pow(2).sum()))
             for i in range(len(x)) for j in range(i + 1, len(x))]
    return math.log(sum(terms) / len(terms))


def test_alignment_is_the_mean_squared_distance_of_pairs():
    x, y = unit(10, seed=1), unit(10, seed=2)
    assert alignment(x, x) == 0.0
    assert alignment(x, y) == pytest.approx(((x - y).norm(dim=1) ** 2).mean().item())
    assert alignment(x, -x) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="one shape"):
        alignment(x, y[:3])


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_uniformity_matches_the_formula_and_is_zero_for_a_collapsed_embedding(chunk_size):
    x = unit(17, seed=3)
    assert uniformity(x, chunk_size=chunk_size) == pytest.approx(reference_uniformity(x), abs=1e-6)
    assert uniformity(unit(1).expand(9, 8), chunk_size=chunk_size) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(uniformity(x[:1]))
    # Two antipodal points: distance^2 = 4, so log exp(-2 * 4) = -8.
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(two) == pytest.approx(-8.0)


def test_mean_pair_distance_is_the_mean_over_distinct_pairs():
    x = unit(13, seed=7)
    pairs = [float((x[i] - x[j]).pow(2).sum()) for i in range(13) for j in range(13) if i != j]
    assert mean_pair_distance(x) == pytest.approx(sum(pairs) / len(pairs))
    assert mean_pair_distance(unit(1).expand(5, 8)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(mean_pair_distance(x[:1]))


def test_retrieval_of_identical_views_is_100_percent_and_counts_own_hits():
    originals = unit(20, seed=4)
    assert retrieval_top1(originals, originals, chunk_size=6) == 100.0
    swapped = originals.clone()
    swapped[[0, 1]] = originals[[1, 0]]  # views 0 and 1 retrieve each other
    assert retrieval_top1(originals, swapped) == pytest.approx(90.0)


def test_better_means_lower_alignment_and_uniformity_and_higher_accuracy():
    assert is_better("alignment", 0.1, 0.2) and is_better("uniformity", -3.0, -1.0)
    assert is_better("retrieval_top1", 50.0, 10.0) and not is_better("knn_top1", 14.0, 17.0)
    assert is_better("alignment_ratio", 0.2, 0.9) and not is_better("alignment_ratio", math.nan,
                                                                   0.9)


class Constant(nn.Module):
    """Every image to one unit vector: the collapsed embedding."""

    def forward(self, x):
        return F.normalize(torch.ones(x.shape[0], 4, device=x.device), dim=1)  # (B, 4)


def images(n=12, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_identity_augmentation_gives_perfect_alignment_and_retrieval():
    identity = BatchAugment(16, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0,
                            grayscale_prob=0.0, hflip=False, hue=0.0, mean=MEAN, std=STD)
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, cifar_stem=True, width=0.125)
    out = label_free_metrics(encoder, images(), identity, mean=MEAN, std=STD, batch_size=5,
                             device=CPU, seed=0)
    assert out["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert out["retrieval_top1"] == 100.0 and out["images"] == 12
    assert out["uniformity"] < 0.0 and out["alignment_ratio"] == pytest.approx(0.0, abs=1e-6)


def test_collapsed_encoder_has_uniformity_zero_and_views_are_seeded():
    augment = BatchAugment(16, mean=MEAN, std=STD)
    out = label_free_metrics(Constant(), images(), augment, mean=MEAN, std=STD, batch_size=5,
                             device=CPU, seed=0)
    assert out["uniformity"] == pytest.approx(0.0, abs=1e-12)
    assert out["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert out["retrieval_top1"] == pytest.approx(100.0 / 12)  # argmax ties: only image 0
    assert math.isnan(out["alignment_ratio"])  # 0 / 0: no spread to compare alignment with
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, cifar_stem=True, width=0.125)
    runs = [label_free_metrics(encoder, images(), augment, mean=MEAN, std=STD, batch_size=5,
                               device=CPU, seed=seed) for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0]["alignment"] != runs[2]["alignment"]


def test_evaluate_encoder_keeps_knn_and_adds_label_free_metrics_with_flags(tiny_prepared,
                                                                          tiny_encoder, caplog):
    from instdisc import checkpoint
    from instdisc.evaluate.knn_eval import evaluate_encoder

    encoder, meta = checkpoint.load_encoder(tiny_encoder, CPU)
    pre = meta["preprocess"]
    augment = BatchAugment(tuple(pre["image_size"]), mean=pre["mean"], std=pre["std"])
    opts = dict(k=5, sigma=0.1, batch_size=16, chunk_size=64, seed=0)
    plain = evaluate_encoder(encoder, meta, tiny_prepared, CPU, **opts)
    full = evaluate_encoder(encoder, meta, tiny_prepared, CPU, augment=augment,
                            label_free_images=10, **opts)
    assert full["knn"] == plain["knn"] and full["random_init"]["knn"] == plain["random_init"]["knn"]
    assert list(full)[:4] == ["knn", "random_init", "k", "sigma"]  # first metric stays knn.top1
    assert full["label_free"]["images"] == full["random_init"]["label_free"]["images"] == 10
    assert set(full["beats_random_init"]) == {"knn_top1", "alignment_ratio",
                                              "uniformity", "retrieval_top1"}
    assert set(plain["beats_random_init"]) == {"knn_top1"}
    for name, better in full["beats_random_init"].items():
        assert better or f"does not beat its random init on {name}" in caplog.text
