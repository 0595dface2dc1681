"""Co-DETR's auxiliary heads on the encoder memory: each returns its losses and its positives.

The encoder memory is cut back into its multi-scale maps (strides 8-64) and one extra
stride-2 level (stride 128) is added by a conv; on those five maps run

* :class:`ATSSAuxHead` -- an ATSS head (1 conv per tower, ATSS assignment, focal / GIoU /
  centerness losses), whose positive anchors become positive queries;
* :class:`FasterRCNNAuxHead` -- RPN (MaxIoU 0.7/0.3, 256 random samples, NMS proposals) and
  a RoI head (multi-level RoIAlign, shared 2-FC box head, GIoU, MaxIoU 0.5, 512 random
  samples), whose positive proposals become positive queries.

Every adapter has ``forward(feats, gt_bboxes, gt_labels, img_metas) -> (losses, positives)``
with ``feats`` the five maps ``Tensor[B, C, H_l, W_l]``, ``losses`` a dict of scalars already
multiplied by the head's weights (Co-DETR: each base weight x ``lambda_2`` x number of
decoder layers), and ``positives`` an :class:`AuxPositives` (xyxy pixels, one entry per image,
each positive with its feature for the content query).
"""

from __future__ import annotations

from torch import Tensor, nn

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.codetr.positives import AuxPositives
from labkit.heads.atss import ATSSHead
from labkit.heads.dense_head import flatten_levels
from labkit.heads.faster_rcnn import FasterRCNNHead
from labkit.heads.roi_extractor import RoIExtractor
from labkit.heads.roi_head import RoITargets, Shared2FCBBoxHead, StandardRoIHead
from labkit.heads.rpn import RPNHead
from labkit.losses import CrossEntropyLoss, FocalLoss, GIoULoss, L1Loss

__all__ = [
    "ATSSAuxHead",
    "FasterRCNNAuxHead",
    "codetr_faster_rcnn_head",
    "extra_level",
    "roi_positives",
]

# CoStandardRoIHead's cap on the RoIs per image passed on as positive queries.
CODETR_MAX_PROPOSAL = 2000


def extra_level(embed_dims: int, num_groups: int = 32) -> nn.Sequential:
    """The stride-2 ``3x3 conv + GroupNorm`` that adds the coarsest level (Co-DETR's ``downsample``)."""
    return nn.Sequential(
        nn.Conv2d(embed_dims, embed_dims, kernel_size=3, stride=2, padding=1),
        nn.GroupNorm(num_groups, embed_dims),
    )


