"""RPN: the class-agnostic anchor head of Faster R-CNN, its losses, proposals and positives.

Per level one 3x3 conv (+ ReLU) then two 1x1 convs: ``A`` objectness logits and ``A * 4``
deltas per location. Training follows mmdetection's ``RPNHead`` (an ``AnchorHead`` with
``num_classes = 1``):

* targets: anchors of all levels, ``MaxIoUAssigner(pos 0.7, neg 0.3, min_pos_iou 0.3,
  match_low_quality)``, then ``RandomSampler(256, pos_fraction 0.5, add_gt_as_proposals
  False)``: at most 128 positives, the rest negatives, per image. Every GT counts as class 0
  (foreground), label 1 is background;
* ``loss_rpn_cls``: sigmoid cross-entropy over the sampled anchors; ``loss_rpn_bbox``: L1 on
  deltas (stds 1) of the sampled positives; both divided by ``avg_factor`` = sum over images
  of ``max(P, 1) + max(Q, 1)`` (sampled positives and negatives).

Proposals (``predict_by_feat``; no gradient flows into them), per image:

1. per level: sigmoid scores; if ``0 < nms_pre < n`` keep the ``nms_pre`` best anchors;
2. decode them (clipped to ``img_shape``), optionally rescale, drop boxes whose width or
   height is not above ``min_bbox_size`` (when ``min_bbox_size >= 0``);
3. NMS at ``iou_threshold`` separately per level (``batched_nms`` with the level as class),
   sorted by score, keep ``max_per_img``; labels are all 0.

mmdetection uses ``nms_pre=2000`` while training Faster R-CNN (Co-DETR: 4000) and 1000 at
test time, NMS 0.7 and 1000 proposals in both.

``loss_and_targets`` and ``loss_and_predict`` also return the ``AnchorTargets`` the loss
used (its ``sampling_results`` hold the sampled positive anchors and their GTs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.anchor_head import AnchorHead, AnchorTargets
from labkit.heads.dense_head import (
    TestConfig,
    check_gt_instances,
    flatten_levels,
    make_test_cfg,
    scale_factor_wh,
)
from labkit.losses import CrossEntropyLoss, L1Loss
from labkit.nn.init import normal_init

# mmdetection's faster_rcnn_r50_fpn settings.
RPN_TEST_CFG = {"nms_pre": 1000, "iou_threshold": 0.7, "max_per_img": 1000, "min_bbox_size": 0}
# The RPN is class-agnostic but reports its positives' classes: any label >= 0 is accepted.
_ANY_CLASS = 1 << 62


def rpn_anchor_generator(strides: tuple[int, ...] = (4, 8, 16, 32, 64)) -> AnchorGenerator:
    """Faster R-CNN's RPN anchors: one scale (8 x stride) and ratios 0.5, 1, 2 per location."""
    return AnchorGenerator(strides=list(strides), ratios=[0.5, 1.0, 2.0], scales=[8])


def _check_rpn_gt(batch: dict) -> None:
    """Check a batch's boxes (and labels, when present: any class id >= 0 is fine for the RPN)."""
    boxes = batch["gt_bboxes"]
    labels = batch.get("gt_labels")
    if labels is None and isinstance(boxes, (list, tuple)):
        labels = [torch.zeros(len(b), dtype=torch.long) for b in boxes]
    check_gt_instances(boxes, labels, _ANY_CLASS, batch.get("gt_bboxes_ignore"), batch["img_metas"])


def make_proposal_cfg(value: TestConfig | dict | None, **defaults: object) -> TestConfig:
    """A proposal ``TestConfig`` (``score_thr`` is not used by the RPN) from a dict or ``None``."""
    return make_test_cfg(value, **{**RPN_TEST_CFG, "score_thr": 0.0, **defaults})


