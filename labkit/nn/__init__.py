"""Network building blocks shared by every detector: backbones, necks (FPN, ChannelMapper), Scale, init."""

from labkit.nn.backbones import BACKBONES, ResNet, TinyBackbone, build_backbone
from labkit.nn.fpn import FPN, ChannelMapper
from labkit.nn.init import bias_init_with_prob, constant_init, normal_init, xavier_init
from labkit.nn.scale import Scale

__all__ = [
    "BACKBONES",
    "FPN",
    "ChannelMapper",
    "ResNet",
    "Scale",
    "TinyBackbone",
    "bias_init_with_prob",
    "build_backbone",
    "constant_init",
    "normal_init",
    "xavier_init",
]
