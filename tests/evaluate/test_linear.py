"""Linear probes on frozen features (arXiv:1805.01978, Sec. 4.2): frozen encoder, toy problems."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instdisc.data.prepared import SplitData
from instdisc.evaluate.linear import (check_frozen, freeze, grid_size, linear_probe,
                                      stage_features, standardize, top1, train_heads)
from instdisc.models.encoder import build_encoder

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def colour_split(name: str, per_class: int, seed: int) -> SplitData:
    """Solid red / green / blue 16x16 images with noise: class = dominant channel (known answer)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)                      # (N,)
    images = torch.rand(len(labels), 16, 16, 3, generator=g) * 60              # (N, 16, 16, 3)
    images[torch.arange(len(labels)), :, :, labels] += 150
    return SplitData(name=name, labels=labels, storage="array", images=images.to(torch.uint8),
                     paths=None, image_size=(16, 16))


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return build_encoder("resnet18", feature_dim=16, cifar_stem=True, width=0.125)


@pytest.mark.parametrize("channels, height, target, expected", [
    (16, 32, 2048, 11), (32, 16, 2048, 8), (64, 8, 2048, 6), (128, 4, 2048, 4),
    (512, 7, 9216, 4), (512, 1, 9216, 1), (4096, 4, 100, 1)])
def test_grid_size_gives_about_target_dim(channels, height, target, expected):
    assert grid_size(channels, height, target) == expected


def test_probe_leaves_the_encoder_unchanged_and_trains_only_heads():
    encoder = tiny_encoder()
    before = copy.deepcopy(encoder.state_dict())
    train, test = colour_split("train", 10, 0), colour_split("test", 4, 1)
    result = linear_probe(encoder, train, test, 3, torch.device("cpu"), image_size=None,
                          layers=LAYERS, target_dim=64, epochs=3, batch_size=8, lr=1e-2)
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BN stats moved"
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    assert set(result["top1"]) == set(LAYERS)
    assert all(0.0 <= v <= 100.0 for v in result["top1"].values())


def test_check_frozen_rejects_a_trainable_encoder():
    encoder, heads = tiny_encoder(), nn.ModuleDict({"conv5": nn.Linear(4, 2)})
    with pytest.raises(AssertionError, match="encoder parameters must be frozen"):
        check_frozen(encoder, heads)
    check_frozen(freeze(encoder), heads)


def test_colour_classes_are_solved_from_conv1():
    """Class = dominant colour: pooled conv1 features of even a random encoder separate it."""
    result = linear_probe(tiny_encoder(), colour_split("train", 30, 0), colour_split("test", 10, 1),
                          3, torch.device("cpu"), image_size=None, layers=("conv1", "conv5"),
                          target_dim=128, epochs=20, batch_size=16, lr=1e-2)
    assert result["top1"]["conv1"] >= 95.0
    assert result["dims"]["conv1"] == 8 * 4 * 4 and result["grids"]["conv1"] == 4


def test_heads_reach_100_percent_on_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(50)                              # (200,)
    centres = torch.randn(4, 32, generator=g) * 3                               # (4, 32)
    x = centres[labels] + 0.3 * torch.randn(200, 32, generator=g)               # (200, 32)
    heads = train_heads({"toy": x}, labels, 4, epochs=40, batch_size=32, lr=0.05,
                        optimizer="sgd")
    assert top1(heads, {"toy": x}, labels)["toy"] == 100.0


def test_heads_are_deterministic_for_a_seed():
    x, labels = torch.randn(64, 8), torch.randint(0, 3, (64,))
    a = train_heads({"l": x}, labels, 3, epochs=2, batch_size=16, lr=1e-2, seed=5)
    b = train_heads({"l": x}, labels, 3, epochs=2, batch_size=16, lr=1e-2, seed=5)
    assert torch.equal(a["l"].weight, b["l"].weight)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam', got 'lbfgs'"):
        train_heads({"l": torch.randn(4, 2)}, torch.zeros(4, dtype=torch.long), 2, epochs=1,
                    batch_size=2, lr=0.1, optimizer="lbfgs")


def test_stage_features_pool_each_layer_to_its_grid():
    encoder = freeze(tiny_encoder())
    images = torch.randn(6, 3, 16, 16)
    batches = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 6))]
    feats, grids = stage_features(encoder, batches, 6, LAYERS, target_dim=32, progress=False)
    with torch.no_grad():
        conv3 = encoder.stages(images)["conv3"]                                 # (6, C, 8, 8)
    expected = F.adaptive_avg_pool2d(conv3, grids["conv3"]).flatten(1)
    assert torch.allclose(feats["conv3"], expected, atol=1e-6)
    assert feats["conv1"].shape == (6, 8 * grids["conv1"] ** 2)


def test_standardize_uses_training_statistics():
    train, test = torch.randn(50, 3) * 4 + 2, torch.randn(10, 3)
    s_train, s_test = standardize(train, test)
    assert torch.allclose(s_train.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s_test, (test - train.mean(0)) / train.std(0), atol=1e-5)
