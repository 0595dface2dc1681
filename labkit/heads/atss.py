"""ATSS (Zhang et al. 2020): GN towers, centerness branch, per-level Scale, adaptive assignment.

Training, as mmdetection's ``ATSSHead``:

* targets come from ``ATSSAssigner(topk=9)`` over the inside anchors (it needs the number
  of anchors per level), regression targets are the GT boxes themselves (``reg_decoded_bbox``);
* ``loss_cls``: focal loss over all anchors / ``avg_factor`` (positives, mean over GPUs);
* ``loss_bbox``: GIoU of the decoded positives, each weighted by its centerness target and
  divided by the sum of the centerness targets (mean over GPUs, at least 1);
* ``loss_centerness``: sigmoid BCE of the centerness logit against the centerness target
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of the anchor centre in its GT,
  divided by ``avg_factor``.

``loss_and_targets`` also returns the ``AnchorTargets`` of that assignment (``targets_for``):
``anchors [N, 4]``, ``labels [B, N]``, ``bbox_targets [B, N, 4]`` (GT boxes), per image
``pos_inds [P_i]`` into ``N``, ``avg_factor`` (positives of the batch, ``max(P_i, 1)`` per image).

At inference the class probabilities are multiplied by ``sigmoid(centerness)`` after the
per-level top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.anchor_head import AnchorHead, AnchorTargets
from labkit.heads.dense_head import TestConfig, flatten_levels, make_test_cfg
from labkit.losses import CrossEntropyLoss, FocalLoss, GIoULoss
from labkit.nn.distributed import reduce_mean
from labkit.nn.init import bias_init_with_prob, normal_init
from labkit.nn.scale import Scale


def atss_anchor_generator() -> AnchorGenerator:
    """ATSS's anchors: one square anchor per location, 8 x stride (64-1024 px on strides 8-128)."""
    return AnchorGenerator(
        strides=[8, 16, 32, 64, 128], ratios=[1.0], octave_base_scale=8, scales_per_octave=1
    )


def centerness_target(anchors: Tensor, gt_bboxes: Tensor) -> Tensor:
    """Centerness of each anchor centre inside its GT box: ``Tensor[P]`` in [0, 1].

    ``anchors, gt_bboxes: Tensor[P, 4]`` (aligned). Only meaningful for positives, whose
    centres lie inside their GT (elsewhere the ratios go negative and the sqrt gives NaN).
    """
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    left_right = torch.stack([cx - gt_bboxes[:, 0], gt_bboxes[:, 2] - cx], dim=1)
    top_bottom = torch.stack([cy - gt_bboxes[:, 1], gt_bboxes[:, 3] - cy], dim=1)
    return torch.sqrt(
        (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
        * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0])
    )


