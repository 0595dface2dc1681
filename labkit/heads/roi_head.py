"""RoI head of Faster R-CNN: assign and sample proposals, pool them, classify and refine with 2 FCs.

Training, per image (mmdetection's ``StandardRoIHead`` + ``Shared2FCBBoxHead``):

1. ``MaxIoUAssigner(pos 0.5, neg 0.5, min_pos_iou 0.5, match_low_quality False)`` labels the
   proposals; ``RandomSampler(512, 0.25, add_gt_as_proposals=True)`` prepends the GT boxes as
   proposals and draws at most 128 positives, filling up to 512 with negatives;
2. the sampled RoIs (positives first, then negatives) are pooled by ``RoIExtractor`` to
   ``[K, C, 7, 7]``, flattened, and go through ``fc 1024 -> ReLU -> fc 1024 -> ReLU``;
   ``fc_cls`` gives ``C + 1`` softmax logits (background = index ``C``, last), ``fc_reg``
   ``4`` (class-agnostic) or ``4 * C`` (class-specific) deltas;
3. targets: positives get their GT label and box target (encoded deltas, or the GT box itself
   when ``reg_decoded_bbox``), negatives label ``C``; all sampled RoIs have weight 1;
4. ``loss_cls``: softmax cross-entropy averaged over the sampled RoIs; ``loss_bbox`` on
   positives only (the class-specific head uses the GT class's 4 columns), decoded against
   the RoI first when ``reg_decoded_bbox`` (GIoU/IoU losses), with mmdetection's
   ``avg_factor`` = all sampled RoIs of the batch (not only positives); ``acc`` (top-1
   accuracy in percent over sampled RoIs) is logged, not optimised.

Inference: softmax scores, every class's box decoded from each proposal (clipped to
``img_shape``), optional rescale, then mmdetection's ``multiclass_nms``: (RoI, class) pairs
scoring above ``score_thr``, NMS per class at ``iou_threshold``, ``max_per_img`` best.

``StandardRoIHead.loss_and_targets(feats, proposals, batch) -> (losses, RoITargets)``: the
targets are the sampling results (which RoIs were sampled, which are positive and their GT)
and the pooled features of the sampled RoIs averaged over the grid ``[K, C]`` (with their
gradient). Co-DETR (``labkit.codetr``) turns the positives among them into positive queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit._validation import check_boxes, check_tensor
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.dense_head import TestConfig, check_gt_instances, make_test_cfg, scale_factor_wh
from labkit.heads.nms import multiclass_nms
from labkit.heads.roi_extractor import RoIExtractor, bbox2roi
from labkit.losses import CrossEntropyLoss, L1Loss
from labkit.nn.init import normal_init

# mmdetection's faster_rcnn_r50_fpn rcnn test settings (nms_pre is not used here).
RCNN_TEST_CFG = {"score_thr": 0.05, "iou_threshold": 0.5, "max_per_img": 100}


@dataclass
class RoITargets:
    """What the RoI head's loss was computed on, per batch.

    Attributes:
        sampling_results: one ``SamplingResult`` per image (``pos_priors[P_i, 4]``,
            ``pos_gt_labels[P_i]``, ``pos_gt_bboxes[P_i, 4]``, ``pos_inds``, ``neg_inds``);
            RoIs are ordered positives first, then negatives, image after image.
        roi_feats: ``Tensor[K, C]`` pooled features of all ``K`` sampled RoIs averaged over
            the RoIAlign grid, in that order (keeps its gradient).
    """

    sampling_results: list
    roi_feats: Tensor


def accuracy(cls_score: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy in percent of ``cls_score: Tensor[K, C+1]`` against ``labels: LongTensor[K]``."""
    if labels.numel() == 0:
        return cls_score.new_tensor(0.0)
    correct = (cls_score.argmax(dim=1) == labels).float().sum()
    return correct * (100.0 / labels.numel())


