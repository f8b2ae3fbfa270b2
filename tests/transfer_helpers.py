"""Shared by the transfer tests: a tiny prepared dataset and tiny encoder files (fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from instdisc import checkpoint
from instdisc.config import PrepareParams, SyntheticParams
from instdisc.data.augment import MEAN, STD
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.models.encoder import build_encoder

TINY_SYNTHETIC = SyntheticParams(num_classes=3, train_per_class=20, test_per_class=8, image_size=16)


def write_encoder(path: Path, fingerprint: str = "", cifar_stem: bool = True) -> Path:
    """A randomly initialised eighth-width ResNet-18 saved as an encoder file."""
    encoder = build_encoder("resnet18", feature_dim=16, cifar_stem=cifar_stem, width=0.125)
    checkpoint.save_encoder(path, encoder, {"mean": list(MEAN), "std": list(STD),
                                            "image_size": [16, 16], "resize": None},
                            extra={"fingerprint": fingerprint} if fingerprint else None)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(PrepareParams(synthetic=TINY_SYNTHETIC), seed=0, out_dir=out, progress=False)
    return PreparedDataset.open(out)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, tiny_prepared) -> Path:
    return write_encoder(tmp_path_factory.mktemp("models") / "encoder.pt",
                         tiny_prepared.fingerprint)
