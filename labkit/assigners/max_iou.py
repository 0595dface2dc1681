"""MaxIoUAssigner: positives by IoU threshold, plus each ground truth's best prior (RetinaNet, RPN)."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_labels
from labkit.assigners.base import AssignResult
from labkit.boxes import bbox_overlaps

__all__ = ["MaxIoUAssigner", "assign_wrt_overlaps", "low_quality_reference"]


def check_assigner_inputs(
    priors: object, gt_bboxes: object, gt_labels: object, gt_bboxes_ignore: object
) -> tuple[Tensor, Tensor]:
    """Check an assigner's inputs, naming the bad argument: ``priors: Tensor[N, 4]``,
    ``gt_bboxes: Tensor[K, 4]`` xyxy, ``gt_labels: LongTensor[K] | None``,
    ``gt_bboxes_ignore: Tensor[G, 4] | None``. Returns ``(priors, gt_bboxes)``."""
    priors = check_boxes(priors, "priors")
    gt_bboxes = check_boxes(gt_bboxes, "gt_bboxes")
    for tensor, name in ((priors, "priors"), (gt_bboxes, "gt_bboxes")):
        if tensor.dim() != 2:
            raise ValueError(f"{name}: expected shape [N, 4], got {tuple(tensor.shape)}")
    if gt_labels is not None:
        check_labels(gt_labels, "gt_labels", gt_bboxes.shape[0])
    if gt_bboxes_ignore is not None:
        check_boxes(gt_bboxes_ignore, "gt_bboxes_ignore")
    return priors, gt_bboxes


def labels_from_gt_inds(gt_inds: Tensor, gt_labels: Tensor | None) -> Tensor | None:
    """``labels[i] = gt_labels[gt_inds[i] - 1]`` for positives, ``-1`` elsewhere."""
    if gt_labels is None:
        return None
    labels = gt_inds.new_full(gt_inds.shape, -1)
    pos = gt_inds > 0
    labels[pos] = gt_labels[gt_inds[pos] - 1].to(labels.dtype)
    return labels


def assign_wrt_overlaps(
    overlaps: Tensor,
    gt_labels: Tensor | None,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    gt_max_assign_all: bool = True,
    match_low_quality: bool = True,
) -> AssignResult:
    """The four MaxIoU steps on a precomputed ``overlaps: Tensor[K, N]`` (GTs x priors).

    1. every prior starts ignored (``-1``);
    2. priors whose best IoU lies in ``[0, neg_iou_thr)`` (or ``[low, high)``) -> negative ``0``
       (priors inside ignore regions carry IoU ``-1`` and stay ignored);
    3. priors whose best IoU is ``>= pos_iou_thr`` -> that best GT;
    4. low-quality matches (``match_low_quality``): every GT whose best IoU is ``>= min_pos_iou``
       claims its best prior -- all priors tied at that IoU when ``gt_max_assign_all`` -- and
       overwrites steps 2-3. When several GTs claim one prior, the highest GT index wins
       (mmdetection loops over GTs in order, so the last write stays). Note that with
       ``min_pos_iou=0`` a GT that overlaps no prior claims every prior with IoU 0.

    ``max_overlaps`` stays each prior's best IoU over all GTs, even where step 4 picked another.
    """
    num_gts, num_priors = overlaps.shape
    gt_inds = overlaps.new_full((num_priors,), -1, dtype=torch.long)
    if num_gts == 0 or num_priors == 0:
        if num_gts == 0:
            gt_inds[:] = 0
        labels = None if gt_labels is None else gt_inds.new_full((num_priors,), -1)
        return AssignResult(num_gts, gt_inds, overlaps.new_zeros((num_priors,)), labels)

    max_overlaps, argmax_overlaps = overlaps.max(dim=0)  # best GT per prior  [N]
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)  # best prior per GT  [K]

    if isinstance(neg_iou_thr, Real):
        gt_inds[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    else:
        low, high = neg_iou_thr
        gt_inds[(max_overlaps >= low) & (max_overlaps < high)] = 0

    pos = max_overlaps >= pos_iou_thr
    gt_inds[pos] = argmax_overlaps[pos] + 1

    if match_low_quality:
        eligible = gt_max_overlaps >= min_pos_iou  # [K]
        if gt_max_assign_all:
            # GT k claims every prior tied at its best IoU; claims are few, so list them.
            claim_gt, claim_prior = torch.nonzero(
                (overlaps == gt_max_overlaps[:, None]) & eligible[:, None], as_tuple=True
            )
        else:
            claim_gt = torch.nonzero(eligible, as_tuple=True)[0]
            claim_prior = gt_argmax_overlaps[claim_gt]
        # mmdetection writes GT by GT, so among GTs claiming one prior the largest index wins.
        winner = torch.zeros_like(gt_inds)
        winner.scatter_reduce_(0, claim_prior, claim_gt + 1, reduce="amax")
        gt_inds = torch.where(winner > 0, winner, gt_inds)

    return AssignResult(num_gts, gt_inds, max_overlaps, labels_from_gt_inds(gt_inds, gt_labels))


def low_quality_reference(
    gt_inds: Tensor,
    overlaps: Tensor,
    min_pos_iou: float,
    gt_max_assign_all: bool,
) -> Tensor:
    """Step 4 written as mmdetection's loop over GTs; the tests hold the batched step equal to it.

    Args:
        gt_inds: ``LongTensor[N]`` after steps 1-3 (a modified copy is returned).
        overlaps: ``Tensor[K, N]``.
    """
    gt_inds = gt_inds.clone()
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
    for i in range(overlaps.shape[0]):
        if gt_max_overlaps[i] >= min_pos_iou:
            if gt_max_assign_all:
                gt_inds[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
            else:
                gt_inds[gt_argmax_overlaps[i]] = i + 1
    return gt_inds


def _check_iou(value: object, name: str, shown: object = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number in ``[0, 1]``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:  # NaN fails the comparison too
        raise ValueError(
            f"{name}: expected an IoU in [0, 1], got {value if shown is None else shown!r}"
        )


class MaxIoUAssigner:
    """Assign each prior to the ground truth it overlaps most (mmdetection ``MaxIoUAssigner``).

    Args:
        pos_iou_thr: IoU at or above which a prior is positive.
        neg_iou_thr: a float (negative when the best IoU is in ``[0, thr)``) or a
            ``(low, high)`` pair (negative in ``[low, high)``); between the thresholds a prior
            is ignored (``gt_inds = -1``).
            Thresholds are IoUs in ``[0, 1]`` and ``neg_iou_thr`` (its ``high``) may not
            exceed ``pos_iou_thr``; equal is fine (RoI heads use 0.5 / 0.5), as are
            mmdetection's configs (RetinaNet 0.5 / 0.4, RPN 0.7 / 0.3, ``(0.3, 0.7)``).
        min_pos_iou: the least IoU a low-quality match needs (in ``[0, 1]``).
        gt_max_assign_all: in low-quality matching, give a GT every prior tied at its best IoU
            (not only the first).
        ignore_iof_thr: priors whose IoF with any ignore box exceeds it are ignored (``> 0``
            to enable).
        ignore_wrt_candidates: IoF relative to the prior's area (True) or the ignore box's.
        match_low_quality: run step 4 (see :func:`assign_wrt_overlaps`).
        gpu_assign_thr: with more GTs than this (``> 0``), compute on the CPU to save GPU
            memory; results return to the priors' device.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float | tuple[float, float],
        min_pos_iou: float = 0.0,
        gt_max_assign_all: bool = True,
        ignore_iof_thr: float = -1,
        ignore_wrt_candidates: bool = True,
        match_low_quality: bool = True,
        gpu_assign_thr: int = -1,
    ) -> None:
        if not isinstance(pos_iou_thr, Real):
            raise TypeError(f"pos_iou_thr: expected a number, got {type(pos_iou_thr).__name__}")
        _check_iou(pos_iou_thr, "pos_iou_thr")
        if not isinstance(neg_iou_thr, Real):
            if not isinstance(neg_iou_thr, (tuple, list)) or len(neg_iou_thr) != 2:
                raise ValueError(
                    f"neg_iou_thr: expected a float or a (low, high) pair, got {neg_iou_thr!r}"
                )
            for bound in neg_iou_thr:
                _check_iou(bound, "neg_iou_thr", neg_iou_thr)
            if neg_iou_thr[0] > neg_iou_thr[1]:
                raise ValueError(f"neg_iou_thr: expected low <= high, got {tuple(neg_iou_thr)}")
            neg_iou_thr = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
            neg_high = neg_iou_thr[1]
        else:
            _check_iou(neg_iou_thr, "neg_iou_thr")
            neg_high = neg_iou_thr
        if neg_high > pos_iou_thr:
            # Equal is valid (RoI heads: 0.5 / 0.5): every prior is then negative or positive.
            raise ValueError(
                f"neg_iou_thr: expected at most pos_iou_thr ({pos_iou_thr}), got {neg_iou_thr!r}"
                " (a prior cannot be negative above the IoU that makes it positive)"
            )
        _check_iou(min_pos_iou, "min_pos_iou")
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = ignore_iof_thr
        self.ignore_wrt_candidates = ignore_wrt_candidates
        self.match_low_quality = match_low_quality
        self.gpu_assign_thr = gpu_assign_thr

    def assign(
        self,
        priors: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor | None = None,
        gt_bboxes_ignore: Tensor | None = None,
    ) -> AssignResult:
        """Assign ``priors: Tensor[N, 4]`` to ``gt_bboxes: Tensor[K, 4]``.

        Args:
            priors: anchors or proposals ``(x1, y1, x2, y2)``.
            gt_bboxes: ground truths; ``K = 0`` makes every prior negative.
            gt_labels: ``LongTensor[K]`` or ``None`` (then ``labels`` is ``None``).
            gt_bboxes_ignore: ``Tensor[G, 4]`` regions to ignore, or ``None``.

        Returns:
            :class:`AssignResult` with ``gt_inds``, ``max_overlaps``, ``labels`` of length N.
        """
        priors, gt_bboxes = check_assigner_inputs(priors, gt_bboxes, gt_labels, gt_bboxes_ignore)
        device = priors.device
        on_cpu = 0 < self.gpu_assign_thr < gt_bboxes.shape[0]
        if on_cpu:
            priors, gt_bboxes = priors.cpu(), gt_bboxes.cpu()
            gt_labels = None if gt_labels is None else gt_labels.cpu()
            gt_bboxes_ignore = None if gt_bboxes_ignore is None else gt_bboxes_ignore.cpu()

        overlaps = bbox_overlaps(gt_bboxes, priors, check=False)  # [K, N]
        if (
            self.ignore_iof_thr > 0
            and gt_bboxes_ignore is not None
            and gt_bboxes_ignore.numel() > 0
            and priors.numel() > 0
        ):
            if self.ignore_wrt_candidates:
                iof = bbox_overlaps(priors, gt_bboxes_ignore, mode="iof", check=False)
                ignore_max = iof.max(dim=1).values
            else:
                iof = bbox_overlaps(gt_bboxes_ignore, priors, mode="iof", check=False)
                ignore_max = iof.max(dim=0).values
            # IoU -1 with every GT: never negative (step 2 needs >= 0) nor positive.
            overlaps[:, ignore_max > self.ignore_iof_thr] = -1

        result = assign_wrt_overlaps(
            overlaps,
            gt_labels,
            self.pos_iou_thr,
            self.neg_iou_thr,
            self.min_pos_iou,
            self.gt_max_assign_all,
            self.match_low_quality,
        )
        if on_cpu:
            result.gt_inds = result.gt_inds.to(device)
            result.max_overlaps = result.max_overlaps.to(device)
            if result.labels is not None:
                result.labels = result.labels.to(device)
        return result

    def __repr__(self) -> str:
        return (
            f"MaxIoUAssigner(pos_iou_thr={self.pos_iou_thr}, neg_iou_thr={self.neg_iou_thr}, "
            f"min_pos_iou={self.min_pos_iou}, gt_max_assign_all={self.gt_max_assign_all}, "
            f"ignore_iof_thr={self.ignore_iof_thr}, match_low_quality={self.match_low_quality})"
        )