def _gn_tower(
    in_channels: int, feat_channels: int, stacked_convs: int, groups: int
) -> nn.Sequential:
    layers = []
    for i in range(stacked_convs):
        c_in = in_channels if i == 0 else feat_channels
        # a conv followed by GroupNorm needs no bias (mmdetection's ConvModule bias="auto")
        layers += [
            nn.Conv2d(c_in, feat_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, feat_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class ATSSHead(AnchorHead):
    """ATSS head: GN conv towers, classifier, box deltas times a learnable per-level scale, centerness.

    Defaults follow mmdetection's ``atss_r50_fpn_1x``: one 8x-stride anchor per location,
    ``DeltaXYWHBBoxCoder`` stds (0.1, 0.1, 0.2, 0.2), ``ATSSAssigner(topk=9)``, focal loss,
    ``GIoULoss(loss_weight=2.0)``, centerness BCE (weight 1.0); test: nms_pre 1000,
    score_thr 0.05, NMS 0.6, 100 per image.

    Args:
        num_classes, in_channels, feat_channels, stacked_convs: as ``RetinaNetHead``.
        num_groups: GroupNorm groups in the towers (32 as mmdetection; must divide feat_channels).
        anchor_generator, bbox_coder, assigner, loss_cls, loss_bbox, loss_centerness, test_cfg:
            override a default.

    Shapes: ``forward(feats)`` returns ``(cls_scores, bbox_preds, centernesses)``, per level
    ``[B, A*C, H, W]``, ``[B, A*4, H, W]``, ``[B, A, H, W]``.

    Targets: ``loss_and_targets`` returns the ``AnchorTargets`` the loss used (``targets_for``'s
    result): ``anchors [N, 4]``, ``labels [B, N]`` (``C`` = background), ``label_weights
    [B, N]``, ``bbox_targets [B, N, 4]`` (the assigned GT boxes, ``reg_decoded_bbox``),
    ``pos_inds`` (per image LongTensor[P_i] into ``N``), ``pos_gt_inds``, ``avg_factor``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        *,
        num_groups: int = 32,
        anchor_generator: AnchorGenerator | None = None,
        bbox_coder: object | None = None,
        assigner: object | None = None,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
        loss_centerness: nn.Module | None = None,
        test_cfg: TestConfig | dict | None = None,
        **kwargs: object,
    ) -> None:
        from labkit.assigners import ATSSAssigner

        if feat_channels % num_groups:
            raise ValueError(
                f"num_groups: must divide feat_channels={feat_channels}, got {num_groups}"
            )
        kwargs.setdefault("reg_decoded_bbox", True)
        super().__init__(
            num_classes,
            anchor_generator=anchor_generator or atss_anchor_generator(),
            bbox_coder=bbox_coder or DeltaXYWHBBoxCoder((0.0,) * 4, (0.1, 0.1, 0.2, 0.2)),
            assigner=assigner or ATSSAssigner(topk=9),
            loss_cls=loss_cls or FocalLoss(gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=loss_bbox or GIoULoss(loss_weight=2.0),
            test_cfg=make_test_cfg(test_cfg, iou_threshold=0.6),
            **kwargs,
        )
        self.loss_centerness = loss_centerness or CrossEntropyLoss(
            use_sigmoid=True, loss_weight=1.0
        )
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.cls_convs = _gn_tower(in_channels, feat_channels, stacked_convs, num_groups)
        self.reg_convs = _gn_tower(in_channels, feat_channels, stacked_convs, num_groups)
        last = feat_channels if stacked_convs > 0 else in_channels
        a = self.num_base_priors
        self.atss_cls = nn.Conv2d(last, a * self.cls_out_channels, 3, padding=1)
        self.atss_reg = nn.Conv2d(last, a * 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(last, a, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(self.prior_generator.num_levels))
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.01) convs, classifier bias at prior probability 0.01 (GroupNorm: 1 and 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                normal_init(m, std=0.01)
        normal_init(self.atss_cls, std=0.01, bias=bias_init_with_prob(0.01))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level ``(cls_score, bbox_pred, centerness)``; the box deltas go through the level's Scale."""
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale in zip(feats, self.scales, strict=True):
            cls_feat = self.cls_convs(x)
            reg_feat = self.reg_convs(x)
            cls_scores.append(self.atss_cls(cls_feat))
            # ATSS keeps raw deltas (no exp); the scale just lets each level adapt its range.
            bbox_preds.append(scale(self.atss_reg(reg_feat)).float())
            centernesses.append(self.atss_centerness(reg_feat))
        return cls_scores, bbox_preds, centernesses

    def assign_priors(
        self,
        anchors: Tensor,
        num_level_anchors: list[int],
        gt_bboxes: Tensor,
        gt_labels: Tensor | None,
        gt_bboxes_ignore: Tensor | None,
    ) -> object:
        """ATSS picks its candidates level by level, so it gets the inside anchors per level."""
        return self.assigner.assign(
            anchors,
            num_level_anchors,
            gt_bboxes,
            gt_labels=gt_labels,
            gt_bboxes_ignore=gt_bboxes_ignore,
        )

    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        centernesses: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], AnchorTargets]:
        """``({"loss_cls", "loss_bbox", "loss_centerness"}, targets)`` (see the module docstring);
        ``targets`` is the ``AnchorTargets`` of ``targets_for``, positives ``targets.pos_inds``."""
        t = self.targets_for(
            cls_scores, batch_gt_bboxes, batch_gt_labels, batch_img_metas, batch_gt_bboxes_ignore
        )
        device = cls_scores[0].device
        avg_factor = reduce_mean(
            torch.tensor(t.avg_factor, dtype=torch.float, device=device)
        ).item()

        cls_score = flatten_levels(cls_scores, self.cls_out_channels).reshape(
            -1, self.cls_out_channels
        )
        bbox_pred = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        centerness = flatten_levels(centernesses, 1).reshape(-1)
        labels = t.labels.reshape(-1)
        bbox_targets = t.bbox_targets.reshape(-1, 4)
        anchors = t.anchors.repeat(len(batch_img_metas), 1)

        loss_cls = self.loss_cls(
            cls_score, labels, t.label_weights.reshape(-1), avg_factor=avg_factor
        )
        pos = ((labels >= 0) & (labels < self.num_classes)).nonzero().squeeze(1)
        if len(pos) > 0:
            pos_anchors = anchors[pos]
            pos_targets = bbox_targets[pos]
            targets_centerness = centerness_target(pos_anchors, pos_targets)
            pos_decoded = self.bbox_coder.decode(pos_anchors, bbox_pred[pos])
            loss_bbox = self.loss_bbox(
                pos_decoded, pos_targets, weight=targets_centerness, avg_factor=1.0
            )
            loss_centerness = self.loss_centerness(
                centerness[pos], targets_centerness, avg_factor=avg_factor
            )
            centerness_sum = targets_centerness.sum()
        else:
            loss_bbox = bbox_pred.sum() * 0
            loss_centerness = centerness.sum() * 0
            centerness_sum = bbox_targets.new_tensor(0.0)
        bbox_avg_factor = reduce_mean(centerness_sum.detach()).clamp_(min=1).item()
        losses = {
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox / bbox_avg_factor,
            "loss_centerness": loss_centerness,
        }
        return losses, t
