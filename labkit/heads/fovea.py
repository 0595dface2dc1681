"""FoveaBox: scale-range level assignment, sigma-shrunk positive "fovea", log-space targets and head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from labkit._validation import check_boxes, check_labels
from labkit.heads.anchor_free import AnchorFreeHead, init_head_convs
from labkit.heads.dense_head import TestConfig, level_major_to_images
from labkit.losses import FocalLoss, SmoothL1Loss

FOVEA_BASE_EDGES = (16, 32, 64, 128, 256)
FOVEA_SCALE_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))


def fovea_region(
    gt_bboxes: Tensor, stride: int, featmap_size: tuple[int, int], sigma: float = 0.4
) -> Tensor:
    """The cell rectangle of each GT's fovea (its centre shrunk by ``sigma``) on one level.

    Args:
        gt_bboxes: Tensor[K, 4] xyxy in image pixels.
        stride: the level's stride.
        featmap_size: (h, w) of the level.
        sigma: the fovea keeps the central ``sigma`` fraction of each side.

    Returns:
        LongTensor[K, 4] inclusive cell indices (col_left, row_top, col_right, row_bottom),
        clamped to the map; empty when left > right or top > bottom.
    """
    h, w = featmap_size
    b = gt_bboxes / stride
    half_w = 0.5 * (b[:, 2] - b[:, 0])
    half_h = 0.5 * (b[:, 3] - b[:, 1])
    # Cell (i, j) has its centre at j + 0.5 in level units, hence the -0.5.
    left = torch.ceil(b[:, 0] + (1 - sigma) * half_w - 0.5).long().clamp(0, w - 1)
    right = torch.floor(b[:, 0] + (1 + sigma) * half_w - 0.5).long().clamp(0, w - 1)
    top = torch.ceil(b[:, 1] + (1 - sigma) * half_h - 0.5).long().clamp(0, h - 1)
    down = torch.floor(b[:, 1] + (1 + sigma) * half_h - 0.5).long().clamp(0, h - 1)
    return torch.stack((left, top, right, down), -1)


def fovea_targets_single(
    gt_bboxes: Tensor,
    gt_labels: Tensor,
    featmap_sizes: Sequence[tuple[int, int]],
    priors: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    base_edges: Sequence[int] = FOVEA_BASE_EDGES,
    scale_ranges: Sequence[tuple[float, float]] = FOVEA_SCALE_RANGES,
    sigma: float = 0.4,
    return_gt_inds: bool = False,
) -> tuple[list[Tensor], ...]:
    """FoveaBox targets of one image, per level.

    A GT goes to every level whose scale range holds sqrt(w * h) (both ends inclusive; the
    ranges overlap, so a GT may train two levels). On a level its fovea cells are positive;
    where foveas overlap, the smaller GT wins (mmdetection paints larger GTs first).

    Args:
        gt_bboxes: Tensor[K, 4] xyxy; gt_labels: LongTensor[K].
        featmap_sizes: per level (h, w).
        priors: per level Tensor[h * w, 2] cell centres (x, y) in pixels.
        num_classes: C (background label); strides, base_edges, scale_ranges: per level.
        sigma: fovea shrink factor.
        return_gt_inds: also return per level the 0-based GT index of every cell (-1 none).

    Returns:
        labels: per level LongTensor[h * w]; bbox_targets: per level Tensor[h * w, 4] =
        log(clamp(((x - x1), (y - y1), (x2 - x), (y2 - y)) / base_edge, 1/16, 16)), 0 on
        background (log 1) [; gt_inds: per level LongTensor[h * w]].
    """
    areas = torch.sqrt((gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1]))
    labels_lvl, targets_lvl, inds_lvl = [], [], []
    for base_len, (low, high), stride, size, pri in zip(
        base_edges, scale_ranges, strides, featmap_sizes, priors, strict=True
    ):
        h, w = size
        labels = gt_labels.new_full((h * w,), num_classes)
        gt_inds = gt_labels.new_full((h * w,), -1)
        targets = gt_bboxes.new_ones((h * w, 4))
        hit = ((areas >= low) & (areas <= high)).nonzero().flatten()
        if len(hit) > 0:
            # Painting order of mmdetection: largest first, so the smallest ends on top.
            _, order = torch.sort(-areas[hit])
            hit = hit[order]
            region = fovea_region(gt_bboxes[hit], stride, size, sigma)  # [H, 4]
            rows = torch.arange(h, device=gt_bboxes.device).repeat_interleave(w)
            cols = torch.arange(w, device=gt_bboxes.device).repeat(h)
            inside = (
                (cols[:, None] >= region[None, :, 0])
                & (cols[:, None] <= region[None, :, 2])
                & (rows[:, None] >= region[None, :, 1])
                & (rows[:, None] <= region[None, :, 3])
            )  # [h*w, H]
            rank = torch.arange(len(hit), device=gt_bboxes.device)
            last = torch.where(inside, rank[None], rank.new_tensor(-1)).max(dim=1).values
            pos = last >= 0
            gt_idx = hit[last[pos]]
            labels[pos] = gt_labels[gt_idx]
            gt_inds[pos] = gt_idx
            x, y = pri[pos, 0], pri[pos, 1]
            g = gt_bboxes[gt_idx]
            targets[pos] = (
                torch.stack((x - g[:, 0], y - g[:, 1], g[:, 2] - x, g[:, 3] - y), -1) / base_len
            )
            targets = targets.clamp(min=1.0 / 16, max=16.0)
        labels_lvl.append(labels)
        targets_lvl.append(torch.log(targets))
        inds_lvl.append(gt_inds)
    if return_gt_inds:
        return labels_lvl, targets_lvl, inds_lvl
    return labels_lvl, targets_lvl


def fovea_targets(
    gt_bboxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    featmap_sizes: Sequence[tuple[int, int]],
    priors: Sequence[Tensor],
    num_classes: int,
    strides: Sequence[int],
    base_edges: Sequence[int] = FOVEA_BASE_EDGES,
    scale_ranges: Sequence[tuple[float, float]] = FOVEA_SCALE_RANGES,
    sigma: float = 0.4,
) -> tuple[Tensor, Tensor]:
    """FoveaBox targets for a batch, flattened level-major then image-major.

    Returns:
        labels: LongTensor[sum_l B * h_l * w_l]; bbox_targets: Tensor[same, 4] (log space),
        in the order of per-level predictions flattened with ``permute(0, 2, 3, 1)``.
    """
    if len(gt_bboxes) != len(gt_labels):
        raise ValueError(
            f"gt_labels: expected one tensor per image ({len(gt_bboxes)}), got {len(gt_labels)}"
        )
    if not (
        len(featmap_sizes) == len(priors) == len(strides) == len(base_edges) == len(scale_ranges)
    ):
        raise ValueError(
            "featmap_sizes: priors, strides, base_edges and scale_ranges need one entry per level, got "
            f"{len(featmap_sizes)}, {len(priors)}, {len(strides)}, {len(base_edges)}, {len(scale_ranges)}"
        )
    for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
        check_boxes(b, f"gt_bboxes[{i}]")
        check_labels(lab, f"gt_labels[{i}]", b.shape[0], num_classes)
    per_image = [
        fovea_targets_single(
            b, lab, featmap_sizes, priors, num_classes, strides, base_edges, scale_ranges, sigma
        )
        for b, lab in zip(gt_bboxes, gt_labels, strict=True)
    ]
    labels = torch.cat(
        [torch.cat([img[0][lvl] for img in per_image]) for lvl in range(len(priors))]
    )
    targets = torch.cat(
        [torch.cat([img[1][lvl] for img in per_image]) for lvl in range(len(priors))]
    )
    return labels, targets


@dataclass
class FoveaTargets:
    """The per-cell targets a ``FoveaHead`` loss was computed from (``B`` images, ``N`` cells).

    Attributes:
        points: Tensor[N, 2] (x, y) cell centres, levels concatenated (finest first).
        num_level_points: cells per level (``h_l * w_l``).
        labels: LongTensor[B, N] class of each cell, ``num_classes`` = background.
        bbox_targets: Tensor[B, N, 4] log-space distances / base edge (see
            ``fovea_targets_single``), 0 on background.
        pos_inds: per image LongTensor[P_i] positive cell indices into ``N`` (ascending).
        num_pos: per image ``P_i``; their sum is the box loss normaliser.
        avg_factor: ``sum_i P_i + B``, the classification normaliser.
    """

    points: Tensor
    num_level_points: list[int]
    labels: Tensor
    bbox_targets: Tensor
    pos_inds: list[Tensor]
    num_pos: list[int]
    avg_factor: float


def fovea_decode(
    priors: Tensor, bbox_pred: Tensor, base_len: float, max_shape: tuple[int, int]
) -> Tensor:
    """Boxes from log-space FoveaBox predictions, clipped to ``[0, w-1] x [0, h-1]`` as mmdetection.

    Args:
        priors: Tensor[N, 2] (x, y); bbox_pred: Tensor[N, 4] log distances / base_len.
        base_len: the level's base edge (or Tensor[N, 1] per prior); max_shape: (h, w) of the image.

    Returns:
        Tensor[N, 4] xyxy.
    """
    d = bbox_pred.exp() * base_len
    x, y = priors[:, 0], priors[:, 1]
    x1 = (x - d[:, 0]).clamp(min=0, max=max_shape[1] - 1)
    y1 = (y - d[:, 1]).clamp(min=0, max=max_shape[0] - 1)
    x2 = (x + d[:, 2]).clamp(min=0, max=max_shape[1] - 1)
    y2 = (y + d[:, 3]).clamp(min=0, max=max_shape[0] - 1)
    return torch.stack((x1, y1, x2, y2), -1)


class FoveaHead(AnchorFreeHead):
    """FoveaBox head (mmdetection 3.x ``FoveaHead`` without the deformable feature alignment).

    Towers as ``AnchorFreeHead`` (no norm by default), ``conv_cls`` (C) and ``conv_reg`` (4
    log-space distances / base edge). Loss: focal (gamma 1.5, alpha 0.4) over all cells with
    avg_factor = positives + images; smooth L1 (beta 0.11) on positives with avg_factor =
    positives (a plain zero when there are none). Inference decodes ``exp(pred) * base_edge``
    around the cell centre, clipped to ``[0, w - 1] x [0, h - 1]``; no minimum box size.

    Args:
        num_classes, in_channels, feat_channels, stacked_convs, strides, norm, test_cfg: see
            ``AnchorFreeHead``.
        base_edges: per level normaliser of the distances.
        scale_ranges: per level (low, high) of sqrt(w * h) (inclusive, overlapping).
        sigma: fovea shrink factor.
        loss_cls, loss_bbox: override the default losses.

    Targets: ``loss_and_targets`` returns a ``FoveaTargets`` (``labels [B, N]``,
    ``bbox_targets [B, N, 4]``, per image ``pos_inds [P_i]``, ``avg_factor``);
    ``get_targets`` keeps its flat level-major layout.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        base_edges: Sequence[int] = FOVEA_BASE_EDGES,
        scale_ranges: Sequence[tuple[float, float]] = FOVEA_SCALE_RANGES,
        sigma: float = 0.4,
        norm: str | None = None,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
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
            0.5,
            test_cfg if test_cfg is not None else TestConfig(min_bbox_size=-1),
        )
        if not len(base_edges) == len(scale_ranges) == len(strides):
            raise ValueError(
                f"base_edges: expected one base edge and scale range per stride ({len(strides)}), "
                f"got {len(base_edges)} and {len(scale_ranges)}"
            )
        self.base_edges = tuple(base_edges)
        self.scale_ranges = tuple(tuple(r) for r in scale_ranges)
        self.sigma = sigma
        self.loss_cls = loss_cls if loss_cls is not None else FocalLoss(gamma=1.5, alpha=0.4)
        self.loss_bbox = loss_bbox if loss_bbox is not None else SmoothL1Loss(beta=0.11)
        self._init_towers()
        init_head_convs(self, self.conv_cls)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``feats[l]: Tensor[B, C_in, H_l, W_l]`` -> ``(cls_scores [B, C, H, W], bbox_preds [B, 4, H, W])``."""
        if len(feats) != len(self.strides):
            raise ValueError(f"feats: expected {len(self.strides)} levels, got {len(feats)}")
        outs = [self.forward_towers(x)[:2] for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs]

    def get_targets(
        self, cls_scores: list[Tensor], batch_gt_bboxes: list[Tensor], batch_gt_labels: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Flattened labels and log-space targets for the map sizes of ``cls_scores``."""
        sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        return fovea_targets(
            batch_gt_bboxes,
            batch_gt_labels,
            sizes,
            self.points(cls_scores),
            self.num_classes,
            self.strides,
            self.base_edges,
            self.scale_ranges,
            self.sigma,
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
    ) -> tuple[dict[str, Tensor], FoveaTargets]:
        """``({"loss_cls", "loss_bbox"}, FoveaTargets)`` (ignore boxes unused, as in mmdetection)."""
        num_imgs = cls_scores[0].size(0)
        flat_cls = torch.cat(
            [x.permute(0, 2, 3, 1).reshape(-1, self.cls_out_channels) for x in cls_scores]
        )
        flat_bbox = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 4) for x in bbox_preds])
        labels, targets = self.get_targets(cls_scores, batch_gt_bboxes, batch_gt_labels)
        pos_inds = ((labels >= 0) & (labels < self.num_classes)).nonzero().view(-1)
        num_pos = len(pos_inds)
        loss_cls = self.loss_cls(flat_cls, labels, avg_factor=num_pos + num_imgs)
        if num_pos > 0:
            pos_targets = targets[pos_inds]
            loss_bbox = self.loss_bbox(
                flat_bbox[pos_inds],
                pos_targets,
                pos_targets.new_ones(pos_targets.shape),
                avg_factor=num_pos,
            )
        else:
            loss_bbox = torch.tensor(0, dtype=flat_bbox.dtype, device=flat_bbox.device)
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox}
        return losses, self._batch_targets(cls_scores, labels, targets, num_pos + num_imgs)

    def _batch_targets(
        self, cls_scores: list[Tensor], labels: Tensor, targets: Tensor, avg_factor: float
    ) -> FoveaTargets:
        """``FoveaTargets`` from ``get_targets``' flat level-major, image-major tensors."""
        num_imgs = cls_scores[0].size(0)
        points = self.points(cls_scores)
        split = [num_imgs * p.shape[0] for p in points]
        labels_b = level_major_to_images(list(labels.split(split)), num_imgs)
        pos_inds = [((lab >= 0) & (lab < self.num_classes)).nonzero().view(-1) for lab in labels_b]
        return FoveaTargets(
            points=torch.cat(points),
            num_level_points=[p.shape[0] for p in points],
            labels=labels_b,
            bbox_targets=level_major_to_images(list(targets.split(split)), num_imgs),
            pos_inds=pos_inds,
            num_pos=[int(p.numel()) for p in pos_inds],
            avg_factor=float(avg_factor),
        )

    def _predict_by_feat_single(
        self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors, *args, **kwargs
    ):
        # Carry each level's base edge as a third prior column so one decode call serves all levels.
        mlvl_priors = [
            torch.cat([p[:, :2], p.new_full((p.shape[0], 1), float(e))], dim=1)
            for p, e in zip(mlvl_priors, self.base_edges, strict=True)
        ]
        return super()._predict_by_feat_single(
            cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors, *args, **kwargs
        )

    def _decode_bboxes(self, priors: Tensor, bbox_pred: Tensor, img_shape: tuple) -> Tensor:
        """Boxes from priors ``[N, 3]`` (x, y, base edge) and log-space predictions ``[N, 4]``."""
        return fovea_decode(priors[:, :2], bbox_pred, priors[:, 2:3], img_shape)
