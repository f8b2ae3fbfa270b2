"""The real CIFAR-10 archive from shared/ (skipped when absent): listing fast, preparing slow."""

from pathlib import Path

import pytest

from instdisc.config import PrepareParams
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.data.sources import ImageSource

CIFAR10 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "cifar10.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar10() -> Path:
    if not CIFAR10.is_file():
        pytest.skip(f"{CIFAR10} not present")
    return CIFAR10


def test_cifar10_listing(cifar10):
    with ImageSource(cifar10) as source:
        assert source.kind == "zip" and source.splits == ["test", "train"]
        assert source.classes("train") == CLASSES == source.classes("test")
        assert len(source.entries) == 60_000 and source.ignored == []
        assert source.entries[0].relpath == "test/airplane/0000.jpg"


@pytest.mark.slow
def test_prepare_cifar10(cifar10, tmp_path):
    report = prepare(PrepareParams(source=str(cifar10)), seed=0, out_dir=tmp_path / "prepared",
                     progress=False)
    assert report["skipped"] == [] and report["converted"] == {} and report["resized"] is None
    assert report["counts"]["train"] == dict.fromkeys(CLASSES, 5000)
    data = PreparedDataset.open(tmp_path / "prepared")
    train, test = data.split("train"), data.split("test")
    assert data.classes == CLASSES and train.storage == "array"
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert train.labels[4999] == 0 and train.labels[5000] == 1
