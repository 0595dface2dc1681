"""FSAF: anchor-free branch on one square "anchor" per location, centre-region targets and online feature selection.

mmdetection 3.x ``FSAFHead`` (``fsaf_r50_fpn_1x``): a RetinaNet head with one anchor per
location (side = stride, centred on ``(col, row) * stride``), boxes regressed as top /
bottom / left / right distances normalised by 4 x the anchor size (``TBLRBBoxCoder``) and
passed through ReLU, IoU loss on decoded boxes, focal loss. Targets come from
``CenterRegionAssigner(pos_scale=0.2, neg_scale=0.2, min_pos_iof=0.01)`` on *every* level;
then each GT keeps only the level where its mean (focal + IoU) loss over its positives is
smallest (online feature selection): on the other levels its positives stop regressing and
their classification entry for the GT's class is ignored. The paper's ignoring region is
0.5; mmdetection's configuration (followed here) uses 0.2 for both scales.

``loss_and_targets`` returns, next to the losses, an ``FSAFTargets``: the assignment with the
feature selection applied (the weights the loss used and the positives it counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from labkit.anchors import AnchorGenerator
from labkit.assigners.center_region import CenterRegionAssigner
from labkit.heads.dense_head import TestConfig, level_major_to_images
from labkit.heads.retina import RetinaNetHead
from labkit.losses import FocalLoss, IoULoss


class TBLRBBoxCoder:
    """(top, bottom, left, right) distances from the anchor centre, divided by ``normalizer`` x anchor h/w.

    mmdetection's ``TBLRBBoxCoder(normalizer=4.0)`` with ``normalize_by_wh=True``.
    """

    def __init__(self, normalizer: float = 4.0, clip_border: bool = True) -> None:
        self.normalizer = normalizer
        self.clip_border = clip_border

    def encode(self, priors: Tensor, gt_bboxes: Tensor) -> Tensor:
        """``priors, gt_bboxes: Tensor[N, 4]`` -> ``Tensor[N, 4]`` (t, b, l, r) normalised."""
        cx = (priors[:, 0] + priors[:, 2]) / 2
        cy = (priors[:, 1] + priors[:, 3]) / 2
        w = priors[:, 2] - priors[:, 0]
        h = priors[:, 3] - priors[:, 1]
        top = (cy - gt_bboxes[:, 1]) / h
        bottom = (gt_bboxes[:, 3] - cy) / h
        left = (cx - gt_bboxes[:, 0]) / w
        right = (gt_bboxes[:, 2] - cx) / w
        return torch.stack((top, bottom, left, right), -1) / self.normalizer

    def decode(self, priors: Tensor, pred: Tensor, max_shape: tuple | None = None) -> Tensor:
        """``priors: Tensor[N, 4]``, ``pred: Tensor[N, 4]`` (t, b, l, r) -> boxes ``Tensor[N, 4]``,
        clipped to ``[0, w] x [0, h]`` when ``max_shape=(h, w)`` is given."""
        d = pred * self.normalizer
        cx = (priors[:, 0] + priors[:, 2]) / 2
        cy = (priors[:, 1] + priors[:, 3]) / 2
        w = priors[:, 2] - priors[:, 0]
        h = priors[:, 3] - priors[:, 1]
        x1, y1 = cx - d[:, 2] * w, cy - d[:, 0] * h
        x2, y2 = cx + d[:, 3] * w, cy + d[:, 1] * h
        if self.clip_border and max_shape is not None:
            x1, x2 = x1.clamp(min=0, max=max_shape[1]), x2.clamp(min=0, max=max_shape[1])
            y1, y2 = y1.clamp(min=0, max=max_shape[0]), y2.clamp(min=0, max=max_shape[0])
        return torch.stack((x1, y1, x2, y2), -1)


@dataclass
class FSAFTargets:
    """The targets an ``FSAFHead`` loss used, after online feature selection (``B`` images,
    ``N`` anchors of all levels, ``C`` classes).

    Attributes:
        anchors: Tensor[N, 4] one square anchor per location, levels concatenated.
        num_level_priors: anchors per level.
        labels: LongTensor[B, N] ``CenterRegionAssigner`` labels on every level
            (``num_classes`` = background), as passed to the focal loss.
        label_weights: Tensor[B, N, C] element-wise classification weights the loss applied:
            0 for ignored anchors, shadowed (anchor, class) pairs, and the (anchor, GT class)
            entry of a positive whose GT was selected on another level.
        bbox_targets: Tensor[B, N, 4] GT boxes (xyxy) of the assigned anchors, zeros elsewhere.
        bbox_weights: Tensor[B, N, 4] 1 on the positives that count (``pos_inds``).
        gt_inds: LongTensor[B, N] 0-based per-image GT index from the assigner (-1 none),
            before the feature selection.
        pos_inds: per image LongTensor[P_i] (ascending) anchors assigned to a GT on the level
            selected for that GT: the positives the loss counts.
        pos_gt_inds: per image LongTensor[P_i] their 0-based GT index.
        selected_levels: per image LongTensor[K_i] the level chosen for each GT.
        num_pos: per image ``P_i``.
        avg_factor: ``sum_i P_i``, or with no positive the summed ``max(num_neg, 1)``: both
            losses are divided by it.
    """

    anchors: Tensor
    num_level_priors: list[int]
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    gt_inds: Tensor
    pos_inds: list[Tensor]
    pos_gt_inds: list[Tensor]
    selected_levels: list[Tensor]
    num_pos: list[int]
    avg_factor: float


def fsaf_anchor_generator(strides: tuple[int, ...] = (8, 16, 32, 64, 128)) -> AnchorGenerator:
    """One square anchor of side ``stride`` per location (octave_base_scale 1, ratio 1)."""
    return AnchorGenerator(
        strides=list(strides), ratios=[1.0], octave_base_scale=1, scales_per_octave=1
    )


def select_levels(loss_table: Tensor) -> Tensor:
    """Online feature selection: the level of smallest loss for every GT.

    Args:
        loss_table: Tensor[L, K], mean (focal + IoU) loss of GT k's positives on level l
            (1e6 where the GT has no positive on that level).

    Returns:
        LongTensor[K] chosen level per GT (the first level on ties).
    """
    if loss_table.numel() == 0:
        return loss_table.new_empty((loss_table.shape[1],), dtype=torch.long)
    return loss_table.min(dim=0).indices


def level_loss_table(
    cls_losses: list[Tensor], reg_losses: list[Tensor], assigned_gt_inds: list[Tensor], num_gts: int
) -> Tensor:
    """Mean loss of every GT's positives on every level.

    Args:
        cls_losses: per level Tensor[M_l, C] element-wise (weighted) focal loss.
        reg_losses: per level Tensor[M_l] (weighted) IoU loss.
        assigned_gt_inds: per level LongTensor[M_l], batch-wide 0-based GT index, -1 if none.
        num_gts: K, GTs in the batch.

    Returns:
        Tensor[L, K]; 1e6 where a GT has no positive on a level (never chosen then).
    """
    rows = []
    for cls_loss, reg_loss, gt_inds in zip(cls_losses, reg_losses, assigned_gt_inds, strict=True):
        loss = cls_loss.sum(dim=-1) + reg_loss
        pos = gt_inds >= 0
        sums = loss.new_zeros(num_gts).index_add_(0, gt_inds[pos], loss[pos])
        counts = loss.new_zeros(num_gts).index_add_(0, gt_inds[pos], torch.ones_like(loss[pos]))
        rows.append(
            torch.where(counts > 0, sums / counts.clamp(min=1), loss.new_full((num_gts,), 1e6))
        )
    return torch.stack(rows) if rows else torch.zeros(0, num_gts)


class FSAFHead(RetinaNetHead):
    """FSAF anchor-free head with online feature selection (see the module docstring).

    Args:
        num_classes, in_channels, feat_channels, stacked_convs: as ``RetinaNetHead``.
        strides: anchor strides per level.
        assigner: defaults to ``CenterRegionAssigner(0.2, 0.2, min_pos_iof=0.01)``.
        test_cfg: RetinaNet's (nms_pre 1000, score_thr 0.05, NMS 0.5, 100, min_bbox_size 0).

    Targets: ``loss_and_targets`` returns an ``FSAFTargets`` (``labels [B, N]``,
    ``label_weights [B, N, C]``, ``bbox_targets``/``bbox_weights [B, N, 4]``, per image
    ``pos_inds [P_i]`` on the selected levels, ``selected_levels [K_i]``, ``avg_factor``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        *,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        assigner: CenterRegionAssigner | None = None,
        test_cfg: TestConfig | dict | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            feat_channels,
            stacked_convs,
            anchor_generator=fsaf_anchor_generator(tuple(strides)),
            bbox_coder=TBLRBBoxCoder(normalizer=4.0),
            assigner=assigner
            or CenterRegionAssigner(pos_scale=0.2, neg_scale=0.2, min_pos_iof=0.01),
            loss_cls=FocalLoss(gamma=2.0, alpha=0.25, reduction="none"),
            loss_bbox=IoULoss(eps=1e-6, reduction="none"),
            test_cfg=test_cfg,
            reg_decoded_bbox=True,
            allowed_border=-1,
        )
        # A positive regression bias keeps the first decoded boxes away from zero area.
        nn.init.constant_(self.retina_reg.bias, 0.25)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(cls_score [B, C, H, W], relu(bbox_pred) [B, 4, H, W])`` (TBLR needs >= 0)."""
        cls_scores, bbox_preds = super().forward(feats)
        return cls_scores, [torch.relu(b) for b in bbox_preds]

    def _fsaf_targets_single(
        self,
        anchors: Tensor,
        valid: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor,
        gt_ignore: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """One image over all anchors: labels [N], label_weights [N, C] (shadowed pairs 0),
        bbox targets [N, 4] (GT boxes), bbox weights [N, 4], 0-based GT index [N] (-1 none),
        and ``max(num_neg, 1)``."""
        num = anchors.shape[0]
        inside = valid  # allowed_border = -1: every valid anchor takes part
        result = self.assigner.assign(anchors[inside], gt_bboxes, gt_labels, gt_ignore)
        n = int(inside.sum())
        labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = anchors.new_zeros((n, self.cls_out_channels))
        bbox_targets = anchors.new_zeros((n, 4))
        bbox_weights = anchors.new_zeros((n, 4))
        gt_inds = anchors.new_full((n,), -1, dtype=torch.long)
        pos = (result.gt_inds > 0).nonzero().flatten()
        neg = (result.gt_inds == 0).nonzero().flatten()
        if len(pos) > 0:
            assigned = result.gt_inds[pos] - 1
            bbox_targets[pos] = gt_bboxes[assigned]
            bbox_weights[pos] = 1.0
            gt_inds[pos] = assigned
            labels[pos] = gt_labels[assigned]
            label_weights[pos] = 1.0
        label_weights[neg] = 1.0
        shadowed = result.shadowed_labels
        if shadowed.numel():
            label_weights[shadowed[:, 0], shadowed[:, 1]] = 0

        def full(x: Tensor, fill: float) -> Tensor:
            out = x.new_full((num,) + tuple(x.shape[1:]), fill)
            out[inside] = x
            return out

        return (
            full(labels, self.num_classes),
            full(label_weights, 0),
            full(bbox_targets, 0),
            full(bbox_weights, 0),
            full(gt_inds, -1),
            max(len(neg), 1),
        )

    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], FSAFTargets]:
        """``({"loss_cls", "loss_bbox"}, FSAFTargets)`` after online feature selection.

        Per level: element-wise focal loss [B*N_l, C] and IoU loss [B*N_l] on decoded boxes
        (predictions clamped to >= 1e-4 first); the per-GT level table and its argmin;
        positives of a GT on other levels lose their box weight and the weight of their
        (anchor, GT class) entry. Sums are divided by the number of remaining positives (or,
        with none, by the summed ``max(num_neg, 1)`` of the images).
        """
        bbox_preds = [b.clamp(min=1e-4) for b in bbox_preds]
        num_imgs = len(batch_img_metas)
        sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        device = cls_scores[0].device
        mlvl_anchors, valid_flags = self.get_anchors(sizes, batch_img_metas, device)
        flat_anchors = torch.cat(mlvl_anchors)
        num_level = [a.shape[0] for a in mlvl_anchors]
        ignore = batch_gt_bboxes_ignore or [None] * num_imgs
        per_img = [
            self._fsaf_targets_single(
                flat_anchors, valid_flags[i], batch_gt_bboxes[i], batch_gt_labels[i], ignore[i]
            )
            for i in range(num_imgs)
        ]
        # Batch-wide GT indices: image i's GTs come after those of images 0..i-1.
        offsets = [0]
        for b in batch_gt_bboxes[:-1]:
            offsets.append(offsets[-1] + b.shape[0])
        num_gts = offsets[-1] + batch_gt_bboxes[-1].shape[0]

        def levels(k: int, shift: bool = False) -> list[Tensor]:
            per_image = []
            for i, t in enumerate(per_img):
                x = t[k]
                if shift:
                    x = torch.where(x >= 0, x + offsets[i], x)
                per_image.append(x.split(num_level))
            # level l: [B * N_l, ...], image-major like the flattened predictions
            return [torch.cat([img[lvl] for img in per_image]) for lvl in range(len(num_level))]

        labels, label_weights = levels(0), levels(1)
        bbox_targets, bbox_weights, gt_inds = levels(2), levels(3), levels(4, shift=True)
        cls_losses, reg_losses = [], []
        for lvl, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds, strict=True)):
            cls_flat = cls_score.permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels)
            pred = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
            anchors = mlvl_anchors[lvl].repeat(num_imgs, 1)
            cls_losses.append(self.loss_cls(cls_flat, labels[lvl], label_weights[lvl]))
            reg_losses.append(
                self.loss_bbox(
                    self.bbox_coder.decode(anchors, pred), bbox_targets[lvl], bbox_weights[lvl]
                )
            )
        with torch.no_grad():
            table = level_loss_table(cls_losses, reg_losses, gt_inds, num_gts)
            best_level = select_levels(table)

        loss_cls, loss_bbox, num_pos = 0.0, 0.0, 0
        cls_weights, loc_weights = [], []
        for lvl in range(len(num_level)):
            cls_weight = torch.ones_like(cls_losses[lvl])
            loc_weight = torch.ones_like(reg_losses[lvl])
            pos = (gt_inds[lvl] >= 0).nonzero().flatten()
            other = pos[best_level[gt_inds[lvl][pos]] != lvl]
            loc_weight[other] = 0
            cls_weight[other, labels[lvl][other]] = 0
            num_pos += len(pos) - len(other)
            loss_cls = loss_cls + (cls_losses[lvl] * cls_weight).sum()
            loss_bbox = loss_bbox + (reg_losses[lvl] * loc_weight).sum()
            cls_weights.append(cls_weight.detach())
            loc_weights.append(loc_weight.detach())
        avg_factor = float(num_pos) if num_pos > 0 else float(sum(t[5] for t in per_img))
        losses = {"loss_cls": loss_cls / avg_factor, "loss_bbox": loss_bbox / avg_factor}

        # The targets as the loss applied them: [B, N, ...] with the selection folded in.
        cls_weight_b = level_major_to_images(cls_weights, num_imgs)
        loc_weight_b = level_major_to_images(loc_weights, num_imgs)
        gt_inds_b = torch.stack([t[4] for t in per_img])
        kept = (gt_inds_b >= 0) & (loc_weight_b > 0)
        pos_inds = [k.nonzero().view(-1) for k in kept]
        targets = FSAFTargets(
            anchors=flat_anchors,
            num_level_priors=num_level,
            labels=torch.stack([t[0] for t in per_img]),
            label_weights=torch.stack([t[1] for t in per_img]) * cls_weight_b,
            bbox_targets=torch.stack([t[2] for t in per_img]),
            bbox_weights=torch.stack([t[3] for t in per_img]) * loc_weight_b[..., None],
            gt_inds=gt_inds_b,
            pos_inds=pos_inds,
            pos_gt_inds=[gt_inds_b[i, p] for i, p in enumerate(pos_inds)],
            selected_levels=[
                best_level[o : o + b.shape[0]]
                for o, b in zip(offsets, batch_gt_bboxes, strict=True)
            ],
            num_pos=[int(p.numel()) for p in pos_inds],
            avg_factor=avg_factor,
        )
        return losses, targets
