"""pretrain.decode "device": workers read bytes, the batch is decoded, cropped and augmented on
the device. Here the device is the CPU (torchvision's libjpeg-turbo decoder): the same code."""

import io
import math

import numpy as np
import pytest
import torch
from image_trees import write_zip
from PIL import Image
from test_file_transforms import jpeg, photo

from instdisc.config import ParamsError, PrepareParams, PretrainParams
from instdisc.data.augment import MEAN, STD, BatchAugment
from instdisc.data.device_decode import DeviceDecoder, decode_images, resolve_decode
from instdisc.data.file_transforms import TrainFileTransform, seeded_cpu_rng
from instdisc.data.loaders import train_batches
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> PreparedDataset:
    """A manifest dataset of photo-like JPEGs (two sizes, one grayscale) and one PNG."""
    root = tmp_path_factory.mktemp("photos")
    files = {}
    for c, name in enumerate(("cat", "dog")):
        for i in range(5):
            size = (120, 90) if i % 2 else (90, 120)
            mode = "L" if i == 3 else "RGB"
            files[f"train/{name}/{i}.jpg"] = jpeg(photo(*size, 10 * c + i), mode)
        files[f"test/{name}/0.jpg"] = jpeg(photo(100, 75, 50 + c))
    png = io.BytesIO()
    Image.fromarray(photo(100, 80, 99)).save(png, format="PNG")
    files["train/dog/png.png"] = png.getvalue()
    prepare(PrepareParams(source=str(write_zip(root / "src.zip", files)), max_in_memory_size=32),
            seed=0, out_dir=root / "prepared", progress=False)
    return PreparedDataset.open(root / "prepared")


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_resolve_decode():
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("auto", "cuda:1") == "device"
    assert resolve_decode("device", "cpu") == "device" and resolve_decode("cpu", "cuda") == "cpu"
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_decode("gpu", "cpu")
    with pytest.raises(ParamsError, match="decode = 'gpu'"):
        PretrainParams(decode="gpu")


def test_decode_images_matches_pillow_and_falls_back_for_png(photos):
    paths = photos.split("train").paths
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    images = decode_images(data, torch.device("cpu"))
    for path, image in zip(paths, images):
        expected = np.asarray(Image.open(path).convert("RGB"))             # (H, W, 3)
        assert image.dtype == torch.uint8 and image.shape == (3, *expected.shape[:2])
        diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected).mean()
        assert diff < 1.0, path  # libjpeg-turbo on both sides; the PNG is exact


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_batches_shapes_values_and_determinism(photos, num_workers):
    train, augment = photos.split("train"), BatchAugment(24)
    torch.manual_seed(0)
    batches = list(train_batches(train, 4, augment, "cpu", decode="device", drop_last=False,
                                 num_workers=num_workers))
    assert [len(i) for _, i in batches] == [4, 4, 3]
    assert sorted(torch.cat([i for _, i in batches]).tolist()) == list(range(11))
    for images, _ in batches:
        assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
        pixels = unnormalize(images)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.02
    torch.manual_seed(0)
    again = list(train_batches(train, 4, augment, "cpu", decode="device", drop_last=False))
    for (x, i), (y, j) in zip(batches, again):
        assert torch.equal(i, j) and torch.equal(x, y)
    torch.manual_seed(1)
    other = next(iter(train_batches(train, 4, augment, "cpu", decode="device")))[0]
    assert not torch.equal(other, batches[0][0])


def test_device_crops_are_the_cpu_paths_boxes():
    data = jpeg(photo(120, 90, 7))
    decoder = DeviceDecoder(BatchAugment(24), "cpu")
    image = decode_images([torch.frombuffer(bytearray(data), dtype=torch.uint8)], "cpu")[0]
    cpu = TrainFileTransform(24)
    for seed in range(20):
        with seeded_cpu_rng(seed):
            expected = cpu.crop.make_params([Image.open(io.BytesIO(data))])
        assert decoder.crop_boxes([image], [seed]) == [expected]


def test_crop_distribution_follows_random_resized_crop():
    augment = BatchAugment(24, crop_scale=(0.2, 1.0))
    decoder = DeviceDecoder(augment, "cpu")
    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    boxes = decoder.crop_boxes([image] * 2000, range(2000))
    area = np.array([b["height"] * b["width"] / (300 * 400) for b in boxes])
    aspect = np.array([b["width"] / b["height"] for b in boxes])
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert all(b["top"] + b["height"] <= 300 and b["left"] + b["width"] <= 400 for b in boxes)
    # The same law as the array path's crops (BatchAugment.crop_boxes, tested against
    # torchvision in test_augment.py): large areas at extreme aspects do not fit and are redrawn.
    _, _, w, h, _ = augment.crop_boxes(torch.rand(20000, 23, generator=torch.Generator()
                                                  .manual_seed(0)), 300, 400)
    reference_area, reference_aspect = (w * h / (300 * 400)).numpy(), (w / h).numpy()
    assert abs(area.mean() - reference_area.mean()) < 0.015
    assert abs(area.std() - reference_area.std()) < 0.015
    assert abs(np.log(aspect).mean() - np.log(reference_aspect).mean()) < 0.015


def test_without_colour_augmentation_it_matches_the_cpu_crop_and_resize():
    data = jpeg(photo(120, 90, 8))
    plain = dict(color_jitter=0.0, grayscale_prob=0.0, hflip=False)
    decoder = DeviceDecoder(BatchAugment(24, hue=0.0, **plain), "cpu")
    cpu = TrainFileTransform(24, hue=0.0, **plain)
    seeds = torch.arange(6)
    device = decoder([torch.frombuffer(bytearray(data), dtype=torch.uint8)] * 6, seeds)
    for seed, out in zip(seeds.tolist(), device):
        with seeded_cpu_rng(seed):
            expected = cpu(data)
        grey_levels = (out - expected).abs().mean().item() * 255 * min(STD)
        assert grey_levels < 2.0, seed  # torch's vs Pillow's antialiased bilinear resize


def test_augment_crops_is_forward_without_the_crop():
    crops = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    augment = BatchAugment(12, grayscale_prob=1.0)
    out = augment.augment_crops(crops, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 12, 12) and out.dtype == torch.float32
    gray = unnormalize(out)
    torch.testing.assert_close(gray[:, 0], gray[:, 1], rtol=0, atol=1e-5)
    identity = BatchAugment(12, color_jitter=0.0, grayscale_prob=0.0, hflip=False)
    expected = (crops.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(identity.augment_crops(crops), expected)
    flips = BatchAugment(12, color_jitter=0.0, grayscale_prob=0.0)
    flipped = flips.augment_crops(crops, torch.Generator().manual_seed(1))
    for x, y in zip(flipped, expected):
        assert torch.allclose(x, y) or torch.allclose(x, y.flip(2))
    assert math.isfinite(out.sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_matches_the_cpu_decode(photos):
    paths = photos.split("train").paths
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    on_cpu = decode_images(data, "cpu")
    on_cuda = decode_images(data, "cuda")
    for a, b in zip(on_cpu, on_cuda):
        assert b.device.type == "cuda" and a.shape == b.shape
        assert (a.float() - b.cpu().float()).abs().mean() < 2.0  # nvJPEG vs libjpeg-turbo IDCT
    torch.manual_seed(0)
    images, indices = next(iter(train_batches(photos.split("train"), 4, BatchAugment(24), "cuda",
                                              decode="auto")))
    assert images.device.type == indices.device.type == "cuda"
    assert images.shape == (4, 3, 24, 24) and torch.isfinite(images).all()
