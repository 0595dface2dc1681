"""PAA (Kim & Lee 2020): ATSS-like head with an IoU branch, loss-based GMM re-assignment, score voting.

Training, as mmdetection's ``PAAHead``:

1. first stage: ``MaxIoUAssigner(pos 0.1, neg 0.1, min_pos_iou 0)`` gives generous positives
   (regression targets = the GT boxes, ``reg_decoded_bbox``);
2. ``get_pos_loss``: each positive's own loss, focal (summed over classes) + GIoU of its
   decoded box, both unnormalised (``candidate_losses`` returns these per image);
3. ``labkit.assigners.paa.paa_reassign`` fits, per GT, a two-component GMM to the losses of its
   ``topk``-per-level best candidates and keeps only the low-loss mode as positives;
4. losses: focal over all anchors / ``max(num_pos, num_images)``; GIoU of positives weighted by
   the IoU of their (detached) decoded box with the target, / the sum of those IoUs; BCE of
   the IoU branch against that IoU, / ``num_pos``.

``loss_and_targets`` returns, next to the losses, a ``PAATargets``: the ``AnchorTargets`` of
step 1 with labels, weights and positives replaced by those of step 3 (what the losses used),
plus the first stage itself and the candidates the GMMs were fitted to.

Inference: per level top-``nms_pre`` by ``max_c sqrt(p_c * iou)``, decode, rescale, NMS on the
scores ``sqrt(p_c * sigmoid(iou_pred))`` above ``score_thr``, then score voting: each kept box
becomes the average of same-class candidate boxes overlapping it, weighted by
``exp(-(1 - IoU)^2 / 0.025) * score``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from labkit.assigners.paa import paa_reassign
from labkit.boxes import bbox_overlaps
from labkit.heads.anchor_head import AnchorHead, AnchorTargets
from labkit.heads.atss import ATSSHead
from labkit.heads.dense_head import TestConfig, flatten_levels, scale_factor_wh
from labkit.losses import CrossEntropyLoss, GIoULoss

EPS = 1e-12


@dataclass
class PAACandidates:
    """First-stage positives of one image and their losses (what PAA's GMM is fitted to).

    Attributes:
        anchors: Tensor[N, 4] all anchors (levels concatenated).
        num_level_anchors: anchors per level.
        labels: LongTensor[N] first-stage (MaxIoU) labels, ``num_classes`` = background.
        pos_inds: LongTensor[P] positive anchor indices (ascending).
        pos_gt_inds: LongTensor[P] 0-based GT index of each positive.
        pos_losses: Tensor[P] focal (summed over classes) + GIoU loss of each positive.
    """

    anchors: Tensor
    num_level_anchors: list[int]
    labels: Tensor
    pos_inds: Tensor
    pos_gt_inds: Tensor
    pos_losses: Tensor


@dataclass
class PAATargets(AnchorTargets):
    """PAA's training targets after the re-assignment: the labels and positives the loss used.

    Every ``AnchorTargets`` field is over all ``N`` anchors of all levels, ``B`` images:

    Attributes:
        anchors: Tensor[N, 4].
        labels: LongTensor[B, N] after re-assignment (first-stage positives that the GMM
            rejected are background ``C``).
        label_weights: Tensor[B, N] (the re-assignment ignores nothing: first-stage weights).
        bbox_targets: Tensor[B, N, 4] the assigned GT boxes on the positives, zeros elsewhere.
        bbox_weights: Tensor[B, N, 4] 1 on the positives.
        avg_factor: ``max(sum(num_pos), B)``, the classification loss normaliser.
        num_pos, num_neg: per image positives / negatives after re-assignment.
        num_level_priors: anchors per level.
        pos_inds: per image LongTensor[P_i] positive anchor indices (ascending), the rows of
            ``labels[i]`` in ``0..C-1``; ``sum_i P_i`` is the ``num_pos`` of the IoU loss.
        pos_gt_inds: per image LongTensor[P_i] 0-based GT index of each positive.
        sampling_results: empty (the first stage's are in ``first_stage``).
        first_stage: the MaxIoU ``AnchorTargets`` before re-assignment.
        candidates: per image ``PAACandidates`` (first-stage positives and their losses).
    """

    first_stage: AnchorTargets | None = None
    candidates: list[PAACandidates] = field(default_factory=list)


def score_voting(
    det_bboxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    mlvl_bboxes: Tensor,
    mlvl_nms_scores: Tensor,
    score_thr: float,
    sigma: float = 0.025,
) -> tuple[Tensor, Tensor, Tensor]:
    """PAA's score voting: refine each kept box with the candidates of its class around it.

    A candidate is any (box, class) whose score is above ``score_thr``; for detection ``d`` of
    class ``c`` every class-``c`` candidate with IoU > 0.01 votes with weight
    ``exp(-(1 - IoU)^2 / sigma) * score``; the box becomes the weighted mean, the score stays.
    As in mmdetection the output is grouped by class (ascending), detections in their input
    order within a class.

    Args:
        det_bboxes: Tensor[D, 4] boxes after NMS; det_scores: Tensor[D]; det_labels: LongTensor[D].
        mlvl_bboxes: Tensor[M, 4] all boxes before NMS.
        mlvl_nms_scores: Tensor[M, C] their per-class scores (those NMS used).
        score_thr: candidate threshold.

    Returns:
        ``(boxes[D, 4], scores[D], labels[D])``.
    """
    candidate_mask = mlvl_nms_scores > score_thr
    cand_inds, cand_labels = candidate_mask.nonzero(as_tuple=True)
    cand_bboxes = mlvl_bboxes[cand_inds]
    cand_scores = mlvl_nms_scores[candidate_mask]
    boxes, scores, labels = [], [], []
    for cls in range(mlvl_nms_scores.shape[1]):
        in_cls = cand_labels == cls
        if not in_cls.any():
            continue
        det_in_cls = det_labels == cls
        ious = bbox_overlaps(det_bboxes[det_in_cls], cand_bboxes[in_cls])  # [D_c, M_c]
        # candidates with IoU <= 0.01 do not vote (a zero weight, same as mmdetection's mask)
        weights = torch.exp(-((1 - ious) ** 2) / sigma) * cand_scores[in_cls][None]
        weights = weights * (ious > 0.01)
        boxes.append((weights @ cand_bboxes[in_cls]) / weights.sum(1, keepdim=True))
        scores.append(det_scores[det_in_cls])
        labels.append(det_labels[det_in_cls])
    if not boxes:
        return det_bboxes[:0], det_scores[:0], det_labels[:0]
    return torch.cat(boxes), torch.cat(scores), torch.cat(labels)


class PAAHead(ATSSHead):
    """PAA head: ATSS's towers, classifier and scaled box deltas; the third branch predicts IoU.

    (The IoU conv is ``atss_centerness``, as in mmdetection, where PAAHead subclasses ATSSHead.)
    Defaults are mmdetection's ``paa_r50_fpn_1x``: ATSS anchors and coder, the MaxIoU first
    stage above, focal loss, ``GIoULoss(loss_weight=1.3)``, IoU BCE ``loss_weight=0.5``,
    ``topk=9``, ``covariance_type="diag"``, score voting; test: nms_pre 1000, score_thr 0.05,
    NMS 0.6, 100 per image.

    Args:
        num_classes, in_channels, feat_channels, stacked_convs: as ``ATSSHead``.
        topk: candidates per level per GT for the GMM.
        covariance_type: ``"full" | "tied" | "diag" | "spherical"`` (see ``labkit.assigners.gmm``).
        score_voting: refine boxes by score voting at inference.
        reassign_backend: ``"torch"`` (batched EM) or ``"sklearn"`` (reference).
        **kwargs: ``ATSSHead`` overrides (``assigner``, ``loss_bbox``, ``loss_centerness`` = IoU loss...).

    Shapes: ``forward(feats)`` returns ``(cls_scores, bbox_preds, iou_preds)``, per level
    ``[B, A*C, H, W]``, ``[B, A*4, H, W]``, ``[B, A, H, W]``.

    Targets: ``loss_and_targets`` returns a ``PAATargets`` (``labels [B, N]``, ``bbox_targets
    [B, N, 4]``, per image ``pos_inds [P_i]`` after the GMM re-assignment; ``first_stage``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        *,
        topk: int = 9,
        covariance_type: str = "diag",
        score_voting: bool = True,
        reassign_backend: str = "torch",
        **kwargs: object,
    ) -> None:
        from labkit.assigners import MaxIoUAssigner

        kwargs.setdefault("assigner", MaxIoUAssigner(0.1, 0.1, min_pos_iou=0.0, ignore_iof_thr=-1))
        kwargs.setdefault("loss_bbox", GIoULoss(loss_weight=1.3))
        kwargs.setdefault("loss_centerness", CrossEntropyLoss(use_sigmoid=True, loss_weight=0.5))
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, **kwargs)
        self.topk = topk
        self.covariance_type = covariance_type
        self.with_score_voting = score_voting
        self.reassign_backend = reassign_backend

    def assign_priors(
        self,
        anchors: Tensor,
        num_level_anchors: list[int],
        gt_bboxes: Tensor,
        gt_labels: Tensor | None,
        gt_bboxes_ignore: Tensor | None,
    ) -> object:
        """The first stage is a plain MaxIoU assignment (no per-level counts)."""
        return AnchorHead.assign_priors(
            self, anchors, num_level_anchors, gt_bboxes, gt_labels, gt_bboxes_ignore
        )

    # --------------------------------------------------------------------- loss
    def get_pos_loss(
        self,
        anchors: Tensor,
        cls_score: Tensor,
        bbox_pred: Tensor,
        labels: Tensor,
        label_weights: Tensor,
        bbox_targets: Tensor,
        bbox_weights: Tensor,
        pos_inds: Tensor,
    ) -> Tensor:
        """Unnormalised loss of each first-stage positive of one image: ``Tensor[P]``.

        ``anchors [N, 4]``, ``cls_score [N, C]``, ``bbox_pred [N, 4]``, ``labels [N]``,
        ``label_weights [N]``, ``bbox_targets [N, 4]`` (GT boxes), ``bbox_weights [N, 4]``,
        ``pos_inds [P]``. Focal loss summed over classes + GIoU of the decoded box (both with
        their loss weights, ``avg_factor=1``, no reduction).
        """
        if len(pos_inds) == 0:
            return cls_score.new_zeros((0,))
        pos_decoded = self.bbox_coder.decode(anchors[pos_inds], bbox_pred[pos_inds])
        loss_cls = self.loss_cls(
            cls_score[pos_inds],
            labels[pos_inds],
            label_weights[pos_inds],
            avg_factor=1.0,
            reduction_override="none",
        )
        loss_bbox = self.loss_bbox(
            pos_decoded,
            bbox_targets[pos_inds],
            bbox_weights[pos_inds],
            avg_factor=1.0,
            reduction_override="none",
        )
        return loss_bbox + loss_cls.sum(-1)

    def candidate_losses(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        iou_preds: list[Tensor] | None = None,
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> list[PAACandidates]:
        """First-stage positives and their per-anchor losses, one ``PAACandidates`` per image.

        Typical use (notebook 02): ``outs = model(batch["img"])`` then
        ``model.head.candidate_losses(*outs, batch_gt_bboxes=..., batch_gt_labels=...,
        batch_img_metas=...)``; feed ``pos_losses``/``pos_inds``/``pos_gt_inds`` to
        ``labkit.assigners.paa.paa_select`` to see the GMMs. ``iou_preds`` is unused (losses
        do not depend on it) and accepted so ``*outs`` can be passed.
        """
        t = self.targets_for(
            cls_scores, batch_gt_bboxes, batch_gt_labels, batch_img_metas, batch_gt_bboxes_ignore
        )
        return self._candidates(t, cls_scores, bbox_preds)

    def _candidates(self, t, cls_scores, bbox_preds) -> list[PAACandidates]:
        cls_flat = flatten_levels(cls_scores, self.cls_out_channels)  # [B, N, C]
        bbox_flat = flatten_levels(bbox_preds, 4)  # [B, N, 4]
        out = []
        for i in range(cls_flat.shape[0]):
            losses = self.get_pos_loss(
                t.anchors,
                cls_flat[i],
                bbox_flat[i],
                t.labels[i],
                t.label_weights[i],
                t.bbox_targets[i],
                t.bbox_weights[i],
                t.pos_inds[i],
            )
            out.append(
                PAACandidates(
                    t.anchors,
                    t.num_level_priors,
                    t.labels[i],
                    t.pos_inds[i],
                    t.pos_gt_inds[i],
                    losses,
                )
            )
        return out

    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        iou_preds: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], PAATargets]:
        """``({"loss_cls", "loss_bbox", "loss_iou"}, targets)`` after PAA re-assignment (module
        docstring); ``targets`` is the ``PAATargets`` whose positives the losses used."""
        t = self.targets_for(
            cls_scores, batch_gt_bboxes, batch_gt_labels, batch_img_metas, batch_gt_bboxes_ignore
        )
        labels, label_weights, bbox_weights, num_pos = [], [], [], 0
        # the candidate losses only steer the assignment: no gradient flows through them
        with torch.no_grad():
            candidates = self._candidates(t, cls_scores, bbox_preds)
            for i, cand in enumerate(candidates):
                lab, lw, bw, n = paa_reassign(
                    cand.pos_losses,
                    t.labels[i],
                    t.label_weights[i],
                    t.bbox_weights[i],
                    cand.pos_inds,
                    cand.pos_gt_inds,
                    t.num_level_priors,
                    num_classes=self.num_classes,
                    topk=self.topk,
                    covariance_type=self.covariance_type,
                    backend=self.reassign_backend,
                )
                labels.append(lab)
                label_weights.append(lw)
                bbox_weights.append(bw)
                num_pos += int(n)
        num_imgs = len(batch_img_metas)
        targets = self._reassigned_targets(t, labels, label_weights, bbox_weights, candidates)
        labels = torch.cat(labels)
        label_weights = torch.cat(label_weights)
        cls_score = flatten_levels(cls_scores, self.cls_out_channels).reshape(
            -1, self.cls_out_channels
        )
        bbox_pred = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        iou_pred = flatten_levels(iou_preds, 1).reshape(-1, 1)
        bbox_targets = t.bbox_targets.reshape(-1, 4)
        anchors = t.anchors.repeat(num_imgs, 1)

        pos = ((labels >= 0) & (labels < self.num_classes)).nonzero().reshape(-1)
        # max(num_pos, num_imgs) avoids dividing by zero without positives
        loss_cls = self.loss_cls(
            cls_score, labels, label_weights, avg_factor=max(num_pos, num_imgs)
        )
        if num_pos:
            pos_decoded = self.bbox_coder.decode(anchors[pos], bbox_pred[pos])
            pos_targets = bbox_targets[pos]
            iou_target = bbox_overlaps(pos_decoded.detach(), pos_targets, is_aligned=True)
            loss_iou = self.loss_centerness(
                iou_pred[pos], iou_target.unsqueeze(-1), avg_factor=num_pos
            )
            loss_bbox = self.loss_bbox(
                pos_decoded, pos_targets, iou_target.clamp(min=EPS), avg_factor=iou_target.sum()
            )
        else:
            loss_iou = iou_pred.sum() * 0
            loss_bbox = bbox_pred.sum() * 0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou}, targets

    def _reassigned_targets(
        self,
        t: AnchorTargets,
        labels: list[Tensor],
        label_weights: list[Tensor],
        bbox_weights: list[Tensor],
        candidates: list[PAACandidates],
    ) -> PAATargets:
        """``PAATargets`` from the first stage ``t`` and the per-image re-assigned ``[N]`` tensors."""
        labels_b = torch.stack(labels)
        label_weights_b = torch.stack(label_weights)
        bbox_weights_b = torch.stack(bbox_weights)
        pos_inds, pos_gt_inds, num_pos, num_neg = [], [], [], []
        for i, lab in enumerate(labels):
            pos = ((lab >= 0) & (lab < self.num_classes)).nonzero().view(-1)
            # the re-assigned positives are a subset of the first stage's (both ascending)
            kept = torch.isin(t.pos_inds[i], pos)
            pos_inds.append(pos)
            pos_gt_inds.append(t.pos_gt_inds[i][kept])
            num_pos.append(int(pos.numel()))
            num_neg.append(int((label_weights[i] > 0).sum()) - int(pos.numel()))
        is_pos = (labels_b >= 0) & (labels_b < self.num_classes)
        return PAATargets(
            anchors=t.anchors,
            labels=labels_b,
            label_weights=label_weights_b,
            bbox_targets=torch.where(is_pos[..., None], t.bbox_targets, 0.0),
            bbox_weights=bbox_weights_b,
            avg_factor=float(max(sum(num_pos), len(labels))),
            num_pos=num_pos,
            num_neg=num_neg,
            num_level_priors=t.num_level_priors,
            pos_inds=pos_inds,
            pos_gt_inds=pos_gt_inds,
            first_stage=t,
            candidates=candidates,
        )

    # ---------------------------------------------------------------- inference
    def _predict_by_feat_single(
        self,
        cls_score_list: list[Tensor],
        bbox_pred_list: list[Tensor],
        score_factor_list: list[Tensor],
        mlvl_priors: list[Tensor],
        img_meta: dict,
        cfg: TestConfig,
        rescale: bool = False,
        with_nms: bool = True,
    ) -> dict[str, Tensor]:
        """Per level: top-``nms_pre`` anchors by ``max_c sqrt(p_c * iou)`` (no threshold yet), decode."""
        if not with_nms:
            raise ValueError("with_nms: PAA's post-process always runs NMS (got False)")
        mlvl_bboxes, mlvl_scores, mlvl_ious = [], [], []
        for cls_score, bbox_pred, iou_pred, priors in zip(
            cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors, strict=True
        ):
            scores = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels).sigmoid()
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            iou_pred = iou_pred.permute(1, 2, 0).reshape(-1).sigmoid()
            if 0 < cfg.nms_pre < scores.shape[0]:
                max_scores, _ = (scores * iou_pred[:, None]).sqrt().max(dim=1)
                _, topk_inds = max_scores.topk(cfg.nms_pre)
                priors, bbox_pred = priors[topk_inds], bbox_pred[topk_inds]
                scores, iou_pred = scores[topk_inds], iou_pred[topk_inds]
            mlvl_bboxes.append(
                self._decode_bboxes(priors, bbox_pred, tuple(img_meta["img_shape"][:2]))
            )
            mlvl_scores.append(scores)
            mlvl_ious.append(iou_pred)
        results = {
            "boxes": torch.cat(mlvl_bboxes),
            "scores": torch.cat(mlvl_scores),
            "score_factors": torch.cat(mlvl_ious),
        }
        return self._bbox_post_process(results, cfg, rescale, with_nms, img_meta)

    def _bbox_post_process(
        self,
        results: dict[str, Tensor],
        cfg: TestConfig,
        rescale: bool = False,
        with_nms: bool = True,
        img_meta: dict | None = None,
    ) -> dict[str, Tensor]:
        """Rescale, ``sqrt(p * iou)`` scores, multi-class NMS, ``max_per_img``, score voting.

        ``results["scores"]`` is ``Tensor[M, C]`` here (all classes of each kept anchor).
        """
        boxes = results["boxes"]
        if rescale:
            sw, sh = scale_factor_wh(img_meta)
            boxes = boxes / boxes.new_tensor([sw, sh, sw, sh])
        nms_scores = (results["scores"] * results["score_factors"][:, None]).sqrt()  # [M, C]
        # multiclass NMS: every (box, class) pair above score_thr is a candidate
        inds, labels = (nms_scores > cfg.score_thr).nonzero(as_tuple=True)
        det_boxes, det_scores = boxes[inds], nms_scores[inds, labels]
        if det_boxes.numel() > 0:
            keep = batched_nms(det_boxes, det_scores, labels, cfg.iou_threshold)
            if cfg.max_per_img > 0:
                keep = keep[: cfg.max_per_img]
            det_boxes, det_scores, labels = det_boxes[keep], det_scores[keep], labels[keep]
        if self.with_score_voting and len(det_boxes) > 0:
            det_boxes, det_scores, labels = score_voting(
                det_boxes, det_scores, labels, boxes, nms_scores, cfg.score_thr
            )
        return {"boxes": det_boxes, "scores": det_scores, "labels": labels}
