"""FCOS: per-point targets (regress ranges, center sampling, smallest-area ambiguity), centerness and head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from labkit._validation import check_boxes, check_labels, check_tensor
from labkit.heads.anchor_free import AnchorFreeHead, init_head_convs
from labkit.heads.dense_head import TestConfig, level_major_to_images
from labkit.losses import CrossEntropyLoss, FocalLoss, GIoULoss
from labkit.nn.distributed import reduce_mean
from labkit.nn.scale import Scale

# mmdetection's "infinite" upper bound of the last regress range.
INF = 1e8
FCOS_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def fcos_targets_single(
    points: Tensor,
    gt_bboxes: Tensor,
    gt_labels: Tensor,
    regress_ranges: Tensor,
    point_strides: Tensor,
    num_classes: int,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
    return_gt_inds: bool = False,
) -> tuple[Tensor, ...]:
    """FCOS targets of one image for points of all levels at once (no loop over GTs).

    A point is a candidate for a GT when it lies strictly inside the GT (or, with center
    sampling, strictly inside the GT's centre box of half-size ``stride * radius`` clipped to
    the GT) and the largest of its four distances lies in its level's regress range (both
    ends inclusive). A point claimed by several GTs takes the one of smallest area.

    Args:
        points: Tensor[N, 2] (x, y) of every point, levels concatenated.
        gt_bboxes: Tensor[K, 4] xyxy.
        gt_labels: LongTensor[K] in 0..num_classes-1.
        regress_ranges: Tensor[N, 2] (low, high) of each point's level.
        point_strides: Tensor[N] stride of each point's level (only used by center sampling).
        num_classes: C; background points get label C.
        center_sampling: restrict positives to the centre region.
        center_sample_radius: centre region half-size in units of the level's stride.
        return_gt_inds: also return the 0-based GT index of every point (-1 background).

    Returns:
        labels: LongTensor[N] (C = background), bbox_targets: Tensor[N, 4] (l, t, r, b) in
        pixels of the GT each point was given (zeros when there is no GT)
        [, gt_inds: LongTensor[N]].
    """
    num_points, num_gts = points.size(0), gt_bboxes.size(0)
    if num_gts == 0:
        out = (gt_labels.new_full((num_points,), num_classes), gt_bboxes.new_zeros((num_points, 4)))
        return out + (gt_labels.new_full((num_points,), -1),) if return_gt_inds else out
    areas = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
    areas = areas[None].repeat(num_points, 1)  # [N, K]
    xs = points[:, 0, None]  # [N, 1]
    ys = points[:, 1, None]
    left = xs - gt_bboxes[None, :, 0]
    top = ys - gt_bboxes[None, :, 1]
    right = gt_bboxes[None, :, 2] - xs
    bottom = gt_bboxes[None, :, 3] - ys
    bbox_targets = torch.stack((left, top, right, bottom), -1)  # [N, K, 4]

    if center_sampling:
        cx = (gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2
        cy = (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2
        radius = (point_strides * center_sample_radius)[:, None]  # [N, 1]
        # The centre box is clipped to the GT so small objects keep only their inside points.
        cx1 = torch.maximum(cx[None] - radius, gt_bboxes[None, :, 0])
        cy1 = torch.maximum(cy[None] - radius, gt_bboxes[None, :, 1])
        cx2 = torch.minimum(cx[None] + radius, gt_bboxes[None, :, 2])
        cy2 = torch.minimum(cy[None] + radius, gt_bboxes[None, :, 3])
        center_dist = torch.stack((xs - cx1, ys - cy1, cx2 - xs, cy2 - ys), -1)
        inside_gt = center_dist.min(-1).values > 0
    else:
        inside_gt = bbox_targets.min(-1).values > 0  # strictly inside: edges are outside

    max_regress_distance = bbox_targets.max(-1).values
    inside_regress_range = (max_regress_distance >= regress_ranges[:, None, 0]) & (
        max_regress_distance <= regress_ranges[:, None, 1]
    )
    areas[~inside_gt] = INF
    areas[~inside_regress_range] = INF
    min_area, min_area_inds = areas.min(dim=1)
    labels = gt_labels[min_area_inds]
    labels[min_area == INF] = num_classes
    bbox_targets = bbox_targets[torch.arange(num_points, device=points.device), min_area_inds]
    if return_gt_inds:
        return labels, bbox_targets, torch.where(min_area == INF, -1, min_area_inds)
    return labels, bbox_targets


def fcos_targets(
    points: Sequence[Tensor],
    gt_bboxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    regress_ranges: Sequence[tuple[float, float]] = FCOS_REGRESS_RANGES,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
    norm_on_bbox: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """FCOS classification and regression targets for a batch, grouped by level.

    Args:
        points: per level Tensor[N_l, 2] (x, y), finest stride first.
        gt_bboxes: per image Tensor[K_i, 4] xyxy.
        gt_labels: per image LongTensor[K_i].
        num_classes: C (background label).
        strides: per level stride.
        regress_ranges: per level (low, high) bounds on max(l, t, r, b).
        center_sampling, center_sample_radius: see ``fcos_targets_single``.
        norm_on_bbox: divide the regression targets by the level's stride.

    Returns:
        labels: per level LongTensor[B * N_l] (images concatenated, image-major),
        bbox_targets: per level Tensor[B * N_l, 4] (l, t, r, b).
    """
    if len(points) != len(regress_ranges) or len(points) != len(strides):
        raise ValueError(
            f"points: expected one tensor per level ({len(regress_ranges)} regress ranges, "
            f"{len(strides)} strides), got {len(points)}"
        )
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(
            f"gt_labels: expected one tensor per image ({len(gt_bboxes)}), got {len(gt_labels)}"
        )
    for lvl, p in enumerate(points):
        check_tensor(p, f"points[{lvl}]")
        if p.dim() != 2 or p.shape[1] < 2:
            raise ValueError(f"points[{lvl}]: expected shape [N, 2], got {tuple(p.shape)}")
    for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
        check_boxes(b, f"gt_bboxes[{i}]")
        if b.dim() != 2:
            raise ValueError(f"gt_bboxes[{i}]: expected shape [K, 4], got {tuple(b.shape)}")
        check_labels(lab, f"gt_labels[{i}]", b.shape[0], num_classes)

    num_points = [p.size(0) for p in points]
    concat_points = torch.cat([p[:, :2] for p in points])
    concat_ranges = torch.cat(
        [
            p.new_tensor(r)[None].expand(p.size(0), 2)
            for p, r in zip(points, regress_ranges, strict=True)
        ]
    )
    concat_strides = torch.cat(
        [p.new_full((p.size(0),), float(s)) for p, s in zip(points, strides, strict=True)]
    )
    per_image = [
        fcos_targets_single(
            concat_points,
            b.to(concat_points),
            lab,
            concat_ranges,
            concat_strides,
            num_classes,
            center_sampling,
            center_sample_radius,
        )
        for b, lab in zip(gt_bboxes, gt_labels, strict=True)
    ]
    labels_lvl, targets_lvl = [], []
    for lvl in range(len(points)):
        labels_lvl.append(torch.cat([lab.split(num_points)[lvl] for lab, _ in per_image]))
        t = torch.cat([tgt.split(num_points)[lvl] for _, tgt in per_image])
        targets_lvl.append(t / strides[lvl] if norm_on_bbox else t)
    return labels_lvl, targets_lvl


@dataclass
class FCOSTargets:
    """The per-point targets an ``FCOSHead`` loss was computed from (``B`` images, ``N`` points).

    Attributes:
        points: Tensor[N, 2] (x, y) of every point, levels concatenated (finest first).
        strides: Tensor[N] stride of each point's level.
        num_level_points: points per level (``N_l``), to split the ``N`` axis by level.
        labels: LongTensor[B, N] class of each point, ``num_classes`` = background.
        bbox_targets: Tensor[B, N, 4] (l, t, r, b) distances to the point's GT, in pixels, or
            in units of the level's stride with ``norm_on_bbox`` (exactly what the loss used);
            zeros for background points of an image without GT.
        pos_inds: per image LongTensor[P_i] positive point indices into ``N`` (ascending).
        num_pos: per image ``P_i``.
        avg_factor: ``max(mean over processes of sum_i P_i, 1)``, the classification
            normaliser (and the centerness one, when there are positives).
    """

    points: Tensor
    strides: Tensor
    num_level_points: list[int]
    labels: Tensor
    bbox_targets: Tensor
    pos_inds: list[Tensor]
    num_pos: list[int]
    avg_factor: float


def centerness_target(bbox_targets: Tensor) -> Tensor:
    """Centerness of positive points: sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)).

    Args:
        bbox_targets: Tensor[P, 4] (l, t, r, b) of positive points (all > 0, else NaN/inf).

    Returns:
        Tensor[P] in (0, 1]; 1 at the exact centre of the box.
    """
    left_right = bbox_targets[:, [0, 2]]
    top_bottom = bbox_targets[:, [1, 3]]
    if len(left_right) == 0:
        return left_right[:, 0]
    ratio = (left_right.min(-1).values / left_right.max(-1).values) * (
        top_bottom.min(-1).values / top_bottom.max(-1).values
    )
    return torch.sqrt(ratio)


class FCOSHead(AnchorFreeHead):
    """FCOS head (mmdetection 3.x ``FCOSHead``) with an optional centerness branch.

    Per level: towers, ``conv_cls`` (C), ``conv_reg`` (4) times a learnable per-level
    ``Scale``, and ``conv_centerness`` (1) on the regression tower (``centerness_on_reg``) or
    the classification tower. Distances are ``exp(scale * reg)``, or with ``norm_on_bbox``
    ``relu(scale * reg)`` in units of the stride (multiplied back by the stride at inference).

    Loss: focal over all points (avg_factor = positives, at least 1); GIoU on decoded boxes
    of positives, weighted by their centerness targets and averaged by the targets' sum;
    centerness BCE on positives averaged by the number of positives. Inference multiplies
    sigmoid(cls) by sigmoid(centerness) after the per-level top-k, before NMS.

    Args:
        num_classes, in_channels, feat_channels, stacked_convs, strides, norm, conv_bias,
            test_cfg: see ``AnchorFreeHead``.
        regress_ranges: per level (low, high) on max(l, t, r, b).
        center_sampling, center_sample_radius: positives only near the GT centre.
        norm_on_bbox: regression targets divided by the stride.
        centerness_on_reg: centerness branch on the regression tower.
        centerness: ``False`` drops the centerness branch, its loss and its score factor
            (labkit's switch for the with/without comparison; the GIoU loss stays weighted
            by the centerness targets).
        bbox_loss_weight: ``"centerness"`` (mmdetection: each positive's GIoU weighted by its
            centerness target, averaged by their sum) or ``"uniform"`` (torchvision: plain
            mean over positives).
        point_offset: where points sit in their cell: ``0.5`` (mmdetection, ``(x + 0.5) *
            stride``) or ``0.0`` (torchvision, ``x * stride``).
        learnable_scale: ``False`` freezes the per-level ``Scale`` at 1 (torchvision has none).
        loss_cls, loss_bbox, loss_centerness: loss modules (defaults: focal 2.0/0.25, GIoU,
            sigmoid BCE).

    Targets: ``loss_and_targets`` returns an ``FCOSTargets`` (``labels [B, N]``,
    ``bbox_targets [B, N, 4]``, per image ``pos_inds [P_i]``, ``points [N, 2]``, ``strides
    [N]``, ``avg_factor``); ``get_targets`` keeps its per-level layout.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        regress_ranges: Sequence[tuple[float, float]] = FCOS_REGRESS_RANGES,
        center_sampling: bool = False,
        center_sample_radius: float = 1.5,
        norm_on_bbox: bool = False,
        centerness_on_reg: bool = False,
        centerness: bool = True,
        bbox_loss_weight: str = "centerness",
        point_offset: float = 0.5,
        learnable_scale: bool = True,
        norm: str | None = "gn",
        conv_bias: bool | None = None,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
        loss_centerness: nn.Module | None = None,
        test_cfg: TestConfig | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            feat_channels,
            stacked_convs,
            strides,
            norm,
            conv_bias,
            point_offset,
            test_cfg,
        )
        if bbox_loss_weight not in ("centerness", "uniform"):
            raise ValueError(
                f"bbox_loss_weight: expected 'centerness' or 'uniform', got {bbox_loss_weight!r}"
            )
        self.bbox_loss_weight = bbox_loss_weight
        if len(regress_ranges) != len(strides):
            raise ValueError(
                f"regress_ranges: expected one range per stride ({len(strides)}), got {len(regress_ranges)}"
            )
        self.regress_ranges = tuple(tuple(r) for r in regress_ranges)
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.norm_on_bbox = norm_on_bbox
        self.centerness_on_reg = centerness_on_reg
        self.with_centerness = centerness
        self.loss_cls = loss_cls if loss_cls is not None else FocalLoss(gamma=2.0, alpha=0.25)
        self.loss_bbox = loss_bbox if loss_bbox is not None else GIoULoss()
        self.loss_centerness = (
            loss_centerness if loss_centerness is not None else CrossEntropyLoss(use_sigmoid=True)
        )
        self._init_towers()
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1) if centerness else None
        self.scales = nn.ModuleList(Scale(1.0) for _ in strides)
        self.scales.requires_grad_(learnable_scale)
        init_head_convs(self, self.conv_cls)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
        """``feats[l]: Tensor[B, C_in, H_l, W_l]`` -> ``(cls_scores [B, C, H, W], bbox_preds
        [B, 4, H, W], centernesses [B, 1, H, W])`` per level (no centernesses without the branch)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"feats: expected {len(self.strides)} levels, got {len(feats)}")
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale, stride in zip(feats, self.scales, self.strides, strict=True):
            cls_score, bbox_pred, cls_feat, reg_feat = self.forward_towers(x)
            bbox_pred = scale(bbox_pred).float()
            if self.norm_on_bbox:
                bbox_pred = bbox_pred.clamp(min=0)
                if not self.training:
                    bbox_pred = bbox_pred * stride
            else:
                bbox_pred = bbox_pred.exp()
            cls_scores.append(cls_score)
            bbox_preds.append(bbox_pred)
            if self.with_centerness:
                centernesses.append(
                    self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
                )
        if self.with_centerness:
            return cls_scores, bbox_preds, centernesses
        return cls_scores, bbox_preds

    def get_targets(
        self, points: list[Tensor], batch_gt_bboxes: list[Tensor], batch_gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per level labels ``[B * N_l]`` and (l, t, r, b) targets ``[B * N_l, 4]``, see ``fcos_targets``."""
        return fcos_targets(
            points,
            batch_gt_bboxes,
            batch_gt_labels,
            self.num_classes,
            self.strides,
            self.regress_ranges,
            self.center_sampling,
            self.center_sample_radius,
            self.norm_on_bbox,
        )

    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        centernesses: list[Tensor] | None = None,
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], FCOSTargets]:
        """``({"loss_cls", "loss_bbox"[, "loss_centerness"]}, FCOSTargets)`` (ignore boxes are not
        used, as in mmdetection)."""
        points = self.points(cls_scores)
        labels, bbox_targets = self.get_targets(points, batch_gt_bboxes, batch_gt_labels)
        num_imgs = cls_scores[0].size(0)
        flat_cls = torch.cat(
            [x.permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels) for x in cls_scores]
        )
        flat_bbox = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 4) for x in bbox_preds])
        flat_labels = torch.cat(labels)
        flat_targets = torch.cat(bbox_targets)
        flat_points = torch.cat([p.repeat(num_imgs, 1) for p in points])

        pos_inds = ((flat_labels >= 0) & (flat_labels < self.num_classes)).nonzero().reshape(-1)
        num_pos = torch.tensor(len(pos_inds), dtype=torch.float, device=flat_cls.device)
        num_pos = max(reduce_mean(num_pos), 1.0)
        loss_cls = self.loss_cls(flat_cls, flat_labels, avg_factor=num_pos)

        pos_bbox = flat_bbox[pos_inds]
        pos_targets = flat_targets[pos_inds]
        pos_centerness_targets = centerness_target(pos_targets)
        centerness_denorm = max(reduce_mean(pos_centerness_targets.sum().detach()), 1e-6)
        losses = {"loss_cls": loss_cls}
        if self.with_centerness:
            flat_ctr = torch.cat([x.permute(0, 2, 3, 1).reshape(-1) for x in centernesses])
            pos_ctr = flat_ctr[pos_inds]
        if len(pos_inds) > 0:
            pos_points = flat_points[pos_inds]
            if self.bbox_loss_weight == "centerness":
                weight, denorm = pos_centerness_targets, centerness_denorm
            else:
                weight, denorm = None, num_pos
            losses["loss_bbox"] = self.loss_bbox(
                self.bbox_coder.decode(pos_points, pos_bbox),
                self.bbox_coder.decode(pos_points, pos_targets),
                weight=weight,
                avg_factor=denorm,
            )
            if self.with_centerness:
                losses["loss_centerness"] = self.loss_centerness(
                    pos_ctr, pos_centerness_targets, avg_factor=num_pos
                )
        else:
            # Zero losses that keep the branches in the graph (mmdetection's choice).
            losses["loss_bbox"] = pos_bbox.sum()
            if self.with_centerness:
                losses["loss_centerness"] = pos_ctr.sum()
        return losses, self._batch_targets(points, labels, bbox_targets, num_imgs, float(num_pos))

    def _batch_targets(
        self,
        points: list[Tensor],
        labels: list[Tensor],
        bbox_targets: list[Tensor],
        num_imgs: int,
        avg_factor: float,
    ) -> FCOSTargets:
        """``FCOSTargets`` from ``get_targets``' per-level ``[B * N_l]`` / ``[B * N_l, 4]`` lists."""
        labels_b = level_major_to_images(labels, num_imgs)
        pos_inds = [((lab >= 0) & (lab < self.num_classes)).nonzero().view(-1) for lab in labels_b]
        return FCOSTargets(
            points=torch.cat(points),
            strides=torch.cat(
                [
                    p.new_full((p.shape[0],), float(s))
                    for p, s in zip(points, self.strides, strict=True)
                ]
            ),
            num_level_points=[p.shape[0] for p in points],
            labels=labels_b,
            bbox_targets=level_major_to_images(bbox_targets, num_imgs),
            pos_inds=pos_inds,
            num_pos=[int(p.numel()) for p in pos_inds],
            avg_factor=avg_factor,
        )

    def predict_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        score_factors: list[Tensor] | None = None,
        **kwargs: object,
    ) -> list[dict[str, Tensor]]:
        """Detections per image; centerness (when present) is the score factor."""
        return super().predict_by_feat(cls_scores, bbox_preds, score_factors, **kwargs)
