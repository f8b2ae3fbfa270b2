from pathlib import Path

import numpy as np
import pytest
import torch
from image_trees import clean_tree, encode, rgb, write_zip

from instdisc.config import PrepareParams, SyntheticParams
from instdisc.data.augment import BatchAugment, eval_transform
from instdisc.data.loaders import (TrainLoader, eval_batches, eval_file_transform, num_batches,
                                   shard_order, train_batches, train_file_transform)
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("syn") / "prepared"
    params = PrepareParams(synthetic=SyntheticParams(num_classes=3, train_per_class=7,
                                                     test_per_class=3, image_size=16))
    prepare(params, seed=0, out_dir=out, progress=False)
    return PreparedDataset.open(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("files")
    tree = clean_tree(per_class=5, size=24)
    tree["train/cat/gray.jpg"] = encode(rgb(30, 1).convert("L"), "JPEG")
    params = PrepareParams(source=str(write_zip(root / "src.zip", tree)), max_in_memory_size=16)
    prepare(params, seed=0, out_dir=root / "prepared", progress=False)
    return PreparedDataset.open(root / "prepared")


def test_num_batches():
    assert num_batches(10, 4, True) == 2
    assert num_batches(10, 4, False) == 3 and num_batches(8, 4, False) == 2


def test_shards_are_disjoint_and_cover():
    torch.manual_seed(0)
    a = shard_order(11, rank=0, world_size=2, drop_last=False)
    torch.manual_seed(0)
    b = shard_order(11, rank=1, world_size=2, drop_last=False)
    assert sorted(a.tolist() + b.tolist()) == list(range(11))
    torch.manual_seed(0)
    c = shard_order(11, rank=1, world_size=2, drop_last=True)
    assert len(c) == 5 and set(c.tolist()) <= set(b.tolist())
    with pytest.raises(ValueError, match="rank must be in"):
        shard_order(4, rank=2, world_size=2)


def test_array_epoch_covers_every_index_once(synthetic):
    train = synthetic.split("train")
    torch.manual_seed(0)
    batches = list(train_batches(train, 4, BatchAugment(12), "cpu", drop_last=False))
    assert [len(i) for _, i in batches] == [4, 4, 4, 4, 4, 1]
    assert sorted(torch.cat([i for _, i in batches]).tolist()) == list(range(21))
    assert batches[0][0].shape == (4, 3, 12, 12) and batches[0][0].dtype == torch.float32
    torch.manual_seed(0)
    again = list(train_batches(train, 4, BatchAugment(12), "cpu", drop_last=False))
    for (x, i), (y, j) in zip(batches, again):
        assert torch.equal(i, j) and torch.equal(x, y)
    assert len(list(train_batches(train, 4, BatchAugment(12), "cpu"))) == 5


def test_train_loader_is_one_epoch_per_iter(synthetic):
    train = synthetic.split("train")
    loader = TrainLoader(train, 4, BatchAugment((12, 10)), "cpu", rank=1, world_size=2)
    torch.manual_seed(0)
    first = list(loader)
    assert len(first) == len(loader) == 2 and first[0][0].shape == (4, 3, 12, 10)
    second = list(loader)
    assert not torch.equal(first[0][1], second[0][1])  # reshuffled
    open_ended = TrainLoader(train, 4, BatchAugment(8), "cpu", drop_last=False, world_size=2)
    assert len(open_ended) == len(list(open_ended)) == 3  # rank 0 of 2: 11 of 21 items


def test_array_shards_under_two_ranks(synthetic):
    train, seen = synthetic.split("train"), []
    for rank in (0, 1):
        torch.manual_seed(1)
        seen.append(torch.cat([i for _, i in train_batches(
            train, 3, BatchAugment(8), "cpu", drop_last=False, rank=rank, world_size=2)]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(21))


def test_eval_batches_in_index_order(synthetic):
    test = synthetic.split("test")
    batches = list(eval_batches(test, 4, "cpu"))
    assert torch.cat([i for _, i in batches]).tolist() == list(range(9))
    torch.testing.assert_close(batches[0][0], eval_transform(test.images[:4]))
    assert next(eval_batches(test, 4, "cpu", image_size=20))[0].shape == (4, 3, 20, 20)
    limited = list(eval_batches(test, 4, "cpu", limit=5))
    assert [len(x) for x, _ in limited] == [4, 1]
    assert torch.cat([i for _, i in limited]).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_manifest_split_reads_files(files, num_workers):
    train = files.split("train")
    assert train.storage == "manifest" and train.num_items == 11
    transform = train_file_transform(16)
    torch.manual_seed(0)
    batches = list(train_batches(train, 4, BatchAugment(16), "cpu", file_transform=transform,
                                 num_workers=num_workers, drop_last=False))
    assert sorted(torch.cat([i for _, i in batches]).tolist()) == list(range(11))
    assert batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.float32
    torch.manual_seed(0)
    again = list(train_batches(train, 4, BatchAugment(16), "cpu", file_transform=transform,
                               num_workers=0, drop_last=False))
    for (x, i), (y, j) in zip(batches, again):  # same draws whichever process decodes
        assert torch.equal(i, j) and torch.equal(x, y)


def test_manifest_eval_batches(files):
    test = files.split("test")
    with pytest.raises(ValueError, match="needs image_size"):
        eval_batches(test, 2, "cpu")
    batches = list(eval_batches(test, 3, "cpu", image_size=14))
    assert torch.cat([i for _, i in batches]).tolist() == [0, 1, 2, 3]
    assert batches[0][0].shape == (3, 3, 14, 14)
    expected = eval_file_transform(14)(_pil(test.paths[0]))
    torch.testing.assert_close(batches[0][0][0], expected)
    resized = next(eval_batches(test, 3, "cpu", image_size=14, resize=24))[0][0]
    torch.testing.assert_close(resized, eval_file_transform(14, 24)(_pil(test.paths[0])))
    assert not torch.allclose(resized, expected)


def _pil(path: Path):
    from PIL import Image
    return Image.open(path).convert("RGB")


def test_default_file_transform_follows_the_augment(files):
    torch.manual_seed(0)
    images, indices = next(train_batches(files.split("train"), 2, BatchAugment(10), "cpu"))
    assert images.shape == (2, 3, 10, 10) and indices.dtype == torch.int64
    assert np.isfinite(images.numpy()).all()