class Shared2FCBBoxHead(nn.Module):
    """Two shared fully connected layers, then a softmax classifier and a box regressor.

    Args:
        num_classes: foreground classes ``C``.
        in_channels: channels of the pooled RoI features.
        roi_feat_size: side of the pooled grid (7).
        fc_out_channels: width of both FCs (1024).
        reg_class_agnostic: one box per RoI (``4`` outputs) instead of one per class (``4C``).
        bbox_coder: default ``DeltaXYWHBBoxCoder`` with stds ``(0.1, 0.1, 0.2, 0.2)``.
        reg_decoded_bbox: the box loss compares decoded boxes with GT boxes (IoU losses).
        loss_cls: default softmax ``CrossEntropyLoss``. loss_bbox: default ``L1Loss``.

    Init as mmdetection: Xavier-uniform FCs, ``fc_cls`` N(0, 0.01), ``fc_reg`` N(0, 0.001),
    zero biases. ``forward(roi_feats[K, in, S, S]) -> (cls_score[K, C+1], bbox_pred[K, 4 or 4C])``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        roi_feat_size: int = 7,
        fc_out_channels: int = 1024,
        *,
        reg_class_agnostic: bool = False,
        bbox_coder: DeltaXYWHBBoxCoder | None = None,
        reg_decoded_bbox: bool = False,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.reg_decoded_bbox = reg_decoded_bbox
        self.bbox_coder = bbox_coder or DeltaXYWHBBoxCoder((0.0,) * 4, (0.1, 0.1, 0.2, 0.2))
        self.loss_cls = loss_cls or CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0)
        self.loss_bbox = loss_bbox or L1Loss(loss_weight=1.0)
        self.shared_fcs = nn.ModuleList(
            [
                nn.Linear(in_channels * roi_feat_size * roi_feat_size, fc_out_channels),
                nn.Linear(fc_out_channels, fc_out_channels),
            ]
        )
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 if reg_class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        normal_init(self.fc_cls, std=0.01)
        normal_init(self.fc_reg, std=0.001)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        """``roi_feats: Tensor[K, C_in, S, S]`` -> ``(cls_score[K, C+1], bbox_pred[K, 4|4C])``."""
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def get_targets(
        self, sampling_results: Sequence, pos_weight: float = -1.0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Targets of all sampled RoIs, images concatenated (positives then negatives per image).

        Returns:
            ``labels: LongTensor[K]`` (``C`` for negatives), ``label_weights: Tensor[K]``,
            ``bbox_targets: Tensor[K, 4]`` (deltas, or GT boxes when ``reg_decoded_bbox``),
            ``bbox_weights: Tensor[K, 4]`` (1 on positives).
        """
        out = ([], [], [], [])
        for res in sampling_results:
            pos_priors, num_neg = res.pos_priors, res.neg_priors.shape[0]
            num_pos = pos_priors.shape[0]
            n = num_pos + num_neg
            labels = pos_priors.new_full((n,), self.num_classes, dtype=torch.long)
            label_weights = pos_priors.new_zeros(n)
            bbox_targets = pos_priors.new_zeros(n, 4)
            bbox_weights = pos_priors.new_zeros(n, 4)
            if num_pos > 0:
                labels[:num_pos] = res.pos_gt_labels
                label_weights[:num_pos] = 1.0 if pos_weight <= 0 else pos_weight
                if self.reg_decoded_bbox:
                    bbox_targets[:num_pos] = res.pos_gt_bboxes
                else:
                    bbox_targets[:num_pos] = self.bbox_coder.encode(pos_priors, res.pos_gt_bboxes)
                bbox_weights[:num_pos] = 1.0
            if num_neg > 0:
                label_weights[num_pos:] = 1.0
            for acc, t in zip(
                out, (labels, label_weights, bbox_targets, bbox_weights), strict=True
            ):
                acc.append(t)
        return tuple(torch.cat(t, 0) for t in out)

    def loss(
        self,
        cls_score: Tensor,
        bbox_pred: Tensor,
        rois: Tensor,
        labels: Tensor,
        label_weights: Tensor,
        bbox_targets: Tensor,
        bbox_weights: Tensor,
    ) -> dict[str, Tensor]:
        """``{"loss_cls", "acc", "loss_bbox"}`` (see the module docstring, step 4).

        Shapes: ``cls_score[K, C+1]``, ``bbox_pred[K, 4|4C]``, ``rois[K, 5]``, targets from
        ``get_targets``.
        """
        avg_factor = max(float((label_weights > 0).sum()), 1.0)
        losses = {}
        if cls_score.numel() > 0:
            losses["loss_cls"] = self.loss_cls(
                cls_score, labels, label_weights, avg_factor=avg_factor
            )
            losses["acc"] = accuracy(cls_score.detach(), labels)
        else:  # no RoI at all (no proposals, no GT): keep the keys stable for logging
            losses["loss_cls"] = cls_score.sum() * 0
            losses["acc"] = cls_score.new_tensor(0.0)
        pos = (labels >= 0) & (labels < self.num_classes)
        if pos.any():
            if self.reg_decoded_bbox:
                bbox_pred = self.bbox_coder.decode(rois[:, 1:], bbox_pred)
            if self.reg_class_agnostic:
                pos_pred = bbox_pred[pos]
            else:
                pos_pred = bbox_pred.view(bbox_pred.shape[0], self.num_classes, 4)[pos, labels[pos]]
            # mmdetection divides by every sampled RoI, not by the positives.
            losses["loss_bbox"] = self.loss_bbox(
                pos_pred, bbox_targets[pos], bbox_weights[pos], avg_factor=bbox_targets.shape[0]
            )
        else:
            losses["loss_bbox"] = bbox_pred[pos].sum()
        return losses

    def predict_single(
        self,
        rois: Tensor,
        cls_score: Tensor,
        bbox_pred: Tensor,
        img_meta: dict,
        cfg: TestConfig,
        rescale: bool = False,
    ) -> dict[str, Tensor]:
        """Detections of one image from its ``rois[N, 5]``, ``cls_score[N, C+1]``, ``bbox_pred[N, 4|4C]``."""
        scores = F.softmax(cls_score, dim=-1)
        num_rois = rois.shape[0]
        k = 1 if self.reg_class_agnostic else self.num_classes
        boxes = self.bbox_coder.decode(
            rois[:, 1:].repeat_interleave(k, dim=0),
            bbox_pred.reshape(-1, 4),
            max_shape=tuple(img_meta["img_shape"][:2]),
        )
        if rescale and boxes.shape[0] > 0:
            sw, sh = scale_factor_wh(img_meta)
            boxes = boxes * boxes.new_tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh])
        return multiclass_nms(boxes.reshape(num_rois, 4 * k), scores, cfg)


