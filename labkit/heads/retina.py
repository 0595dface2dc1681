"""RetinaNet: the anchor head with two 3x3-conv towers, focal loss and L1 on deltas."""

from __future__ import annotations

from torch import Tensor, nn

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.anchor_head import AnchorHead
from labkit.heads.dense_head import TestConfig, make_test_cfg
from labkit.losses import FocalLoss, L1Loss
from labkit.nn.init import bias_init_with_prob, normal_init


def retina_anchor_generator() -> AnchorGenerator:
    """RetinaNet's anchors: 3 scales x 3 ratios per location, 32-813 px on strides 8-128."""
    return AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )


class RetinaNetHead(AnchorHead):
    """RetinaNet head (Lin et al. 2017): per level, a classification and a box tower.

    Each tower is ``stacked_convs`` x (3x3 conv + ReLU); ``retina_cls`` predicts ``A * C``
    logits and ``retina_reg`` ``A * 4`` deltas per location. Convs start from N(0, 0.01)
    and the classifier bias from ``-log((1 - 0.01) / 0.01)`` so every anchor starts at
    p = 0.01. Defaults are mmdetection's ``retinanet_r50_fpn`` config: MaxIoU (pos 0.5,
    neg 0.4, min_pos_iou 0), focal loss (gamma 2, alpha 0.25), L1 on deltas with stds 1,
    test: nms_pre 1000, score_thr 0.05, NMS 0.5, 100 per image.

    Args:
        num_classes: foreground classes.
        in_channels: channels of every pyramid level.
        feat_channels: tower width. stacked_convs: tower depth.
        anchor_generator, bbox_coder, assigner, loss_cls, loss_bbox, test_cfg: override a default.
        **kwargs: ``sampler``, ``allowed_border``, ``pos_weight`` of ``AnchorHead``.

    Shapes: ``forward(feats)`` with ``feats[l]: Tensor[B, in_channels, H_l, W_l]`` returns
    ``(cls_scores, bbox_preds)`` with ``cls_scores[l]: Tensor[B, A*C, H_l, W_l]`` and
    ``bbox_preds[l]: Tensor[B, A*4, H_l, W_l]``.

    Targets: ``loss_and_targets`` returns ``AnchorHead``'s ``AnchorTargets`` over all
    ``N = sum_l H_l*W_l*A`` anchors (``labels [B, N]``, ``bbox_targets [B, N, 4]`` encoded
    deltas, ``pos_inds`` per image, ``avg_factor`` = sum over images of ``max(num_pos, 1)``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        *,
        anchor_generator: AnchorGenerator | None = None,
        bbox_coder: object | None = None,
        assigner: object | None = None,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
        test_cfg: TestConfig | dict | None = None,
        **kwargs: object,
    ) -> None:
        from labkit.assigners import MaxIoUAssigner

        super().__init__(
            num_classes,
            anchor_generator=anchor_generator or retina_anchor_generator(),
            bbox_coder=bbox_coder or DeltaXYWHBBoxCoder((0.0,) * 4, (1.0,) * 4),
            assigner=assigner or MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0, ignore_iof_thr=-1),
            loss_cls=loss_cls or FocalLoss(gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=loss_bbox or L1Loss(loss_weight=1.0),
            test_cfg=make_test_cfg(test_cfg, iou_threshold=0.5),
            **kwargs,
        )
        self.in_channels = in_channels
        self.feat_channels = feat_channels

        def tower() -> nn.Sequential:
            layers = []
            for i in range(stacked_convs):
                layers += [
                    nn.Conv2d(
                        in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1
                    ),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers)

        self.cls_convs = tower()
        self.reg_convs = tower()
        last = feat_channels if stacked_convs > 0 else in_channels
        self.retina_cls = nn.Conv2d(
            last, self.num_base_priors * self.cls_out_channels, 3, padding=1
        )
        self.retina_reg = nn.Conv2d(last, self.num_base_priors * 4, 3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.01) convs with zero bias; classifier bias at prior probability 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                normal_init(m, std=0.01)
        normal_init(self.retina_cls, std=0.01, bias=bias_init_with_prob(0.01))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(cls_score[B, A*C, H, W], bbox_pred[B, A*4, H, W])``, as two lists."""
        cls_scores, bbox_preds = [], []
        for x in feats:
            cls_scores.append(self.retina_cls(self.cls_convs(x)))
            bbox_preds.append(self.retina_reg(self.reg_convs(x)))
        return cls_scores, bbox_preds
