"""Necks: FPN (lateral 1x1 + top-down + 3x3, extra levels) and ChannelMapper, with mmdetection's semantics."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from labkit.nn.init import xavier_init

_EXTRA_MODES = ("on_input", "on_lateral", "on_output")


def _xavier_convs(module: nn.Module) -> None:
    # mmdetection initialises its necks with Xavier-uniform convs and zero biases.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            xavier_init(m, distribution="uniform")


def _check_norm(norm: str | None, out_channels: int, num_groups: int) -> None:
    if norm not in ("gn", None):
        raise ValueError(f"norm: expected 'gn' or None, got {norm!r}")
    if norm == "gn" and out_channels % num_groups:
        raise ValueError(
            f"num_groups: out_channels={out_channels} is not divisible by num_groups={num_groups}"
        )


class _ConvNorm(nn.Sequential):
    """conv -> (GroupNorm) -> (ReLU), mmcv ConvModule's order; bias only without a norm."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int,
        norm: str | None,
        num_groups: int,
        activation: bool,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                c_in,
                c_out,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                bias=norm is None,
            )
        ]
        if norm == "gn":
            layers.append(nn.GroupNorm(num_groups, c_out))
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017) as mmdetection's ``FPN``.

    Inputs ``start_level..end_level`` get a 1x1 lateral conv; from the coarsest down, each
    lateral adds the nearest-neighbour upsampling of the one above (resized to the lateral's
    own size, so odd sizes work); a 3x3 conv then smooths every level. Levels beyond the
    inputs (``num_outs`` > used inputs) come from ``max_pool2d(kernel 1, stride 2)`` of the
    last output when ``add_extra_convs`` is False, otherwise from stride-2 3x3 convs whose
    first one reads:

    - ``"on_input"``: the last used backbone map (RetinaNet's P6 from C5),
    - ``"on_lateral"``: the last lateral (before its 3x3 conv),
    - ``"on_output"``: the last FPN output (FCOS's P6 from P5);

    later extra convs read the previous extra output, through a ReLU when
    ``relu_before_extra_convs`` (RetinaNet/FCOS: P7 = conv(relu(P6))). ``True`` means
    ``"on_input"``. No activation anywhere else.

    ``norm="gn"`` puts a GroupNorm after every conv -- laterals, 3x3 convs and extra convs
    alike -- and drops those convs' bias, as mmdetection's ``FPN`` with
    ``norm_cfg=dict(type='GN', num_groups=32)`` (mmcv ``ConvModule``: conv -> norm, ``bias``
    only without a norm; the "gn-neck" configs). Each conv is then ``Sequential(conv, GN)``;
    without a norm it stays a plain ``Conv2d``.

    Args:
        in_channels: channels of every backbone map passed in, e.g. ``[512, 1024, 2048]``.
        out_channels: channels of every output level.
        num_outs: number of output levels.
        start_level: first input index used. end_level: last input index used (-1 = last);
            with an explicit end_level no extra levels are allowed (mmdetection's rule).
        norm: ``None`` (default) or ``"gn"``. num_groups: GroupNorm groups (mmdetection's
            configs: 32); must divide ``out_channels``.

    Shapes: ``forward(inputs)`` takes ``len(in_channels)`` maps ``Tensor[B, C_i, H_i, W_i]``
    and returns ``num_outs`` maps ``Tensor[B, out_channels, H_l, W_l]``, finest first.
    RetinaNet: ResNet C3..C5, ``add_extra_convs="on_input"``, ``num_outs=5`` -> P3..P7.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        end_level: int = -1,
        add_extra_convs: bool | str = False,
        relu_before_extra_convs: bool = False,
        norm: str | None = None,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("in_channels: expected at least one input level")
        _check_norm(norm, out_channels, num_groups)
        num_ins = len(in_channels)
        if not 0 <= start_level < num_ins:
            raise ValueError(f"start_level: expected 0..{num_ins - 1}, got {start_level}")
        if end_level in (-1, num_ins - 1):
            backbone_end_level = num_ins
            if num_outs < num_ins - start_level:
                raise ValueError(
                    f"num_outs: expected >= {num_ins - start_level} (inputs used), got {num_outs}"
                )
        else:
            if not start_level <= end_level < num_ins:
                raise ValueError(
                    f"end_level: expected {start_level}..{num_ins - 1} or -1, got {end_level}"
                )
            backbone_end_level = end_level + 1
            if num_outs != end_level - start_level + 1:
                raise ValueError(
                    f"num_outs: with end_level={end_level} expected exactly "
                    f"{end_level - start_level + 1}, got {num_outs}"
                )
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs is not False and add_extra_convs not in _EXTRA_MODES:
            raise ValueError(
                f"add_extra_convs: expected False, True or one of {_EXTRA_MODES}, got {add_extra_convs!r}"
            )
        self.in_channels = in_channels
        self.out_channels = int(out_channels)
        self.num_outs = int(num_outs)
        self.start_level = start_level
        self.backbone_end_level = backbone_end_level
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = bool(relu_before_extra_convs)
        self.norm = norm
        self.num_groups = int(num_groups)

        self.lateral_convs = nn.ModuleList(
            self._conv(in_channels[i], 1, 1) for i in range(start_level, backbone_end_level)
        )
        self.fpn_convs = nn.ModuleList(
            self._conv(out_channels, 3, 1) for _ in range(start_level, backbone_end_level)
        )
        num_extra = num_outs - backbone_end_level + start_level
        if add_extra_convs:
            for i in range(num_extra):
                extra_in = out_channels
                if i == 0 and add_extra_convs == "on_input":
                    extra_in = in_channels[backbone_end_level - 1]
                self.fpn_convs.append(self._conv(extra_in, 3, 2))
        _xavier_convs(self)

    def _conv(self, c_in: int, kernel_size: int, stride: int) -> nn.Module:
        """A plain ``Conv2d`` without a norm (the keys of a norm-free FPN stay as they were),
        else ``Sequential(conv without bias, GroupNorm)``."""
        if self.norm is None:
            padding = (kernel_size - 1) // 2
            return nn.Conv2d(c_in, self.out_channels, kernel_size, stride=stride, padding=padding)
        return _ConvNorm(
            c_in, self.out_channels, kernel_size, stride, self.norm, self.num_groups, False
        )

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``inputs``: one ``Tensor[B, C_i, H_i, W_i]`` per ``in_channels`` -> ``num_outs`` maps."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f"inputs: expected {len(self.in_channels)} feature maps, got {len(inputs)}"
            )
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        # Top-down: coarse semantics flow into finer levels (sizes taken from the finer map).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = laterals[-1]
                else:
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return tuple(outs)


class ChannelMapper(nn.Module):
    """Map every backbone level to ``out_channels`` (mmdetection's ``ChannelMapper``).

    One conv (+ GroupNorm, + optional ReLU) per input; when ``num_outs > len(in_channels)``
    the extra levels are stride-2 3x3 convs, the first on the last *input* map, the next on
    the previous extra output. Deformable-DETR / Co-DETR: ResNet C3..C5 with
    ``kernel_size=1``, GN(32), no activation, ``num_outs=4`` (strides 8, 16, 32, 64).

    Args:
        in_channels: channels of each input map.
        out_channels: channels of each output map.
        kernel_size: kernel of the per-input conv (mmdetection's class default is 3; the
            DETR configs use 1, which is this default).
        num_outs: number of outputs (default ``len(in_channels)``).
        norm: ``"gn"`` or ``None``. num_groups: GroupNorm groups.
        activation: ReLU after each conv (mmdetection's class default; DETR configs: off).

    Shapes: ``forward(inputs)``: ``len(in_channels)`` maps ``Tensor[B, C_i, H_i, W_i]`` ->
    ``num_outs`` maps ``Tensor[B, out_channels, H_l, W_l]``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        kernel_size: int = 1,
        num_outs: int | None = None,
        norm: str | None = "gn",
        num_groups: int = 32,
        activation: bool = False,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("in_channels: expected at least one input level")
        _check_norm(norm, out_channels, num_groups)
        num_outs = len(in_channels) if num_outs is None else int(num_outs)
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs: expected >= {len(in_channels)}, got {num_outs}")
        self.in_channels = in_channels
        self.out_channels = int(out_channels)
        self.num_outs = num_outs
        self.convs = nn.ModuleList(
            _ConvNorm(c, out_channels, kernel_size, 1, norm, num_groups, activation)
            for c in in_channels
        )
        self.extra_convs = nn.ModuleList(
            _ConvNorm(
                in_channels[-1] if i == len(in_channels) else out_channels,
                out_channels,
                3,
                2,
                norm,
                num_groups,
                activation,
            )
            for i in range(len(in_channels), num_outs)
        )
        _xavier_convs(self)

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``inputs``: one map per ``in_channels`` -> ``num_outs`` maps, finest first."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f"inputs: expected {len(self.in_channels)} feature maps, got {len(inputs)}"
            )
        outs = [conv(x) for conv, x in zip(self.convs, inputs, strict=True)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return tuple(outs)
