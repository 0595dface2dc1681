"""Backbones, FPN, ChannelMapper, Scale and init helpers: shapes, strides, freezing, hand checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit.nn.backbones import ResNet, TinyBackbone, build_backbone
from labkit.nn.fpn import FPN, ChannelMapper
from labkit.nn.init import bias_init_with_prob, normal_init, xavier_init
from labkit.nn.scale import Scale

torch.set_num_threads(1)

# ResNet C3..C5 of a 800 x 1216 (h x w) image: strides 8, 16, 32 with conv rounding up.
RETINA_C345 = [(100, 152), (50, 76), (25, 38)]


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256, 512]),
        ("resnet50", [256, 512, 1024, 2048]),
        ("tiny", [32, 64, 128, 256]),
    ],
)
def test_backbone_channels_strides_and_shapes(name, channels):
    net = build_backbone(name, out_indices=(0, 1, 2, 3), norm_eval=False).eval()
    assert net.out_channels == channels
    assert net.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 65, 97))
    assert [f.shape[1] for f in feats] == channels
    # Every stride-2 layer rounds up: 65 -> 33 -> 17 -> 9 -> 5 -> 3.
    assert [tuple(f.shape[-2:]) for f in feats] == [(17, 25), (9, 13), (5, 7), (3, 4)]


def test_out_indices_select_c3_to_c5():
    net = ResNet(18, out_indices=(1, 2, 3))
    assert net.out_channels == [128, 256, 512] and net.strides == [8, 16, 32]
    assert len(net.eval()(torch.zeros(1, 3, 64, 64))) == 3


def test_bad_backbone_arguments_name_the_field():
    with pytest.raises(ValueError, match="name"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(18, out_indices=(2, 1))
    with pytest.raises(ValueError, match="out_indices"):
        TinyBackbone(out_indices=(4,))
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNet(18, frozen_stages=5)


@pytest.mark.parametrize("name", ["resnet18", "tiny"])
def test_frozen_stages_do_not_train(name):
    net = build_backbone(name, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=False)
    stem = [net.conv1, net.bn1] if name != "tiny" else [net.stem]
    frozen = [p for m in [*stem, net.layer1] for p in m.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in net.layer2.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    # Frozen stages stay in eval mode (BN running stats do not move) even in train().
    assert all(not m.training for m in [*stem, net.layer1])
    assert net.layer2.training
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sum(f.square().mean() for f in net(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = net.state_dict()
    for prefix in ("conv1", "bn1", "stem", "layer1"):
        for key in (k for k in before if k.startswith(prefix + ".")):
            assert torch.equal(before[key], after[key]), key
    # A trainable stage did move (zero-init residual: the block's last BN gamma gets gradient).
    key = "layer2.0.bn2.weight" if name != "tiny" else "layer2.0.0.weight"
    assert not torch.equal(before[key], after[key])


def test_frozen_stages_zero_freezes_only_the_stem():
    net = ResNet(18, frozen_stages=0)
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert all(p.requires_grad for p in net.layer1.parameters())


def test_norm_eval_keeps_batchnorm_statistics_fixed():
    net = ResNet(18, norm_eval=True).train()
    assert net.training and all(not bn.training for bn in _bns(net))
    stats = [bn.running_mean.clone() for bn in _bns(net)]
    net(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert all(torch.equal(s, bn.running_mean) for s, bn in zip(stats, _bns(net), strict=True))
    # BN affine parameters still train unless norm_requires_grad=False (mmdet's norm_cfg).
    assert net.bn1.weight.requires_grad
    assert not ResNet(18, norm_requires_grad=False).bn1.weight.requires_grad
    free = ResNet(18, norm_eval=False).train()
    assert all(bn.training for bn in _bns(free))


def test_zero_init_residual_starts_blocks_as_identity():
    assert torch.all(ResNet(18).layer1[0].bn2.weight == 0)
    assert torch.all(ResNet(50).layer1[0].bn3.weight == 0)
    assert torch.all(ResNet(18, zero_init_residual=False).layer1[0].bn2.weight == 1)


def _maps(shapes, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, c, h, w, generator=g) for c, (h, w) in zip(channels, shapes, strict=True)
    ]


def test_retinanet_fpn_levels_match_anchor_grid():
    channels = [32, 48, 64]  # small stand-ins for C3..C5; only the spatial sizes matter here
    fpn = FPN(channels, 16, num_outs=5, add_extra_convs="on_input")
    outs = fpn(_maps(RETINA_C345, channels))
    # P3..P7 of a 1216 x 800 (w x h) image: 152x100, 76x50, 38x25, 19x13, 10x7.
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (100, 152),
        (50, 76),
        (25, 38),
        (13, 19),
        (7, 10),
    ]
    assert all(o.shape[1] == 16 for o in outs)
    # on_input: P6 reads C5 (64 channels), P7 reads P6.
    assert fpn.fpn_convs[3].in_channels == 64 and fpn.fpn_convs[4].in_channels == 16


def test_fpn_forward_by_hand():
    channels = [4, 6, 8]
    shapes = [(9, 11), (5, 6), (3, 3)]
    fpn = FPN(channels, 5, num_outs=5, add_extra_convs="on_input", relu_before_extra_convs=True)
    x = _maps(shapes, channels, seed=1)
    outs = fpn(x)
    lat = [conv(x[i]) for i, conv in enumerate(fpn.lateral_convs)]
    lat[1] = lat[1] + F.interpolate(lat[2], size=(5, 6), mode="nearest")
    lat[0] = lat[0] + F.interpolate(lat[1], size=(9, 11), mode="nearest")
    for i in range(3):
        torch.testing.assert_close(outs[i], fpn.fpn_convs[i](lat[i]))
    torch.testing.assert_close(outs[3], fpn.fpn_convs[3](x[2]))
    torch.testing.assert_close(outs[4], fpn.fpn_convs[4](F.relu(outs[3])))


@pytest.mark.parametrize("mode", ["on_lateral", "on_output"])
def test_fpn_extra_conv_sources(mode):
    channels = [4, 6, 8]
    fpn = FPN(channels, 5, num_outs=5, add_extra_convs=mode)
    x = _maps([(8, 8), (4, 4), (2, 2)], channels)
    outs = fpn(x)
    lateral = fpn.lateral_convs[2](x[2])
    source = lateral if mode == "on_lateral" else outs[2]
    torch.testing.assert_close(outs[3], fpn.fpn_convs[3](source))
    torch.testing.assert_close(outs[4], fpn.fpn_convs[4](outs[3]))  # no ReLU by default
    assert fpn.fpn_convs[3].in_channels == 5


def test_fpn_without_extra_convs_max_pools_and_true_means_on_input():
    channels = [4, 6, 8]
    fpn = FPN(channels, 5, num_outs=5)
    outs = fpn(_maps([(8, 8), (4, 4), (3, 3)], channels))
    assert len(fpn.fpn_convs) == 3
    torch.testing.assert_close(outs[3], outs[2][..., ::2, ::2])
    torch.testing.assert_close(outs[4], outs[3][..., ::2, ::2])
    assert FPN(channels, 5, num_outs=5, add_extra_convs=True).add_extra_convs == "on_input"


def test_fpn_start_level_skips_inputs_and_validates():
    channels = [3, 4, 6, 8]
    fpn = FPN(channels, 5, num_outs=5, start_level=1, add_extra_convs="on_input")
    outs = fpn(_maps([(16, 16), (8, 8), (4, 4), (2, 2)], channels))
    assert [o.shape[-1] for o in outs] == [8, 4, 2, 1, 1]
    assert len(fpn.lateral_convs) == 3
    with pytest.raises(ValueError, match="add_extra_convs"):
        FPN(channels, 5, num_outs=5, add_extra_convs="on_top")
    with pytest.raises(ValueError, match="num_outs"):
        FPN(channels, 5, num_outs=2)
    with pytest.raises(ValueError, match="inputs"):
        fpn(_maps([(4, 4)], [3]))


def test_fpn_with_group_norm_by_hand():
    # mmdetection's FPN with norm_cfg=GN: every ConvModule is conv (no bias) -> GroupNorm,
    # laterals and extra convs included; the top-down sum adds normalized laterals
    channels = [4, 6, 8]
    fpn = FPN(channels, 8, num_outs=5, add_extra_convs="on_input", norm="gn", num_groups=4)
    for conv in [*fpn.lateral_convs, *fpn.fpn_convs]:
        assert isinstance(conv, nn.Sequential) and conv[0].bias is None
        assert isinstance(conv[1], nn.GroupNorm) and conv[1].num_groups == 4
    with torch.no_grad():  # non-trivial affine parameters
        for conv in [*fpn.lateral_convs, *fpn.fpn_convs]:
            conv[1].weight.uniform_(0.5, 1.5)
            conv[1].bias.uniform_(-0.5, 0.5)
    x = _maps([(9, 11), (5, 6), (3, 3)], channels, seed=2)
    outs = fpn(x)

    def conv_gn(module, t):
        conv, gn = module[0], module[1]
        t = F.conv2d(t, conv.weight, None, conv.stride, conv.padding)
        return F.group_norm(t, 4, gn.weight, gn.bias, gn.eps)

    lat = [conv_gn(fpn.lateral_convs[i], x[i]) for i in range(3)]
    lat[1] = lat[1] + F.interpolate(lat[2], size=(5, 6), mode="nearest")
    lat[0] = lat[0] + F.interpolate(lat[1], size=(9, 11), mode="nearest")
    for i in range(3):
        torch.testing.assert_close(outs[i], conv_gn(fpn.fpn_convs[i], lat[i]))
    torch.testing.assert_close(outs[3], conv_gn(fpn.fpn_convs[3], x[2]))
    torch.testing.assert_close(outs[4], conv_gn(fpn.fpn_convs[4], outs[3]))
    # without a norm the convs stay plain Conv2d with a bias (checkpoint keys unchanged)
    plain = FPN(channels, 8, num_outs=5, add_extra_convs="on_input")
    assert "lateral_convs.0.bias" in plain.state_dict()
    assert "lateral_convs.0.1.bias" in fpn.state_dict()
    with pytest.raises(ValueError, match="norm: expected 'gn' or None, got 'bn'"):
        FPN(channels, 8, num_outs=5, norm="bn")
    with pytest.raises(ValueError, match="num_groups: out_channels=8 is not divisible by"):
        FPN(channels, 8, num_outs=5, norm="gn", num_groups=3)


def test_fpn_convs_are_xavier_initialised_with_zero_bias():
    fpn = FPN([64, 64], 64, num_outs=2)
    bound = math.sqrt(6.0 / (64 * 9 + 64 * 9))
    w = fpn.fpn_convs[0].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert torch.all(fpn.fpn_convs[0].bias == 0)


def test_channel_mapper_deformable_detr_config():
    channels = [8, 12, 16]
    mapper = ChannelMapper(channels, 32, kernel_size=1, num_outs=4, norm="gn", num_groups=8)
    x = _maps([(16, 20), (8, 10), (4, 5)], channels)
    outs = mapper(x)
    assert [tuple(o.shape) for o in outs] == [
        (1, 32, 16, 20),
        (1, 32, 8, 10),
        (1, 32, 4, 5),
        (1, 32, 2, 3),
    ]
    conv, gn = mapper.extra_convs[0][0], mapper.extra_convs[0][1]
    assert conv.in_channels == 16 and conv.stride == (2, 2) and conv.bias is None
    torch.testing.assert_close(outs[3], gn(conv(x[2])))  # extra level reads the last *input*
    assert isinstance(mapper.convs[0][1], nn.GroupNorm) and len(mapper.convs[0]) == 2
    with pytest.raises(ValueError, match="num_groups"):
        ChannelMapper(channels, 30)


def test_scale_and_init_helpers():
    s = Scale(2.0)
    torch.testing.assert_close(s(torch.ones(3)), torch.full((3,), 2.0))
    s(torch.ones(3)).sum().backward()
    assert s.scale.grad == 3.0
    assert bias_init_with_prob(0.01) == pytest.approx(-4.59511985, abs=1e-6)
    assert torch.sigmoid(torch.tensor(bias_init_with_prob(0.2))) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="prior_prob"):
        bias_init_with_prob(1.0)
    conv = nn.Conv2d(256, 256, 3)
    normal_init(conv, std=0.01, bias=0.5)
    assert abs(conv.weight.std().item() - 0.01) < 1e-3 and torch.all(conv.bias == 0.5)
    xavier_init(conv, distribution="uniform")
    assert torch.all(conv.bias == 0)
