"""Anchor-based dense head: anchors, per-image targets (assign, sample, unmap) and the RetinaNet-style loss.

The target pipeline follows mmdetection's ``AnchorHead`` step by step, per image:

1. all anchors of all levels are concatenated (``[N, 4]``) with their valid flags;
2. ``anchor_inside_flags`` keeps anchors inside the image (``allowed_border``; ``-1`` keeps all
   valid ones), only those are assigned;
3. the assigner labels them (``gt_inds``), the sampler picks positives/negatives;
4. positives get the GT label, weight 1 (or ``pos_weight``) and box targets (encoded deltas, or
   the GT boxes themselves when ``reg_decoded_bbox``); negatives get weight 1;
5. ``unmap`` scatters everything back to all ``N`` anchors (outside ones: background, weight 0).

``avg_factor`` is mmdetection's: the sum over images of ``max(num_pos, 1)`` (plus
``max(num_neg, 1)`` when a real sampler is used), so an image without objects still counts 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from labkit.anchors import anchor_inside_flags
from labkit.heads.dense_head import DenseHead, TestConfig, flatten_levels, images_to_levels, unmap


@dataclass
class AnchorTargets:
    """Training targets of a batch, every tensor over all ``N`` anchors of all levels.

    Attributes:
        anchors: Tensor[N, 4] the anchors (the same grid for every image).
        labels: LongTensor[B, N], ``num_classes`` = background.
        label_weights: Tensor[B, N] classification weights (0 = ignored / outside).
        bbox_targets: Tensor[B, N, 4] encoded deltas (or GT boxes when ``reg_decoded_bbox``).
        bbox_weights: Tensor[B, N, 4] 1 on positives.
        avg_factor: mmdetection's normaliser (see the module docstring).
        num_pos, num_neg: per image counts of positives / negatives (without the ``max(., 1)``).
        num_level_priors: anchors per level, to split the ``N`` axis back into levels.
        pos_inds: per image LongTensor[P_i] positive anchor indices into ``N``.
        pos_gt_inds: per image LongTensor[P_i] 0-based GT index of each positive.
        sampling_results: per image ``SamplingResult`` (indices there are into the inside anchors).
    """

    anchors: Tensor
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    avg_factor: float
    num_pos: list[int]
    num_neg: list[int]
    num_level_priors: list[int]
    pos_inds: list[Tensor] = field(default_factory=list)
    pos_gt_inds: list[Tensor] = field(default_factory=list)
    sampling_results: list = field(default_factory=list)

    def per_level(self, name: str) -> list[Tensor]:
        """One target split by level: ``[B, N, ...] -> list of [B, N_l, ...]``."""
        return images_to_levels(list(getattr(self, name).unbind(0)), self.num_level_priors)


class AnchorHead(DenseHead):
    """Anchor-based head: target assignment and the focal + box-regression loss of RetinaNet.

    Subclasses build layers and ``forward``; ATSS/PAA override ``loss_and_targets_by_feat``
    and reuse ``get_anchors`` / ``get_targets`` / ``targets_for``.

    Training targets: ``loss_and_targets(feats, batch)`` (and ``loss_and_targets_by_feat``)
    return, next to the losses, the ``AnchorTargets`` the loss was computed from, i.e.
    ``targets_for(...)``'s result: ``anchors [N, 4]``, ``labels [B, N]``, ``label_weights
    [B, N]``, ``bbox_targets [B, N, 4]``, ``bbox_weights [B, N, 4]``, per image ``pos_inds``
    ``[P_i]`` and ``pos_gt_inds [P_i]``, ``avg_factor`` (the loss normaliser), ``num_pos``...

    Args:
        num_classes: foreground classes ``C``.
        anchor_generator: ``labkit.anchors.AnchorGenerator``.
        bbox_coder: e.g. ``DeltaXYWHBBoxCoder``.
        assigner: ``MaxIoUAssigner`` / ``ATSSAssigner`` (``assign_priors`` adapts the call).
        loss_cls: module ``(pred[N, C], labels[N], weight[N], avg_factor=...)``.
        loss_bbox: module ``(pred[N, 4], target[N, 4], weight, avg_factor=...)``.
        sampler: ``None`` = ``PseudoSampler`` (no sampling: avg_factor counts positives only).
        reg_decoded_bbox: regress decoded boxes (IoU-type losses) instead of deltas.
        allowed_border: see ``anchor_inside_flags``; ``-1`` (mmdetection's configs) keeps all.
        pos_weight: classification weight of positives; ``<= 0`` means 1.
        test_cfg: inference settings.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        anchor_generator: object,
        bbox_coder: object,
        assigner: object,
        loss_cls: torch.nn.Module,
        loss_bbox: torch.nn.Module,
        sampler: object | None = None,
        reg_decoded_bbox: bool = False,
        allowed_border: float = -1,
        pos_weight: float = -1.0,
        test_cfg: TestConfig | None = None,
    ) -> None:
        super().__init__(num_classes, anchor_generator, bbox_coder, test_cfg)
        from labkit.assigners import PseudoSampler

        self.sampling = sampler is not None and not isinstance(sampler, PseudoSampler)
        self.sampler = sampler if sampler is not None else PseudoSampler()
        self.assigner = assigner
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.reg_decoded_bbox = reg_decoded_bbox
        self.allowed_border = allowed_border
        self.pos_weight = pos_weight

    @property
    def anchor_generator(self) -> object:
        """The prior generator (mmdetection's older name)."""
        return self.prior_generator

    # ------------------------------------------------------------------ targets
    def get_anchors(
        self, featmap_sizes: list[tuple[int, int]], batch_img_metas: list[dict], device: object
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-level anchors (shared by all images) and per-image valid flags over all levels.

        Returns:
            ``(mlvl_anchors, valid_flags)``: list of Tensor[N_l, 4]; list (per image) of BoolTensor[N].
        """
        mlvl_anchors = self.prior_generator.grid_priors(featmap_sizes, device=device)
        valid_flags = []
        for meta in batch_img_metas:
            pad_shape = meta.get("pad_shape", meta.get("batch_input_shape"))
            flags = self.prior_generator.valid_flags(featmap_sizes, tuple(pad_shape[:2]), device)
            valid_flags.append(torch.cat(flags))
        return mlvl_anchors, valid_flags

    def assign_priors(
        self,
        anchors: Tensor,
        num_level_anchors: list[int],
        gt_bboxes: Tensor,
        gt_labels: Tensor | None,
        gt_bboxes_ignore: Tensor | None,
    ) -> object:
        """Call the assigner on one image's inside anchors (ATSS needs ``num_level_anchors``)."""
        return self.assigner.assign(
            anchors, gt_bboxes, gt_labels=gt_labels, gt_bboxes_ignore=gt_bboxes_ignore
        )

    def _get_targets_single(
        self,
        flat_anchors: Tensor,
        valid_flags: Tensor,
        num_level_anchors: list[int],
        gt_bboxes: Tensor,
        gt_labels: Tensor | None,
        gt_bboxes_ignore: Tensor | None,
        img_meta: dict,
    ) -> tuple:
        """Targets of one image over all anchors ``[N]`` (see the module docstring for the steps).

        Returns:
            ``(labels[N], label_weights[N], bbox_targets[N, 4], bbox_weights[N, 4],
            inside_flags[N], sampling_result)``.
        """
        inside = anchor_inside_flags(
            flat_anchors, valid_flags, tuple(img_meta["img_shape"][:2]), self.allowed_border
        )
        if not inside.any():
            raise ValueError(
                "img_meta: no valid anchor lies inside the image boundary; check the image "
                "size and anchor sizes, or set allowed_border=-1 to skip the check"
            )
        anchors = flat_anchors[inside]
        split = torch.split(inside, num_level_anchors)
        num_level_inside = [int(s.sum()) for s in split]
        assign_result = self.assign_priors(
            anchors, num_level_inside, gt_bboxes, gt_labels, gt_bboxes_ignore
        )
        sampling = self.sampler.sample(assign_result, anchors, gt_bboxes)

        n = anchors.shape[0]
        bbox_targets = torch.zeros_like(anchors)
        bbox_weights = torch.zeros_like(anchors)
        labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
        label_weights = anchors.new_zeros(n)
        pos_inds, neg_inds = sampling.pos_inds, sampling.neg_inds
        if len(pos_inds) > 0:
            if self.reg_decoded_bbox:
                pos_targets = sampling.pos_gt_bboxes
            else:
                pos_targets = self.bbox_coder.encode(sampling.pos_priors, sampling.pos_gt_bboxes)
            bbox_targets[pos_inds] = pos_targets.to(bbox_targets.dtype)
            bbox_weights[pos_inds] = 1.0
            if gt_labels is None:
                labels[pos_inds] = 0  # class-agnostic (RPN-style): foreground is class 0
            else:
                labels[pos_inds] = gt_labels[sampling.pos_assigned_gt_inds]
            label_weights[pos_inds] = 1.0 if self.pos_weight <= 0 else self.pos_weight
        if len(neg_inds) > 0:
            label_weights[neg_inds] = 1.0

        total = flat_anchors.shape[0]
        return (
            unmap(labels, total, inside, fill=self.num_classes),
            unmap(label_weights, total, inside),
            unmap(bbox_targets, total, inside),
            unmap(bbox_weights, total, inside),
            inside,
            sampling,
        )

    def get_targets(
        self,
        mlvl_anchors: list[Tensor],
        valid_flags: list[Tensor],
        batch_gt_bboxes: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_labels: list[Tensor] | None = None,
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> AnchorTargets:
        """Targets of a batch, image by image (``_get_targets_single``), stacked to ``[B, N, ...]``."""
        num_level = [a.shape[0] for a in mlvl_anchors]
        flat_anchors = torch.cat(mlvl_anchors)
        num_imgs = len(batch_img_metas)
        if batch_gt_bboxes_ignore is None:
            batch_gt_bboxes_ignore = [None] * num_imgs
        if batch_gt_labels is None:
            batch_gt_labels = [None] * num_imgs
        per_image = [
            self._get_targets_single(
                flat_anchors,
                valid_flags[i],
                num_level,
                batch_gt_bboxes[i],
                batch_gt_labels[i],
                batch_gt_bboxes_ignore[i],
                batch_img_metas[i],
            )
            for i in range(num_imgs)
        ]
        labels, label_weights, bbox_targets, bbox_weights, insides, samplings = zip(
            *per_image, strict=True
        )
        num_pos = [int(s.pos_inds.numel()) for s in samplings]
        num_neg = [int(s.neg_inds.numel()) for s in samplings]
        # max(P, 1) per image, plus max(Q, 1) with a real sampler (SamplingResult.avg_factor)
        avg_factor = float(sum(s.avg_factor for s in samplings))
        pos_inds = [((lab >= 0) & (lab < self.num_classes)).nonzero().view(-1) for lab in labels]
        return AnchorTargets(
            anchors=flat_anchors,
            labels=torch.stack(labels),
            label_weights=torch.stack(label_weights),
            bbox_targets=torch.stack(bbox_targets),
            bbox_weights=torch.stack(bbox_weights),
            avg_factor=avg_factor,
            num_pos=num_pos,
            num_neg=num_neg,
            num_level_priors=num_level,
            pos_inds=pos_inds,
            pos_gt_inds=[s.pos_assigned_gt_inds for s in samplings],
            sampling_results=list(samplings),
        )

    def targets_for(
        self,
        cls_scores: list[Tensor],
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor] | None,
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> AnchorTargets:
        """Anchors for the feature sizes of ``cls_scores`` and the batch's targets in one call."""
        featmap_sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        anchors, valid = self.get_anchors(featmap_sizes, batch_img_metas, cls_scores[0].device)
        return self.get_targets(
            anchors,
            valid,
            batch_gt_bboxes,
            batch_img_metas,
            batch_gt_labels=batch_gt_labels,
            batch_gt_bboxes_ignore=batch_gt_bboxes_ignore,
        )

    # --------------------------------------------------------------------- loss
    def loss_and_targets_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        *,
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], AnchorTargets]:
        """Focal (or other) classification loss over all anchors + box loss on positives.

        Both are divided by ``avg_factor``. mmdetection sums per-level losses that share this
        factor; one sum over all levels is the same number.

        Returns:
            ``({"loss_cls": Tensor[], "loss_bbox": Tensor[]}, targets)``, ``targets`` the
            ``AnchorTargets`` of ``targets_for`` (``targets.avg_factor`` normalised both losses).
        """
        t = self.targets_for(
            cls_scores, batch_gt_bboxes, batch_gt_labels, batch_img_metas, batch_gt_bboxes_ignore
        )
        cls_score = flatten_levels(cls_scores, self.cls_out_channels).reshape(
            -1, self.cls_out_channels
        )
        bbox_pred = flatten_levels(bbox_preds, self.encode_size).reshape(-1, self.encode_size)
        loss_cls = self.loss_cls(
            cls_score, t.labels.reshape(-1), t.label_weights.reshape(-1), avg_factor=t.avg_factor
        )
        if self.reg_decoded_bbox:
            anchors = t.anchors.repeat(len(batch_img_metas), 1)
            bbox_pred = self.bbox_coder.decode(anchors, bbox_pred)
        loss_bbox = self.loss_bbox(
            bbox_pred,
            t.bbox_targets.reshape(-1, 4),
            t.bbox_weights.reshape(-1, 4),
            avg_factor=t.avg_factor,
        )
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}, t
