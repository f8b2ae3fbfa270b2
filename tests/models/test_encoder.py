import pytest
import torch
import torchvision

from instdisc.models import build_encoder


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_forward_is_unit_norm_with_feature_dim():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", feature_dim=128, width=0.25)
    out = encoder(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 128) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert encoder.config == {"arch": "resnet18", "feature_dim": 128, "cifar_stem": True,
                              "width": 0.25, "init": "torchvision"}
    assert (encoder.trunk_dim, encoder.feature_dim) == (128, 128)


@pytest.mark.parametrize("cifar_stem, size, spatial", [
    (True, 32, {"conv1": 32, "conv2": 32, "conv3": 16, "conv4": 8, "conv5": 4}),
    (False, 64, {"conv1": 16, "conv2": 16, "conv3": 8, "conv4": 4, "conv5": 2}),
])
def test_stages_and_pooled_shapes(cifar_stem, size, spatial):
    encoder = build_encoder("resnet18", cifar_stem=cifar_stem, width=0.25).eval()
    x = torch.randn(2, 3, size, size)
    stages = encoder.stages(x)
    channels = {"conv1": 16, "conv2": 16, "conv3": 32, "conv4": 64, "conv5": 128}
    assert {k: tuple(v.shape) for k, v in stages.items()} == {
        k: (2, channels[k], spatial[k], spatial[k]) for k in channels}
    pooled = encoder.pooled(x)
    assert pooled.shape == (2, encoder.trunk_dim)
    assert torch.allclose(pooled, stages["conv5"].mean(dim=(2, 3)), atol=1e-5)


def test_width_one_trunk_is_torchvision_resnet18():
    ours = build_encoder("resnet18", cifar_stem=False).trunk.state_dict()
    theirs = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
              if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    cifar = build_encoder("resnet18", cifar_stem=True).trunk.state_dict()
    assert cifar.keys() == theirs.keys() and cifar["conv1.weight"].shape == (64, 3, 3, 3)


def test_width_scales_every_stage():
    full, quarter = build_encoder("resnet18"), build_encoder("resnet18", width=0.25)
    assert quarter.trunk_dim == 128 and quarter.trunk.conv1.out_channels == 16
    assert n_params(quarter.trunk) < n_params(full.trunk) / 12  # ~1/16 of the weights
    assert build_encoder("resnet50", width=0.25).trunk_dim == 2048 * 0.25
    assert build_encoder("resnet50", width=0.5, cifar_stem=False).trunk_dim == 2048 * 0.5
    assert build_encoder("resnet34", width=0.5).trunk_dim == 256


def test_build_encoder_rejects_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown arch 'resnet101'; allowed: \['resnet18', "
                                         r"'resnet34', 'resnet50'\]"):
        build_encoder("resnet101")


def test_encoder_exports_with_a_dynamic_batch():
    encoder = build_encoder("resnet18", feature_dim=16, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(encoder, (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    x5 = torch.randn(5, 3, 32, 32)
    assert torch.allclose(program.module()(x5), encoder(x5), atol=1e-5)


def test_pytorch_init_is_every_layers_own_default_and_torchvision_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    default = build_encoder("resnet18", width=0.25, init="pytorch")
    torch.manual_seed(0)
    kaiming = build_encoder("resnet18", width=0.25)
    conv = default.trunk.layer1[0].conv1.weight                      # (16, 16, 3, 3)
    fan_in = conv[0].numel()
    bound = 1 / fan_in ** 0.5                                         # kaiming_uniform, a = sqrt(5)
    assert conv.abs().max() <= bound and conv.std() > 0.5 * bound / 3 ** 0.5
    fan_out = conv.shape[0] * 9
    expected_std = (2 / fan_out) ** 0.5
    assert kaiming.trunk.layer1[0].conv1.weight.std().item() == pytest.approx(expected_std,
                                                                              rel=0.1)
    assert default.config["init"] == "pytorch"
    with pytest.raises(ValueError, match=r"unknown init 'xavier'; allowed: \['torchvision', "
                                         r"'pytorch'\]"):
        build_encoder("resnet18", init="xavier")
