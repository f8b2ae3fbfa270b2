"""The embedding network f_theta of Wu et al. 2018 (arXiv:1805.01978, Sec. 3 and 4).

A torchvision ResNet trunk (no pretrained weights), optionally with the CIFAR stem (3x3 stride-1
conv, no max-pool; Sec. 4.1 uses ResNet18 on 32x32 CIFAR-10) and a channel multiplier `width`,
followed by a linear layer to `feature_dim` (128 in the paper) and L2 normalisation, so that
`v = f(x) / ||f(x)||` lies on the unit sphere (Sec. 3.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# arch -> (block, blocks per stage), as in torchvision.models.resnet18/34/50
ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
STAGE_PLANES = (64, 128, 256, 512)  # torchvision's layer1..layer4 "planes"; the stem has 64 too
MIN_CHANNELS = 8
INITS = ("torchvision", "pytorch")


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to an int, at least MIN_CHANNELS; exact identity for width 1."""
    return max(MIN_CHANNELS, int(round(channels * width)))


class ScalableResNet(ResNet):
    """torchvision's ResNet with every stage's channel count multiplied by `width`.

    With `width == 1.0` and `cifar_stem=False` this is exactly `torchvision.models.resnetXX()`
    (same modules, state_dict keys and shapes). `fc` is an `nn.Identity`, so `forward` returns the
    global-average-pooled conv5 features (B, trunk_dim). Layers are built with torchvision's own
    `_make_layer`; only the channel counts change.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 width: float = 1.0, cifar_stem: bool = False, init: str = "torchvision") -> None:
        super().__init__(block, layers)
        planes = [scaled_channels(c, width) for c in STAGE_PLANES]
        stem = planes[0]
        if width != 1.0:  # rebuild stem and stages at the scaled widths
            self.inplanes, self.dilation = stem, 1
            self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(stem)
            self.layer1 = self._make_layer(block, planes[0], layers[0])
            self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
            self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
            self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        if cifar_stem:  # 32x32 inputs: keep resolution in the stem (3x3 stride 1, no max-pool)
            self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.fc = nn.Identity()
        self.out_dim = planes[3] * block.expansion
        if width != 1.0 or cifar_stem or init != "torchvision":
            self._reset_parameters(init)

    def _reset_parameters(self, init: str) -> None:
        """`torchvision`: kaiming fan_out convs, BN weight 1 / bias 0 (torchvision's ResNet).
        `pytorch`: every layer's own `reset_parameters()` (kaiming-uniform, a = sqrt(5)), as a
        ResNet written from plain `nn.Conv2d` layers gets it (lemniscate's CIFAR ResNet)."""
        for m in self.modules():
            if init == "pytorch" and isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class Encoder(nn.Module):
    """ResNet trunk + linear head + L2 normalisation: v = f_theta(x) (arXiv:1805.01978, Sec. 3.1).

    Attributes:
        trunk: ScalableResNet with `fc = Identity`; `trunk(x)` is (B, trunk_dim).
        head: nn.Linear(trunk_dim, feature_dim), the embedding layer.
        config: the `build_encoder` arguments, so a checkpoint can rebuild the module.
    """

    def __init__(self, arch: str, feature_dim: int = 128, cifar_stem: bool = True,
                 width: float = 1.0, init: str = "torchvision") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; allowed: {sorted(ARCHS)}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; allowed: {list(INITS)}")
        block, layers = ARCHS[arch]
        self.config = {"arch": arch, "feature_dim": feature_dim, "cifar_stem": cifar_stem,
                       "width": width, "init": init}
        self.trunk = ScalableResNet(block, layers, width=width, cifar_stem=cifar_stem, init=init)
        self.trunk_dim: int = self.trunk.out_dim
        self.feature_dim = feature_dim
        self.head = nn.Linear(self.trunk_dim, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Unit-norm embeddings. x: (B, 3, H, W) -> (B, feature_dim).

        Under autocast the trunk runs in bf16/fp16 but the head and the normalisation run in
        fp32: the embedding is what the bank stores and what 1/tau magnifies."""
        pooled = self.trunk(x)                                  # (B, trunk_dim)
        if torch.is_autocast_enabled(pooled.device.type):
            with torch.autocast(pooled.device.type, enabled=False):
                return F.normalize(self.head(pooled.float()), dim=1)  # (B, D) float32
        return F.normalize(self.head(pooled), dim=1)  # (B, D)

    def pooled(self, x: Tensor) -> Tensor:
        """Global-average-pooled conv5 features, before the head. -> (B, trunk_dim)."""
        return self.trunk(x)  # (B, trunk_dim)

    def stages(self, x: Tensor) -> dict[str, Tensor]:
        """Feature maps after each ResNet stage, named as in the paper's Table 2 (conv1..conv5).

        conv1 is the stem (conv + bn + relu + max-pool; no max-pool with the CIFAR stem);
        conv2..conv5 are layer1..layer4.
        """
        t = self.trunk
        conv1 = t.maxpool(t.relu(t.bn1(t.conv1(x))))  # (B, C1, H/4, W/4); CIFAR stem: (B, C1, H, W)
        conv2 = t.layer1(conv1)  # (B, C2, ., .)
        conv3 = t.layer2(conv2)  # (B, C3, ./2, ./2)
        conv4 = t.layer3(conv3)  # (B, C4, ./4, ./4)
        conv5 = t.layer4(conv4)  # (B, trunk_dim, ./8, ./8)
        return {"conv1": conv1, "conv2": conv2, "conv3": conv3, "conv4": conv4, "conv5": conv5}


def build_encoder(arch: str, feature_dim: int = 128, cifar_stem: bool = True,
                  width: float = 1.0, init: str = "torchvision") -> Encoder:
    """The encoder for `arch` in {resnet18, resnet34, resnet50}, randomly initialised (`init`)."""
    return Encoder(arch, feature_dim=feature_dim, cifar_stem=cifar_stem, width=width, init=init)
