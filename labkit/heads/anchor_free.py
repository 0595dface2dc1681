"""Shared base of the anchor-free heads (FCOS, FoveaBox, RepPoints): conv towers, init and point priors.

mmdetection's ``AnchorFreeHead``: a classification tower and a regression tower of
``stacked_convs`` 3x3 conv (+ GroupNorm) + ReLU layers, then a 3x3 ``conv_cls`` (C outputs)
and a 3x3 ``conv_reg`` (4 outputs) per location. Every conv starts from N(0, 0.01) with zero
bias, except ``conv_cls`` whose bias makes the initial foreground probability 0.01 (so the
focal loss is not swamped by the easy negatives at step one). Priors are points at
``(col + 0.5, row + 0.5) * stride`` (mmdetection 3.x ``MlvlPointGenerator`` offset 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from labkit.anchors import PointGenerator
from labkit.boxes import DistancePointBBoxCoder
from labkit.heads.dense_head import DenseHead, TestConfig
from labkit.nn.init import bias_init_with_prob


def conv_norm_relu(
    c_in: int, c_out: int, norm: str | None, bias: bool | None = None
) -> nn.Sequential:
    """3x3 conv, optional GroupNorm (32 groups, fewer when channels are few), ReLU.

    ``bias=None`` is mmdetection's "auto": a bias only when there is no norm layer.
    """
    if norm not in (None, "gn"):
        raise ValueError(f"norm: expected None or 'gn', got {norm!r}")
    bias = norm is None if bias is None else bias
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)]
    if norm == "gn":
        layers.append(nn.GroupNorm(min(32, c_out), c_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_head_convs(head: nn.Module, cls_conv: nn.Conv2d, prior_prob: float = 0.01) -> None:
    """N(0, 0.01) weights and zero bias on every conv of ``head``; ``cls_conv``'s bias from ``prior_prob``."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.constant_(cls_conv.bias, bias_init_with_prob(prior_prob))


class AnchorFreeHead(DenseHead):
    """Two towers and per-location classification/regression convs on point priors.

    Args:
        num_classes: foreground classes C.
        in_channels: channels of every input level.
        feat_channels: tower width.
        stacked_convs: conv layers per tower.
        strides: one stride per level.
        norm: ``"gn"`` or ``None`` (tower norm).
        conv_bias: tower conv bias (``None`` = auto: only without norm).
        point_offset: prior position inside a cell (0.5 centre; RepPoints uses 0).
        test_cfg: inference settings.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        norm: str | None = None,
        conv_bias: bool | None = None,
        point_offset: float = 0.5,
        test_cfg: TestConfig | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            PointGenerator(strides, offset=point_offset),
            DistancePointBBoxCoder(),
            test_cfg,
        )
        if in_channels < 1 or feat_channels < 1 or stacked_convs < 0:
            raise ValueError(
                f"in_channels/feat_channels/stacked_convs: expected positive sizes, got "
                f"{in_channels}, {feat_channels}, {stacked_convs}"
            )
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        self.strides = list(strides)
        self.norm = norm
        self.conv_bias = conv_bias

    def _tower(self) -> nn.ModuleList:
        return nn.ModuleList(
            conv_norm_relu(
                self.in_channels if i == 0 else self.feat_channels,
                self.feat_channels,
                self.norm,
                self.conv_bias,
            )
            for i in range(self.stacked_convs)
        )

    def _init_towers(self) -> None:
        """Build ``cls_convs``, ``reg_convs``, ``conv_cls`` (3x3, C) and ``conv_reg`` (3x3, 4)."""
        self.cls_convs = self._tower()
        self.reg_convs = self._tower()
        self.conv_cls = nn.Conv2d(self.feat_channels, self.cls_out_channels, 3, padding=1)
        self.conv_reg = nn.Conv2d(self.feat_channels, 4, 3, padding=1)

    def forward_towers(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One level ``x: Tensor[B, C_in, H, W]`` -> ``(cls_score [B, C, H, W], bbox_pred [B, 4, H, W],
        cls_feat, reg_feat)`` (the tower outputs, for extra branches such as centerness)."""
        cls_feat, reg_feat = x, x
        for layer in self.cls_convs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_convs:
            reg_feat = layer(reg_feat)
        return self.conv_cls(cls_feat), self.conv_reg(reg_feat), cls_feat, reg_feat

    def points(self, cls_scores: list[Tensor], with_stride: bool = False) -> list[Tensor]:
        """Point priors ``Tensor[H_l * W_l, 2]`` per level for the sizes of ``cls_scores``."""
        sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        return self.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device, with_stride=with_stride
        )
