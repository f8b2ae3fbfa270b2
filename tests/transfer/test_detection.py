"""Detection transfer: the backbone adapter for both stems, and the stage end to end (tiny)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from instdisc.config import DetectionParams
from instdisc.models.encoder import build_encoder
from instdisc.transfer.detection import (build_detector, detection_backbone, pyramid_layers,
                                         run_detection)
from instdisc.transfer.voc import read_split_ids

from conftest import SHARED_DATA
from transfer_helpers import write_encoder

RACCOON = SHARED_DATA / "raccoon_voc" / "raccoon_voc.zip"


@pytest.mark.parametrize("cifar_stem, sizes", [
    (True, {"0": 32, "1": 16, "2": 8, "pool": 4}),                # strides 2, 4, 8 (+16)
    (False, {"0": 16, "1": 8, "2": 4, "3": 2, "pool": 1}),        # strides 4, 8, 16, 32 (+64)
])
def test_backbone_levels_follow_the_stem(cifar_stem, sizes):
    trunk = build_encoder("resnet18", 16, cifar_stem=cifar_stem, width=0.125).trunk
    backbone = detection_backbone(trunk, pyramid_layers(cifar_stem), 16, trainable_layers=5)
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in maps.items()} == sizes
    assert all(v.shape[1] == 16 for v in maps.values())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


@pytest.mark.parametrize("trainable, expected", [
    (0, set()), (1, {"layer4"}), (5, {"conv1", "layer1", "layer2", "layer3", "layer4"})])
def test_trainable_layers_count_from_the_top(trainable, expected):
    trunk = build_encoder("resnet18", 16, cifar_stem=True, width=0.125).trunk
    backbone = detection_backbone(trunk, pyramid_layers(True), 16, trainable_layers=trainable)
    training = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert training == expected
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_detector_predicts_in_eval_mode():
    trunk = build_encoder("resnet18", 16, cifar_stem=False, width=0.125).trunk
    model = build_detector(trunk, False, 3, fpn_channels=16, representation_size=32,
                           anchor_scale=8, trainable_layers=3, min_size=64, max_size=64,
                           image_mean=[0.5] * 3, image_std=[0.25] * 3).eval()
    with torch.no_grad():
        [out] = model([torch.rand(3, 64, 48)])
    assert set(out) == {"boxes", "scores", "labels"} and out["boxes"].shape[1] == 4


def test_detection_stage_end_to_end_on_tiny_synthetic_voc(tmp_path):
    params = DetectionParams(synthetic_train=6, synthetic_test=3, synthetic_size=64, min_size=64,
                             max_size=64, iterations=2, batch_size=2, warmup_iters=1,
                             fpn_channels=16, representation_size=32)
    encoder = write_encoder(tmp_path / "encoder.pt")
    result = run_detection(params, encoder, tmp_path / "detection", torch.device("cpu"), seed=0)
    assert 0.0 <= result["map"] <= 1.0 and math.isfinite(result["final_loss"])
    assert set(result["ap"]) == {"disc", "square", "triangle"}
    assert result["dataset"]["train"] == 6 and result["dataset"]["test"] == 3
    assert read_split_ids(tmp_path / "detection", "test") == ["000006", "000007", "000008"]


@pytest.mark.skipif(not RACCOON.is_file(), reason=f"{RACCOON} not available")
def test_detection_on_raccoon_voc(tmp_path):
    params = DetectionParams(source=str(RACCOON), min_size=64, max_size=96, iterations=2,
                             batch_size=2, warmup_iters=1, fpn_channels=16,
                             representation_size=32)
    result = run_detection(params, write_encoder(tmp_path / "encoder.pt"), tmp_path / "det",
                           torch.device("cpu"), seed=0)
    assert result["dataset"] == {"source": str(RACCOON), "classes": ["raccoon"],
                                 "classes_from": "labels.txt", "train": 160, "test": 40}
    assert 0.0 <= result["map"] <= 1.0


def test_diverging_detection_raises_the_stage_error(tmp_path):
    """A non-finite loss stops the stage with errors.StageError naming the step and the fix."""
    from instdisc.errors import StageError

    params = DetectionParams(synthetic_train=4, synthetic_test=2, synthetic_size=48, min_size=48,
                             max_size=48, iterations=2, batch_size=2, warmup_iters=1, lr=1e30,
                             fpn_channels=16, representation_size=32)
    with pytest.raises(StageError, match=r"detection loss is (nan|inf) at step 1: .*; lower lr"):
        run_detection(params, write_encoder(tmp_path / "encoder.pt"), tmp_path / "det",
                      torch.device("cpu"), seed=0)
