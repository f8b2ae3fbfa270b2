import pytest
import torch

from instdisc.data.augment import MEAN, STD, BatchAugment, eval_transform, normalize


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def images(batch=16, size=12, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, size, size, 3) if channels_last else (batch, 3, size, size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def test_normalize_matches_the_formula():
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(normalize(x), expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_output_shape_dtype_and_range(channels_last):
    out = BatchAugment(8)(images(channels_last=channels_last), torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 8, 8) and out.dtype == torch.float32
    x = unnormalize(out)
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6 and x.std() > 0.1


def test_rectangular_output_size():
    out = BatchAugment((6, 10))(images(size=12))
    assert out.shape == (16, 3, 6, 10)
    with pytest.raises(ValueError, match="out_size must be"):
        BatchAugment((0, 4))


def test_seeded_generator_reproduces_and_samples_differ():
    augment, x = BatchAugment(10), images(size=10)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    same = images(batch=1, size=10).expand(8, -1, -1, -1)
    out = augment(same, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 8


def test_global_rng_is_used_without_a_generator():
    augment, x = BatchAugment(10), images(size=10)
    torch.manual_seed(5)
    a = augment(x)
    torch.manual_seed(5)
    torch.testing.assert_close(augment(x), a, rtol=0, atol=0)


def test_grayscale_prob_one_gives_equal_channels():
    x = unnormalize(BatchAugment(12, grayscale_prob=1.0)(images()))
    torch.testing.assert_close(x[:, 0], x[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(x[:, 1], x[:, 2], rtol=0, atol=1e-6)


def test_full_crop_without_jitter_or_flip_is_the_eval_transform():
    identity = dict(crop_scale=(1.0, 1.0), color_jitter=0.0, grayscale_prob=0.0, hflip=False)
    x = images(size=12)
    # Equal up to float rounding of the sampling grid (one grey level is 0.017 here).
    torch.testing.assert_close(BatchAugment(12, **identity)(x), eval_transform(x),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(BatchAugment(20, **identity)(x), eval_transform(x, 20),
                               rtol=0, atol=1e-4)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(eval_transform(x), expected)


def test_flip_only_mirrors_the_image():
    flip_only = BatchAugment(12, crop_scale=(1.0, 1.0), color_jitter=0.0, grayscale_prob=0.0)
    x = images(batch=64, size=12)
    out = flip_only(x, torch.Generator().manual_seed(0))
    plain, mirrored = eval_transform(x), eval_transform(x).flip(-1)
    is_plain = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    is_mirrored = (out - mirrored).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((is_plain | is_mirrored).all()) and 16 < int(is_mirrored.sum()) < 48


def test_jitter_without_crop_changes_colour_but_keeps_gray_pixels_gray():
    gray = torch.full((32, 6, 6, 3), 100, dtype=torch.uint8)
    out = unnormalize(BatchAugment(6, crop_scale=(1.0, 1.0), hflip=False, grayscale_prob=0.0)(gray))
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=1e-5)
    per_image = out.mean(dim=(1, 2, 3))                                   # (B,)
    assert per_image.min() < 100 / 255 * 0.8 and per_image.max() > 100 / 255 * 1.2


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="crop_scale"):
        BatchAugment(8, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="expected uint8"):
        BatchAugment(8)(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) or \(B, 3, H, W\)"):
        BatchAugment(8)(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))


def test_hue_rotation_approximates_torchvision_hue():
    from torchvision.transforms.v2.functional import adjust_hue

    from instdisc.data.augment import _hue_matrix
    cross = BatchAugment(4).gray_cross
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for shift in (0.1, 0.3, -0.2):
        matrix = _hue_matrix(torch.tensor([2 * torch.pi * shift]), cross)  # (1, 3, 3)
        ours = torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)
        ref = adjust_hue(x, shift)
        assert (ours - ref).abs().mean() < 0.7 * (x - ref).abs().mean()  # wrong way: > 1.0
    red = torch.tensor([1.0, 0.0, 0.0])
    third = _hue_matrix(torch.tensor([2 * torch.pi / 3]), cross)[0]
    torch.testing.assert_close(third @ red, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_crop_boxes_follow_torchvision_random_resized_crop_distribution():
    """Area fraction and log aspect ratio of 20k boxes vs torchvision's get_params (KS test)."""
    from torchvision.transforms import v2

    H = W = 32
    augment = BatchAugment(32, crop_scale=(0.2, 1.0))
    torch.manual_seed(0)
    x0, y0, w, h, flip = augment.crop_boxes(torch.rand(20000, 23), H, W)
    ours_area, ours_aspect = (w * h / (H * W)), torch.log(w / h)
    assert (x0 >= 0).all() and (x0 + w <= W + 1e-4).all() and (y0 + h <= H + 1e-4).all()
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    image = torch.zeros(3, H, W)
    torch.manual_seed(1)
    ref = [v2.RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
           for _ in range(20000)]
    ref_h = torch.tensor([r[2] for r in ref], dtype=torch.float)
    ref_w = torch.tensor([r[3] for r in ref], dtype=torch.float)
    ref_area, ref_aspect = ref_w * ref_h / (H * W), torch.log(ref_w / ref_h)
    # torchvision rounds boxes to whole pixels (a staircase CDF at 32 px); ours are continuous
    assert ours_area.mean().item() == pytest.approx(ref_area.mean().item(), abs=0.02)
    assert ours_aspect.std().item() == pytest.approx(ref_aspect.std().item(), rel=0.03)
    for ours, theirs, tolerance in ((ours_area, ref_area, 0.05), (ours_aspect, ref_aspect, 0.06)):
        grid = torch.linspace(float(theirs.min()), float(theirs.max()), 200)
        cdf_ours = (ours[None, :] <= grid[:, None]).float().mean(dim=1)
        cdf_theirs = (theirs[None, :] <= grid[:, None]).float().mean(dim=1)
        assert (cdf_ours - cdf_theirs).abs().max() < tolerance


def test_jitter_probability_and_hue_are_their_own_knobs():
    x = images(batch=4000, size=4)
    gray = torch.full((4000, 4, 4, 3), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    unchanged = BatchAugment(4, crop_scale=(1.0, 1.0), grayscale_prob=0.0, hflip=False,
                             jitter_prob=0.8)
    out = unnormalize(unchanged(gray))
    untouched = (out - 128 / 255).abs().amax(dim=(1, 2, 3)) < 1e-5          # brightness 1
    assert abs(untouched.float().mean().item() - 0.2) < 0.03
    plain = BatchAugment(4, crop_scale=(1.0, 1.0), grayscale_prob=0.0, hflip=False,
                         color_jitter=0.0, hue=0.0)
    assert torch.allclose(unnormalize(plain(x)), x.permute(0, 3, 1, 2).float() / 255, atol=1e-5)
    hue_only = BatchAugment(4, crop_scale=(1.0, 1.0), grayscale_prob=0.0, hflip=False,
                            color_jitter=0.0, hue=0.4)
    shifted = unnormalize(hue_only(x))
    assert not torch.allclose(shifted, x.permute(0, 3, 1, 2).float() / 255, atol=1e-2)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mean_gray = (shifted.clamp(0, 1) * luma).sum(1).mean()                  # hue keeps grays
    assert mean_gray.item() == pytest.approx(((x.permute(0, 3, 1, 2).float() / 255) * luma)
                                             .sum(1).mean().item(), abs=0.02)
    with pytest.raises(ValueError, match=r"jitter_prob must be in \[0, 1\], got 1.5"):
        BatchAugment(4, jitter_prob=1.5)
    with pytest.raises(ValueError, match=r"hue must be in \[0, 0.5\], got 0.6"):
        BatchAugment(4, hue=0.6)
