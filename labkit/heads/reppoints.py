"""RepPoints: 9-point object representation, init and refine stages with deformable conv, pseudo boxes and head.

mmdetection 3.x ``RepPointsHead`` (``reppoints-moment_r50_fpn_1x``): at every location
(points at ``(col, row) * stride``, offset 0) the head predicts 9 initial points (offsets
in stride units, y first as deformable-conv offsets), samples the classification and
refinement towers at those points with a 3x3 deformable convolution
(``torchvision.ops.DeformConv2d``), and predicts refined points as a residual. Points become
boxes by a transform (``minmax``, ``partial_minmax`` or ``moment`` with a learnable
``moment_transfer``). The init stage learns from ``PointAssigner(scale=4, pos_num=1)``, the
refine stage and the classifier from ``MaxIoUAssigner(0.5, 0.4)`` on the init boxes.
``loss_and_targets`` returns both stages' assignments (``RepPointsTargets``) with the losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from labkit._validation import check_choice, check_tensor
from labkit.assigners.max_iou import MaxIoUAssigner
from labkit.assigners.point import PointAssigner
from labkit.heads.anchor_free import AnchorFreeHead, conv_norm_relu
from labkit.heads.dense_head import TestConfig
from labkit.losses import FocalLoss, SmoothL1Loss
from labkit.nn.init import bias_init_with_prob

TRANSFORMS = ("minmax", "partial_minmax", "moment")


@dataclass
class PointStageTargets:
    """One RepPoints stage's targets over ``B`` images and ``N`` points of all levels.

    Attributes:
        labels: LongTensor[B, N] (``num_classes`` = background); the classifier trains on the
            refine stage's.
        label_weights: Tensor[B, N] 1 on positives and negatives, 0 on ignored / invalid points.
        bbox_gt: Tensor[B, N, 4] the assigned GT box (xyxy pixels), zeros elsewhere.
        bbox_weights: Tensor[B, N, 4] 1 on positives.
        pos_inds: per image LongTensor[P_i] positive point indices into ``N`` (ascending).
        pos_gt_inds: per image LongTensor[P_i] 0-based GT index of each positive.
        num_pos: per image ``P_i``.
        avg_factor: ``sum_i max(P_i, 1)``, the stage's box-loss normaliser (and, for the
            refine stage, the classification one).
    """

    labels: Tensor
    label_weights: Tensor
    bbox_gt: Tensor
    bbox_weights: Tensor
    pos_inds: list[Tensor]
    pos_gt_inds: list[Tensor]
    num_pos: list[int]
    avg_factor: float


@dataclass
class RepPointsTargets:
    """The targets a ``RepPointsHead`` loss used.

    Attributes:
        points: Tensor[N, 3] (x, y, stride) of every point prior, levels concatenated.
        num_level_points: points per level.
        init: ``PointStageTargets`` of the init stage (``PointAssigner`` on the point priors).
        refine: ``PointStageTargets`` of the refine stage and the classifier (``MaxIoUAssigner``
            on the init pseudo boxes).
        refine_proposals: Tensor[B, N, 4] those detached init pseudo boxes (xyxy pixels).
    """

    points: Tensor
    num_level_points: list[int]
    init: PointStageTargets
    refine: PointStageTargets
    refine_proposals: Tensor


def points_to_bbox(
    pts: Tensor,
    transform: str = "moment",
    y_first: bool = True,
    moment_transfer: Tensor | None = None,
    moment_mul: float = 0.01,
) -> Tensor:
    """Pseudo box of each point set.

    Args:
        pts: Tensor[N, 2 * P] or Tensor[B, 2 * P, H, W], pairs (y, x) when ``y_first`` else (x, y).
        transform: ``"minmax"`` (extremes of all points), ``"partial_minmax"`` (extremes of the
            first 4 points) or ``"moment"`` (mean +- std * exp(moment_transfer), std unbiased).
        moment_transfer: Tensor[2] log-scale of the half width / height (moment only); its
            gradient is scaled by ``moment_mul`` (mmdetection's slow learning of this scalar).

    Returns:
        Tensor[N, 4] or Tensor[B, 4, H, W] boxes (x1, y1, x2, y2).
    """
    check_tensor(pts, "pts")
    check_choice(transform, "transform", TRANSFORMS)
    if pts.dim() not in (2, 4) or pts.shape[1] % 2:
        raise ValueError(f"pts: expected shape [N, 2P] or [B, 2P, H, W], got {tuple(pts.shape)}")
    pairs = pts.view(pts.shape[0], -1, 2, *pts.shape[2:])
    ys = pairs[:, :, 0] if y_first else pairs[:, :, 1]
    xs = pairs[:, :, 1] if y_first else pairs[:, :, 0]
    if transform == "partial_minmax":
        ys, xs = ys[:, :4], xs[:, :4]
    if transform in ("minmax", "partial_minmax"):
        return torch.cat(
            [
                xs.min(dim=1, keepdim=True).values,
                ys.min(dim=1, keepdim=True).values,
                xs.max(dim=1, keepdim=True).values,
                ys.max(dim=1, keepdim=True).values,
            ],
            dim=1,
        )
    if moment_transfer is None:
        moment_transfer = pts.new_zeros(2)
    y_mean = ys.mean(dim=1, keepdim=True)
    x_mean = xs.mean(dim=1, keepdim=True)
    y_std = torch.std(ys - y_mean, dim=1, keepdim=True)
    x_std = torch.std(xs - x_mean, dim=1, keepdim=True)
    transfer = moment_transfer * moment_mul + moment_transfer.detach() * (1 - moment_mul)
    half_w = x_std * torch.exp(transfer[0])
    half_h = y_std * torch.exp(transfer[1])
    return torch.cat([x_mean - half_w, y_mean - half_h, x_mean + half_w, y_mean + half_h], dim=1)


def offsets_to_points(centers: Tensor, pts_pred: Tensor, stride: int) -> Tensor:
    """Absolute (x, y) point sets from y-first offsets in stride units.

    Args:
        centers: Tensor[H * W, >= 2] point priors (x, y, ...) of one level.
        pts_pred: Tensor[B, 2P, H, W] offsets (y, x) per point.
        stride: the level's stride.

    Returns:
        Tensor[B, H * W, 2P] pairs (x, y) in pixels.
    """
    b, c = pts_pred.shape[:2]
    yx = pts_pred.permute(0, 2, 3, 1).reshape(b, -1, c)
    xy = torch.stack([yx[..., 1::2], yx[..., 0::2]], -1).reshape(b, -1, c)
    return xy * stride + centers[None, :, :2].repeat(1, 1, c // 2)


class RepPointsHead(AnchorFreeHead):
    """RepPoints head (see the module docstring).

    Args:
        num_classes, in_channels, feat_channels, stacked_convs, norm, test_cfg: as
            ``AnchorFreeHead`` (towers of ``stacked_convs`` conv-ReLU, mmdetection default 3).
        point_feat_channels: width of the point convolutions.
        num_points: points per set (an odd square: the deformable kernel is sqrt x sqrt).
        gradient_mul: fraction of the refine/classification gradient that flows into the
            init points through the deformable offsets.
        strides: point strides per level. point_base_scale: PointAssigner scale and box-loss
            normaliser (``point_base_scale * stride``).
        transform: points-to-box transform; moment_mul: see ``points_to_bbox``.
        init_assigner, refine_assigner: override the defaults.

    Targets: ``loss_and_targets`` returns a ``RepPointsTargets`` (``points [N, 3]``, and per
    stage ``init`` / ``refine`` a ``PointStageTargets``: ``labels [B, N]``, ``bbox_gt
    [B, N, 4]``, per image ``pos_inds [P_i]``, ``avg_factor``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 3,
        point_feat_channels: int = 256,
        num_points: int = 9,
        gradient_mul: float = 0.1,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        point_base_scale: int = 4,
        transform: str = "moment",
        moment_mul: float = 0.01,
        norm: str | None = None,
        init_assigner: object | None = None,
        refine_assigner: object | None = None,
        test_cfg: TestConfig | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            feat_channels,
            stacked_convs,
            strides,
            norm,
            None,
            0.0,
            test_cfg,
        )
        kernel = int(round(num_points**0.5))
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f"num_points: expected an odd square (9, 25, ...), got {num_points}")
        check_choice(transform, "transform", TRANSFORMS)
        self.num_points = num_points
        self.dcn_kernel = kernel
        self.gradient_mul = gradient_mul
        self.point_base_scale = point_base_scale
        self.transform = transform
        self.moment_mul = moment_mul
        pad = (kernel - 1) // 2
        base = torch.arange(-pad, pad + 1, dtype=torch.float32)
        # (y, x) of the regular kernel grid, row-major: the offsets deform_conv2d adds to.
        base_offset = torch.stack([base.repeat_interleave(kernel), base.repeat(kernel)], 1).reshape(
            -1
        )
        self.register_buffer("dcn_base_offset", base_offset.view(1, -1, 1, 1), persistent=False)
        self.cls_convs = self._tower()
        self.reg_convs = self._tower()
        last = feat_channels if stacked_convs > 0 else in_channels
        self.reppoints_cls_conv = DeformConv2d(
            last, point_feat_channels, kernel, 1, pad, bias=False
        )
        self.reppoints_cls_out = nn.Conv2d(point_feat_channels, self.cls_out_channels, 1)
        self.reppoints_pts_init_conv = nn.Conv2d(last, point_feat_channels, 3, 1, 1)
        self.reppoints_pts_init_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        self.reppoints_pts_refine_conv = DeformConv2d(
            last, point_feat_channels, kernel, 1, pad, bias=False
        )
        self.reppoints_pts_refine_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        self.moment_transfer = nn.Parameter(torch.zeros(2)) if transform == "moment" else None
        self.init_assigner = init_assigner or PointAssigner(scale=point_base_scale, pos_num=1)
        self.refine_assigner = refine_assigner or MaxIoUAssigner(
            0.5, 0.4, min_pos_iou=0.0, ignore_iof_thr=-1
        )
        self.loss_cls = FocalLoss(gamma=2.0, alpha=0.25)
        self.loss_bbox_init = SmoothL1Loss(beta=0.11, loss_weight=0.5)
        self.loss_bbox_refine = SmoothL1Loss(beta=0.11, loss_weight=1.0)
        # N(0, 0.01) on plain convs (DeformConv2d keeps its own uniform init, as with mmcv).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.reppoints_cls_out.bias, bias_init_with_prob(0.01))

    def _tower(self) -> nn.ModuleList:
        # mmdetection's RepPoints towers use ConvModule's automatic bias (none with GN).
        return nn.ModuleList(
            conv_norm_relu(
                self.in_channels if i == 0 else self.feat_channels, self.feat_channels, self.norm
            )
            for i in range(self.stacked_convs)
        )

    def points2bbox(self, pts: Tensor, y_first: bool = True) -> Tensor:
        """The head's transform of ``pts`` (see ``points_to_bbox``)."""
        return points_to_bbox(pts, self.transform, y_first, self.moment_transfer, self.moment_mul)

    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One level -> ``(cls_out [B, C, H, W], pts_init [B, 2P, H, W], pts_refine [B, 2P, H, W])``,
        points as (y, x) offsets in stride units from the location."""
        cls_feat, pts_feat = x, x
        for layer in self.cls_convs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_convs:
            pts_feat = layer(pts_feat)
        pts_init = self.reppoints_pts_init_out(torch.relu(self.reppoints_pts_init_conv(pts_feat)))
        # Only gradient_mul of the downstream gradient reaches the init points.
        pts_init_grad_mul = (
            1 - self.gradient_mul
        ) * pts_init.detach() + self.gradient_mul * pts_init
        dcn_offset = pts_init_grad_mul - self.dcn_base_offset.to(x.dtype)
        cls_out = self.reppoints_cls_out(torch.relu(self.reppoints_cls_conv(cls_feat, dcn_offset)))
        pts_refine = self.reppoints_pts_refine_out(
            torch.relu(self.reppoints_pts_refine_conv(pts_feat, dcn_offset))
        )
        return cls_out, pts_init, pts_refine + pts_init.detach()

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level ``(cls_outs, pts_inits, pts_refines)`` (see ``forward_single``)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"feats: expected {len(self.strides)} levels, got {len(feats)}")
        outs = [self.forward_single(x) for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

    def _targets(
        self,
        assigner: object,
        proposals: Tensor,
        valid: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor]:
        """One image, one stage: labels [N], label weights [N], GT boxes [N, 4], box weights [N, 4],
        ``max(num_pos, 1)``, 0-based GT index [N] (-1 none); proposals outside ``valid`` are
        background with weight 0."""
        n = proposals.shape[0]
        labels = proposals.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = proposals.new_zeros(n)
        bbox_gt = proposals.new_zeros((n, 4))
        bbox_weights = proposals.new_zeros((n, 4))
        gt_inds = labels.new_full((n,), -1)
        idx = valid.nonzero().flatten()
        result = assigner.assign(proposals[idx], gt_bboxes, gt_labels)
        pos = result.gt_inds > 0
        pos_idx, neg_idx = idx[pos], idx[result.gt_inds == 0]
        assigned = result.gt_inds[pos] - 1
        labels[pos_idx] = gt_labels[assigned]
        label_weights[pos_idx] = 1.0
        label_weights[neg_idx] = 1.0
        bbox_gt[pos_idx] = gt_bboxes[assigned]
        bbox_weights[pos_idx] = 1.0
        gt_inds[pos_idx] = assigned
        return labels, label_weights, bbox_gt, bbox_weights, max(int(pos.sum()), 1), gt_inds

    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        pts_preds_init: list[Tensor],
        pts_preds_refine: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], RepPointsTargets]:
        """``({"loss_cls", "loss_pts_init", "loss_pts_refine"}, RepPointsTargets)``, losses
        summed over levels.

        Init stage: PointAssigner on the point priors. Refine stage and classifier:
        MaxIoU on the init pseudo boxes (detached). Box losses are smooth L1 on boxes divided
        by ``point_base_scale * stride``; each stage averages by its summed
        ``max(num_pos, 1)`` over images, the classifier by the refine stage's.
        """
        num_imgs = len(batch_img_metas)
        sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        device = cls_scores[0].device
        centers = self.prior_generator.grid_priors(sizes, device=device, with_stride=True)
        valid = [
            torch.cat(
                self.prior_generator.valid_flags(
                    sizes, tuple(m.get("pad_shape", m.get("batch_input_shape"))[:2]), device
                )
            )
            for m in batch_img_metas
        ]
        num_level = [c.shape[0] for c in centers]
        flat_centers = torch.cat(centers)
        with torch.no_grad():
            init_boxes = [
                self.points2bbox(p.detach()) * s
                for p, s in zip(pts_preds_init, self.strides, strict=True)
            ]  # per level [B, 4, H, W] in pixels relative to the point
            refine_props = (
                torch.cat(
                    [b.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4) for b in init_boxes], dim=1
                )
                + torch.cat([flat_centers[:, :2], flat_centers[:, :2]], 1)[None]
            )
        init_t = [
            self._targets(
                self.init_assigner, flat_centers, valid[i], batch_gt_bboxes[i], batch_gt_labels[i]
            )
            for i in range(num_imgs)
        ]
        refine_t = [
            self._targets(
                self.refine_assigner,
                refine_props[i],
                valid[i],
                batch_gt_bboxes[i],
                batch_gt_labels[i],
            )
            for i in range(num_imgs)
        ]
        avg_init = float(sum(t[4] for t in init_t))
        avg_refine = float(sum(t[4] for t in refine_t))

        def per_level(targets: list[tuple], k: int) -> list[Tensor]:
            split = [t[k].split(num_level) for t in targets]
            return [torch.cat([s[lvl] for s in split]) for lvl in range(len(num_level))]

        labels, label_weights = per_level(refine_t, 0), per_level(refine_t, 1)
        gt_init, w_init = per_level(init_t, 2), per_level(init_t, 3)
        gt_refine, w_refine = per_level(refine_t, 2), per_level(refine_t, 3)
        loss_cls = loss_init = loss_refine = 0.0
        for lvl, stride in enumerate(self.strides):
            cls = cls_scores[lvl].permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels)
            loss_cls = loss_cls + self.loss_cls(
                cls, labels[lvl], label_weights[lvl], avg_factor=avg_refine
            )
            centers_l = centers[lvl]
            pts_init = offsets_to_points(centers_l, pts_preds_init[lvl], stride).reshape(
                -1, 2 * self.num_points
            )
            pts_ref = offsets_to_points(centers_l, pts_preds_refine[lvl], stride).reshape(
                -1, 2 * self.num_points
            )
            norm = self.point_base_scale * stride
            loss_init = loss_init + self.loss_bbox_init(
                self.points2bbox(pts_init, y_first=False) / norm,
                gt_init[lvl] / norm,
                w_init[lvl],
                avg_factor=avg_init,
            )
            loss_refine = loss_refine + self.loss_bbox_refine(
                self.points2bbox(pts_ref, y_first=False) / norm,
                gt_refine[lvl] / norm,
                w_refine[lvl],
                avg_factor=avg_refine,
            )
        losses = {"loss_cls": loss_cls, "loss_pts_init": loss_init, "loss_pts_refine": loss_refine}
        targets = RepPointsTargets(
            points=flat_centers,
            num_level_points=num_level,
            init=self._stage_targets(init_t),
            refine=self._stage_targets(refine_t),
            refine_proposals=refine_props,
        )
        return losses, targets

    def _stage_targets(self, per_image: list[tuple]) -> PointStageTargets:
        """Stack ``_targets``' per-image tuples into a ``PointStageTargets``."""
        labels = torch.stack([t[0] for t in per_image])
        pos_inds = [((lab >= 0) & (lab < self.num_classes)).nonzero().view(-1) for lab in labels]
        return PointStageTargets(
            labels=labels,
            label_weights=torch.stack([t[1] for t in per_image]),
            bbox_gt=torch.stack([t[2] for t in per_image]),
            bbox_weights=torch.stack([t[3] for t in per_image]),
            pos_inds=pos_inds,
            pos_gt_inds=[t[5][p] for t, p in zip(per_image, pos_inds, strict=True)],
            num_pos=[int(p.numel()) for p in pos_inds],
            avg_factor=float(sum(t[4] for t in per_image)),
        )

    def predict_by_feat(
        self,
        cls_scores: list[Tensor],
        pts_preds_init: list[Tensor],
        pts_preds_refine: list[Tensor],
        **kwargs: object,
    ) -> list[dict[str, Tensor]]:
        """Detections from the refined points' pseudo boxes (``stride * box + point``, clipped to
        ``[0, w] x [0, h]``)."""
        bbox_preds = [
            self.points2bbox(p) * s for p, s in zip(pts_preds_refine, self.strides, strict=True)
        ]
        return super().predict_by_feat(cls_scores, bbox_preds, None, **kwargs)

    def _decode_bboxes(self, priors: Tensor, bbox_pred: Tensor, img_shape: tuple) -> Tensor:
        """Boxes ``[N, 4]``: pseudo-box offsets (already times the stride) plus the point, clipped."""
        boxes = bbox_pred + torch.cat([priors[:, :2], priors[:, :2]], 1)
        h, w = img_shape[:2]
        return torch.stack(
            [
                boxes[:, 0].clamp(0, w),
                boxes[:, 1].clamp(0, h),
                boxes[:, 2].clamp(0, w),
                boxes[:, 3].clamp(0, h),
            ],
            -1,
        )