class ATSSAuxHead(nn.Module):
    """ATSS on the encoder maps, with Co-DETR's loss weights and positive coordinates.

    Args:
        num_classes: foreground classes.
        embed_dims: channels of the encoder maps (also the tower width).
        loss_scale: multiplier of every loss weight (Co-DETR: ``num_dec_layer * lambda_2``).
        stacked_convs: convs per tower (Co-DETR: 1).
        num_groups: GroupNorm groups.
    """

    name = "atss"

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        loss_scale: float = 12.0,
        stacked_convs: int = 1,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.loss_scale = loss_scale
        self.head = ATSSHead(
            num_classes,
            embed_dims,
            embed_dims,
            stacked_convs,
            num_groups=num_groups,
            loss_cls=FocalLoss(gamma=2.0, alpha=0.25, loss_weight=1.0 * loss_scale),
            loss_bbox=GIoULoss(loss_weight=2.0 * loss_scale),
            loss_centerness=CrossEntropyLoss(use_sigmoid=True, loss_weight=1.0 * loss_scale),
        )

    def forward(
        self,
        feats: list[Tensor],
        gt_bboxes: list[Tensor],
        gt_labels: list[Tensor],
        img_metas: list[dict],
        gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        """Losses ``{"loss_cls", "loss_bbox", "loss_centerness"}`` and the positive anchors.

        Each positive's feature is the encoder-map vector at its anchor's location.
        """
        outs = self.head(feats)
        # the positives come from the very assignment the loss used
        losses, t = self.head.loss_and_targets_by_feat(
            *outs,
            batch_gt_bboxes=gt_bboxes,
            batch_gt_labels=gt_labels,
            batch_img_metas=img_metas,
            batch_gt_bboxes_ignore=gt_bboxes_ignore,
        )
        num_anchors = self.head.num_base_priors
        feat_flat = flatten_levels(feats, feats[0].shape[1])  # [B, sum(HW), C]
        coords, labels, targets, pos_feats = [], [], [], []
        for i, pos in enumerate(t.pos_inds):
            coords.append(t.anchors[pos])
            labels.append(t.labels[i, pos])
            targets.append(t.bbox_targets[i, pos])
            pos_feats.append(feat_flat[i, pos // num_anchors])  # anchors innermost per location
        return losses, AuxPositives(coords, labels, targets, pos_feats)


class FasterRCNNAuxHead(nn.Module):
    """Faster R-CNN (RPN + RoI head) on the encoder maps, Co-DETR's settings
    (:func:`codetr_faster_rcnn_head`); positives are the sampled positive
    proposals (GTs added as proposals first) with their RoIAlign features averaged over 7x7.

    Args:
        num_classes: foreground classes.
        embed_dims: channels of the encoder maps.
        loss_scale: multiplier of every loss weight (Co-DETR: ``num_dec_layer * lambda_2``).
        fc_out_channels: width of the RoI head's two FC layers.
    """

    name = "faster_rcnn"

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        loss_scale: float = 12.0,
        fc_out_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.loss_scale = loss_scale
        self.head = codetr_faster_rcnn_head(
            num_classes, embed_dims, loss_scale=loss_scale, fc_out_channels=fc_out_channels
        )

    def forward(
        self,
        feats: list[Tensor],
        gt_bboxes: list[Tensor],
        gt_labels: list[Tensor],
        img_metas: list[dict],
        gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], AuxPositives]:
        """``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}`` and the RoI positives."""
        batch = {"gt_bboxes": gt_bboxes, "gt_labels": gt_labels, "img_metas": img_metas}
        if gt_bboxes_ignore is not None:
            batch["gt_bboxes_ignore"] = gt_bboxes_ignore
        losses, targets = self.head.loss_and_targets(feats, batch)
        return losses, roi_positives(targets.roi)


def roi_positives(targets: RoITargets) -> AuxPositives:
    """The RoI head's sampled positives per image, as Co-DETR's ``CoStandardRoIHead`` hands
    them on: every image keeps at most its first ``min(2000, min_j K_j)`` sampled RoIs
    (``K_j`` = RoIs sampled in image ``j``), so positives are only cut when another image
    sampled fewer RoIs than this one has positives. Each keeps its pooled feature ``[C]``."""
    results = targets.sampling_results
    counts = [res.pos_inds.numel() + res.neg_inds.numel() for res in results]
    keep = min([CODETR_MAX_PROPOSAL, *counts])
    coords, labels, boxes, feats = [], [], [], []
    start = 0
    for res, count in zip(results, counts, strict=True):
        p = min(res.pos_inds.numel(), keep)
        coords.append(res.pos_priors[:p])
        labels.append(res.pos_gt_labels[:p])
        boxes.append(res.pos_gt_bboxes[:p])
        feats.append(targets.roi_feats[start : start + p])
        start += count
    return AuxPositives(coords, labels, boxes, feats)


def codetr_faster_rcnn_head(
    num_classes: int,
    in_channels: int = 256,
    *,
    loss_scale: float = 12.0,
    fc_out_channels: int = 1024,
) -> FasterRCNNHead:
    """Co-DETR's auxiliary Faster R-CNN (co_deformable_detr_r50_1x_coco) on maps of strides 8-128.

    RPN: 9 anchors per location (octave base scale 4, 3 scales per octave, ratios 0.5/1/2) on
    strides 8-128, sigmoid CE and L1 with weight ``loss_scale``, training proposals nms_pre
    4000 / NMS 0.7 / 1000. RoI head: RoIAlign on strides 8-64 with ``finest_scale=112``,
    class-specific regression with ``reg_decoded_bbox`` and stds (0.1, 0.1, 0.2, 0.2), CE with
    weight ``loss_scale`` and GIoU with ``10 * loss_scale``; test score_thr 0, NMS 0.5, 100.
    ``loss_scale`` is Co-DETR's ``num_dec_layer * lambda_2`` (6 x 2 = 12).
    """
    anchors = AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )
    rpn = RPNHead(
        in_channels,
        in_channels,
        anchor_generator=anchors,
        loss_cls=CrossEntropyLoss(use_sigmoid=True, loss_weight=1.0 * loss_scale),
        loss_bbox=L1Loss(loss_weight=1.0 * loss_scale),
        train_proposal_cfg={"nms_pre": 4000, "max_per_img": 1000, "iou_threshold": 0.7},
    )
    bbox_head = Shared2FCBBoxHead(
        num_classes,
        in_channels,
        7,
        fc_out_channels,
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        bbox_coder=DeltaXYWHBBoxCoder((0.0,) * 4, (0.1, 0.1, 0.2, 0.2)),
        loss_cls=CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0 * loss_scale),
        loss_bbox=GIoULoss(loss_weight=10.0 * loss_scale),
    )
    roi = StandardRoIHead(
        RoIExtractor([8, 16, 32, 64], output_size=7, sampling_ratio=0, finest_scale=112),
        bbox_head,
        test_cfg={"score_thr": 0.0, "iou_threshold": 0.5, "max_per_img": 100},
    )
    return FasterRCNNHead(rpn, roi)