class StandardRoIHead(nn.Module):
    """Assigner + sampler + ``RoIExtractor`` + ``Shared2FCBBoxHead`` (see the module docstring).

    Args:
        bbox_roi_extractor: a ``RoIExtractor`` (its strides say which feature levels are read).
        bbox_head: a ``Shared2FCBBoxHead``.
        assigner: default ``MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=False)``.
        sampler: default ``RandomSampler(512, 0.25, add_gt_as_proposals=True)``.
        pos_weight: classification weight of positives (``<= 0``: 1).
        test_cfg: ``TestConfig`` or dict (score_thr 0.05, NMS 0.5, 100 per image).
    """

    def __init__(
        self,
        bbox_roi_extractor: RoIExtractor,
        bbox_head: Shared2FCBBoxHead,
        *,
        assigner: object | None = None,
        sampler: object | None = None,
        pos_weight: float = -1.0,
        test_cfg: TestConfig | dict | None = None,
    ) -> None:
        from labkit.assigners import MaxIoUAssigner, RandomSampler

        super().__init__()
        self.bbox_roi_extractor = bbox_roi_extractor
        self.bbox_head = bbox_head
        self.assigner = assigner or MaxIoUAssigner(
            0.5, 0.5, min_pos_iou=0.5, match_low_quality=False
        )
        self.sampler = sampler or RandomSampler(512, 0.25, neg_pos_ub=-1, add_gt_as_proposals=True)
        self.pos_weight = pos_weight
        self.test_cfg = make_test_cfg(test_cfg, **RCNN_TEST_CFG)

    @property
    def num_classes(self) -> int:
        """Foreground classes of the box head."""
        return self.bbox_head.num_classes

    def _bbox_forward(self, feats: Sequence[Tensor], rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        roi_feats = self.bbox_roi_extractor(feats, rois)  # [K, C, 7, 7]
        cls_score, bbox_pred = self.bbox_head(roi_feats)
        return cls_score, bbox_pred, roi_feats

    def sample(
        self,
        proposals: Sequence[Tensor],
        gt_bboxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        gt_bboxes_ignore: Sequence[Tensor | None] | None = None,
    ) -> list:
        """Assign and sample every image's ``proposals[i]: Tensor[N_i, 4]``: one ``SamplingResult`` each."""
        if gt_bboxes_ignore is None:
            gt_bboxes_ignore = [None] * len(proposals)
        results = []
        for props, boxes, labels, ignore in zip(
            proposals, gt_bboxes, gt_labels, gt_bboxes_ignore, strict=True
        ):
            props = props[:, :4].detach()
            if ignore is not None and ignore.numel() == 0:
                ignore = None
            assign = self.assigner.assign(props, boxes, gt_labels=labels, gt_bboxes_ignore=ignore)
            results.append(self.sampler.sample(assign, props, boxes, gt_labels=labels))
        return results

    def loss_and_targets(
        self, feats: Sequence[Tensor], proposals: Sequence[Tensor], batch: dict
    ) -> tuple[dict[str, Tensor], RoITargets]:
        """Losses of the RoI head and the targets they were computed on (no input checks:
        the detector validated the batch; :meth:`loss` is the checked entry point).

        Args:
            feats: per level ``Tensor[B, C, H_l, W_l]`` (the first ``len(featmap_strides)`` are read).
            proposals: per image ``Tensor[N_i, 4]`` xyxy pixels (e.g. the RPN's ``"boxes"``).
            batch: ``labkit.data.collate`` output (``gt_bboxes``, ``gt_labels``, ``img_metas``).

        Returns:
            ``({"loss_cls", "acc", "loss_bbox"}, RoITargets)``.
        """
        gt_bboxes, gt_labels = batch["gt_bboxes"], batch["gt_labels"]
        _check_proposals(proposals, len(gt_bboxes))
        sampling_results = self.sample(proposals, gt_bboxes, gt_labels, batch.get("gt_bboxes_ignore"))
        rois = bbox2roi([res.priors for res in sampling_results])
        cls_score, bbox_pred, roi_feats = self._bbox_forward(feats, rois)
        targets = self.bbox_head.get_targets(sampling_results, self.pos_weight)
        losses = self.bbox_head.loss(cls_score, bbox_pred, rois, *targets)
        return losses, RoITargets(sampling_results, roi_feats.mean(dim=(2, 3)))

    def loss(
        self, feats: Sequence[Tensor], proposals: Sequence[Tensor], batch: dict
    ) -> dict[str, Tensor]:
        """``{"loss_cls", "acc", "loss_bbox"}`` of a collated ``batch``, its ground truth checked
        first (errors name the argument); see :meth:`loss_and_targets`."""
        check_gt_instances(
            batch["gt_bboxes"],
            batch["gt_labels"],
            self.num_classes,
            batch.get("gt_bboxes_ignore"),
            batch.get("img_metas"),
        )
        return self.loss_and_targets(feats, proposals, batch)[0]

    @torch.no_grad()
    def predict(
        self,
        feats: Sequence[Tensor],
        proposals: Sequence[Tensor],
        batch_img_metas: list[dict],
        rescale: bool = False,
        cfg: TestConfig | dict | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes": Tensor[M, 4], "scores": Tensor[M], "labels": LongTensor[M]}``."""
        cfg = self.test_cfg if cfg is None else make_test_cfg(cfg, **RCNN_TEST_CFG)
        _check_proposals(proposals, len(batch_img_metas))
        rois = bbox2roi([p[:, :4] for p in proposals])
        cls_score, bbox_pred, _ = self._bbox_forward(feats, rois)
        counts = [p.shape[0] for p in proposals]
        results = []
        for i, (r, c, b) in enumerate(
            zip(rois.split(counts), cls_score.split(counts), bbox_pred.split(counts), strict=True)
        ):
            results.append(self.bbox_head.predict_single(r, c, b, batch_img_metas[i], cfg, rescale))
        return results


def _check_proposals(proposals: object, num_images: int) -> None:
    if not isinstance(proposals, (list, tuple)):
        raise TypeError(
            f"proposals: expected a list of Tensor[N, 4] (one per image), got {type(proposals).__name__}"
        )
    if len(proposals) != num_images:
        raise ValueError(
            f"proposals: expected {num_images} entries (one per image), got {len(proposals)}"
        )
    for i, p in enumerate(proposals):
        check_tensor(p, f"proposals[{i}]")
        if p.dim() != 2 or p.shape[1] < 4:
            raise ValueError(f"proposals[{i}]: expected shape [N, 4], got {tuple(p.shape)}")
        check_boxes(p[:, :4], f"proposals[{i}]")
