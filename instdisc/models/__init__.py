"""Encoders: a torchvision ResNet trunk + a linear embedding head, L2-normalised output."""

from instdisc.models.encoder import ARCHS, Encoder, build_encoder

__all__ = ["ARCHS", "Encoder", "build_encoder"]