class RPNHead(AnchorHead):
    """Region proposal network head (Ren et al. 2015), mmdetection's ``RPNHead``.

    Args:
        in_channels: channels of every input level.
        feat_channels: width of the shared 3x3 conv.
        num_convs: number of 3x3 conv + ReLU layers before the two 1x1 predictors.
        anchor_generator: default ``rpn_anchor_generator()`` (strides 4..64, scale 8, 3 ratios).
        bbox_coder: default ``DeltaXYWHBBoxCoder`` with means 0 / stds 1.
        assigner: default ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)``.
        sampler: default ``RandomSampler(256, 0.5, add_gt_as_proposals=False)``.
        loss_cls: default sigmoid ``CrossEntropyLoss``. loss_bbox: default ``L1Loss``.
        test_cfg: proposal settings at test time (nms_pre 1000, NMS 0.7, 1000 proposals).
        train_proposal_cfg: proposal settings while training (nms_pre 2000, else the same).
        allowed_border: anchors crossing the image border by more than this are not
            trained (``-1``, mmdetection's config: all valid anchors are).

    Shapes: ``forward(feats)`` with ``feats[l]: Tensor[B, in_channels, H_l, W_l]`` returns
    ``(cls_scores, bbox_preds)``: ``cls_scores[l]: Tensor[B, A, H_l, W_l]`` objectness logits
    and ``bbox_preds[l]: Tensor[B, A*4, H_l, W_l]``. The head accepts any list of maps whose
    strides match the anchor generator's (an FPN, or Co-DETR's encoder memory as maps).
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int = 256,
        num_convs: int = 1,
        *,
        anchor_generator: AnchorGenerator | None = None,
        bbox_coder: object | None = None,
        assigner: object | None = None,
        sampler: object | None = None,
        loss_cls: nn.Module | None = None,
        loss_bbox: nn.Module | None = None,
        test_cfg: TestConfig | dict | None = None,
        train_proposal_cfg: TestConfig | dict | None = None,
        allowed_border: float = -1,
    ) -> None:
        from labkit.assigners import MaxIoUAssigner, RandomSampler

        if not isinstance(num_convs, int) or num_convs < 1:
            raise ValueError(f"num_convs: expected a positive int, got {num_convs!r}")
        super().__init__(
            1,
            anchor_generator=anchor_generator or rpn_anchor_generator(),
            bbox_coder=bbox_coder or DeltaXYWHBBoxCoder((0.0,) * 4, (1.0,) * 4),
            assigner=assigner or MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True),
            sampler=sampler or RandomSampler(256, 0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
            loss_cls=loss_cls or CrossEntropyLoss(use_sigmoid=True, loss_weight=1.0),
            loss_bbox=loss_bbox or L1Loss(loss_weight=1.0),
            reg_decoded_bbox=False,
            allowed_border=allowed_border,
            test_cfg=make_proposal_cfg(test_cfg),
        )
        # mmdetection's rpn_proposal: twice the test-time candidates per level while training
        self.train_proposal_cfg = make_proposal_cfg(train_proposal_cfg, nms_pre=2000)
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        layers = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
        self.rpn_conv = nn.Sequential(*layers)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_base_priors * self.cls_out_channels, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_base_priors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                normal_init(m, std=0.01)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(objectness[B, A, H, W], deltas[B, A*4, H, W])``, as two lists."""
        if len(feats) != self.prior_generator.num_levels:
            raise ValueError(
                f"feats: expected {self.prior_generator.num_levels} levels (the anchor "
                f"generator's strides), got {len(feats)}"
            )
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = self.rpn_conv(x)
            cls_scores.append(self.rpn_cls(x))
            bbox_preds.append(self.rpn_reg(x))
        return cls_scores, bbox_preds

    # ------------------------------------------------------------------ training
    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor] | None = None,
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], AnchorTargets]:
        """``({"loss_rpn_cls", "loss_rpn_bbox"}, targets)`` (see the module docstring);
        ``batch_gt_labels`` is not used: every GT is foreground for the RPN."""
        # Every GT is class 0 for the RPN (mmdetection zeroes the labels before the head).
        t = self.targets_for(
            cls_scores, batch_gt_bboxes, None, batch_img_metas, batch_gt_bboxes_ignore
        )
        cls_score = flatten_levels(cls_scores, 1).reshape(-1, 1)
        bbox_pred = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        loss_cls = self.loss_cls(
            cls_score, t.labels.reshape(-1), t.label_weights.reshape(-1), avg_factor=t.avg_factor
        )
        loss_bbox = self.loss_bbox(
            bbox_pred,
            t.bbox_targets.reshape(-1, 4),
            t.bbox_weights.reshape(-1, 4),
            avg_factor=t.avg_factor,
        )
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}, t

    def loss_and_targets(
        self, feats: list[Tensor], batch: dict
    ) -> tuple[dict[str, Tensor], AnchorTargets]:
        """Run the RPN on ``feats[l]: Tensor[B, C, H_l, W_l]``; losses and the targets they used.

        ``batch`` needs ``gt_bboxes`` and ``img_metas`` (``gt_labels`` are optional: the RPN is
        class-agnostic). No input checks here (the detector validated the batch).
        """
        cls_scores, bbox_preds = self(feats)
        return self.loss_and_targets_by_feat(
            cls_scores,
            bbox_preds,
            batch_gt_bboxes=batch["gt_bboxes"],
            batch_img_metas=batch["img_metas"],
            batch_gt_bboxes_ignore=batch.get("gt_bboxes_ignore"),
        )

    def loss(self, feats: list[Tensor], batch: dict) -> dict[str, Tensor]:
        """``{"loss_rpn_cls", "loss_rpn_bbox"}`` of a collated ``batch``, its boxes checked first."""
        _check_rpn_gt(batch)
        return self.loss_and_targets(feats, batch)[0]

    def loss_and_predict(
        self, feats: list[Tensor], batch: dict, proposal_cfg: TestConfig | dict | None = None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], AnchorTargets]:
        """Losses, proposals and targets in one pass (what a two-stage detector trains with).

        Args:
            feats: per level ``Tensor[B, C, H_l, W_l]``.
            batch: ``labkit.data.collate`` output (``gt_bboxes``, ``img_metas``, optional
                ``gt_labels`` and ``gt_bboxes_ignore``), already validated by the detector.
            proposal_cfg: overrides ``self.train_proposal_cfg``.

        Returns:
            ``(losses, proposals, targets)``: ``{"loss_rpn_cls", "loss_rpn_bbox"}``; per image
            ``{"boxes": Tensor[N_i, 4], "scores": Tensor[N_i], "labels": zeros}`` (detached,
            resized-image pixels); the ``AnchorTargets`` of the loss.
        """
        metas = batch["img_metas"]
        cls_scores, bbox_preds = self(feats)
        losses, targets = self.loss_and_targets_by_feat(
            cls_scores,
            bbox_preds,
            batch_gt_bboxes=batch["gt_bboxes"],
            batch_img_metas=metas,
            batch_gt_bboxes_ignore=batch.get("gt_bboxes_ignore"),
        )
        cfg = self.train_proposal_cfg if proposal_cfg is None else make_proposal_cfg(proposal_cfg)
        proposals = self.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=metas, cfg=cfg)
        return losses, proposals, targets

    # ----------------------------------------------------------------- inference
    def _predict_by_feat_single(
        self,
        cls_score_list: list[Tensor],
        bbox_pred_list: list[Tensor],
        score_factor_list: list[Tensor | None],
        mlvl_priors: list[Tensor],
        img_meta: dict,
        cfg: TestConfig,
        rescale: bool = False,
        with_nms: bool = True,
    ) -> dict[str, Tensor]:
        """Proposals of one image (steps 1-3 of the module docstring).

        ``cls_score_list[l]: Tensor[A, H_l, W_l]``, ``bbox_pred_list[l]: Tensor[A*4, H_l, W_l]``,
        ``mlvl_priors[l]: Tensor[H_l*W_l*A, 4]``. Returns ``{"boxes", "scores", "labels"}``.
        """
        mlvl_preds, mlvl_anchors, mlvl_scores, level_ids = [], [], [], []
        for level, (cls_score, bbox_pred, priors) in enumerate(
            zip(cls_score_list, bbox_pred_list, mlvl_priors, strict=True)
        ):
            if cls_score.shape[-2:] != bbox_pred.shape[-2:]:
                raise ValueError(
                    f"bbox_preds: level size {tuple(bbox_pred.shape[-2:])} differs from "
                    f"cls_scores {tuple(cls_score.shape[-2:])}"
                )
            scores = cls_score.permute(1, 2, 0).reshape(-1).sigmoid()
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            if 0 < cfg.nms_pre < scores.shape[0]:
                scores, order = scores.sort(descending=True)
                scores, order = scores[: cfg.nms_pre], order[: cfg.nms_pre]
                bbox_pred, priors = bbox_pred[order], priors[order]
            mlvl_preds.append(bbox_pred)
            mlvl_anchors.append(priors)
            mlvl_scores.append(scores)
            level_ids.append(scores.new_full((scores.shape[0],), level, dtype=torch.long))
        boxes = self.bbox_coder.decode(
            torch.cat(mlvl_anchors),
            torch.cat(mlvl_preds),
            max_shape=tuple(img_meta["img_shape"][:2]),
        )
        scores, level_ids = torch.cat(mlvl_scores), torch.cat(level_ids)
        if rescale:
            sw, sh = scale_factor_wh(img_meta)
            boxes = boxes * boxes.new_tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh])
        if cfg.min_bbox_size >= 0:
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
            if not valid.all():
                boxes, scores, level_ids = boxes[valid], scores[valid], level_ids[valid]
        if boxes.numel() > 0:
            # NMS per level: a large box of one level never suppresses the proposals of another.
            keep = batched_nms(boxes, scores, level_ids, cfg.iou_threshold)[: cfg.max_per_img]
            boxes, scores = boxes[keep], scores[keep]
        return {
            "boxes": boxes,
            "scores": scores,
            "labels": scores.new_zeros(scores.shape[0], dtype=torch.long),
        }
