"""Places transfer (arXiv:1805.01978, Sec. 4.2, Table 3): a linear probe on a scene dataset."""

from __future__ import annotations

import pytest
import torch

from instdisc.config import LinearParams, PlacesParams, SyntheticParams
from instdisc.transfer.places import run_places

from conftest import SHARED_DATA
from transfer_helpers import TINY_SYNTHETIC, tiny_encoder, tiny_prepared  # noqa: F401 (fixtures)

SCENE15 = SHARED_DATA / "scene15" / "scene15.zip"
PROBE = LinearParams(layers=("conv1", "conv5"), target_dim=64, epochs=2, batch_size=16)


def test_places_on_synthetic_scenes(tmp_path, tiny_encoder, tiny_prepared):
    params = PlacesParams(synthetic=SyntheticParams(num_classes=4, train_per_class=10,
                                                    test_per_class=5, image_size=16), probe=PROBE)
    result = run_places(params, tiny_encoder, tmp_path / "places", torch.device("cpu"), seed=0)
    assert set(result["top1"]) == {"conv1", "conv5"}
    assert set(result["random_init"]["top1"]) == {"conv1", "conv5"}
    assert result["dataset"]["num_classes"] == 4 and result["dataset"]["train"] == 40
    assert all(0.0 <= v <= 100.0 for v in result["top1"].values())


def test_synthetic_scenes_are_new_images(tmp_path, tiny_encoder, tiny_prepared):
    """Same generator settings as pretraining, but seed + seed_offset: different images."""
    params = PlacesParams(synthetic=TINY_SYNTHETIC, probe=PROBE)
    result = run_places(params, tiny_encoder, tmp_path / "places", torch.device("cpu"), seed=0)
    assert result["dataset"]["fingerprint"] != tiny_prepared.fingerprint
    again = run_places(params, tiny_encoder, tmp_path / "places", torch.device("cpu"), seed=0)
    assert again["dataset"]["fingerprint"] == result["dataset"]["fingerprint"]
    assert again["top1"] == result["top1"]                                 # deterministic


@pytest.mark.skipif(not SCENE15.is_file(), reason=f"{SCENE15} not available")
def test_places_on_scene15(tmp_path, tiny_encoder):
    params = PlacesParams(source=str(SCENE15), image_size=32,
                          probe=LinearParams(layers=("conv5",), target_dim=64, epochs=2,
                                             random_init_baseline=False))
    result = run_places(params, tiny_encoder, tmp_path / "scene15", torch.device("cpu"), seed=0)
    assert result["dataset"]["num_classes"] == 15
    assert (result["dataset"]["train"], result["dataset"]["test"]) == (750, 375)
    assert 0.0 <= result["top1"]["conv5"] <= 100.0
