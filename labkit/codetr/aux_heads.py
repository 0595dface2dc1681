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

from labkit.heads.atss import ATSSHead
from labkit.heads.aux_positives import AuxPositives
from labkit.heads.dense_head import flatten_levels
from labkit.losses import CrossEntropyLoss, FocalLoss, GIoULoss

__all__ = ["ATSSAuxHead", "FasterRCNNAuxHead", "extra_level"]


def extra_level(embed_dims: int, num_groups: int = 32) -> nn.Sequential:
    """The stride-2 ``3x3 conv + GroupNorm`` that adds the coarsest level (Co-DETR's ``downsample``)."""
    return nn.Sequential(
        nn.Conv2d(embed_dims, embed_dims, kernel_size=3, stride=2, padding=1),
        nn.GroupNorm(num_groups, embed_dims),
    )


class _ATSSHeadKeepingTargets(ATSSHead):
    """An ATSSHead that remembers the targets of its last loss: Co-DETR reads the positives
    from the very assignment the loss used (Co-ATSS returns them alongside the losses)."""

    last_targets = None

    def targets_for(self, *args, **kwargs):
        """``ATSSHead.targets_for``, also kept as ``self.last_targets``."""
        self.last_targets = super().targets_for(*args, **kwargs)
        return self.last_targets


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
        self.head = _ATSSHeadKeepingTargets(
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
        losses = self.head.loss_by_feat(
            *outs,
            batch_gt_bboxes=gt_bboxes,
            batch_gt_labels=gt_labels,
            batch_img_metas=img_metas,
            batch_gt_bboxes_ignore=gt_bboxes_ignore,
        )
        t = self.head.last_targets
        self.head.last_targets = None
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
    (``labkit.heads.faster_rcnn.codetr_faster_rcnn_head``); positives are the sampled positive
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
        from labkit.heads.faster_rcnn import codetr_faster_rcnn_head

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
        return self.head.loss(feats, batch)
