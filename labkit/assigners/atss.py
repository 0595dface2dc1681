"""ATSSAssigner: adaptive IoU threshold (mean + std of the nearest priors' IoUs) per ground truth."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from labkit.assigners.base import AssignResult
from labkit.assigners.max_iou import check_assigner_inputs, labels_from_gt_inds
from labkit.boxes import bbox_overlaps

__all__ = ["ATSSAssigner", "atss_candidates"]

# mmdetection's "minus infinity" for priors no ground truth claims; it is also what
# AssignResult.max_overlaps holds for every non-positive prior.
INF = 100000000


def _centers(boxes: Tensor) -> tuple[Tensor, Tensor]:
    return (boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0


def atss_candidates(distances: Tensor, num_level_priors: Sequence[int], topk: int) -> Tensor:
    """Per level, the ``topk`` priors nearest to each GT centre: ``LongTensor[sum_l min(topk, n_l), K]``.

    Args:
        distances: ``Tensor[N, K]`` prior-centre to GT-centre distances.
        num_level_priors: priors per level (they are concatenated level by level).
    """
    candidate_idxs = []
    start = 0
    for num in num_level_priors:
        # topk along dim 0 of the [n_l, K] slice, like mmdetection, so equal distances
        # resolve to the same priors.
        _, idxs = distances[start : start + num].topk(min(topk, num), dim=0, largest=False)
        candidate_idxs.append(idxs + start)
        start += num
    return torch.cat(candidate_idxs, dim=0)


class ATSSAssigner:
    """Adaptive Training Sample Selection (mmdetection ``ATSSAssigner``).

    For each ground truth: on every level take the ``topk`` priors whose centres are nearest
    to the GT centre (the candidates, up to ``topk * num_levels``), set the IoU threshold to
    ``mean + std`` of the candidates' IoUs (``std`` unbiased, as ``torch.std``), and make a
    candidate positive if its IoU reaches the threshold and its centre lies inside the GT
    (more than 0.01 px from every side). A prior positive for several GTs goes to the one it
    overlaps most (lowest GT index on a tie).

    Known edge case, kept as mmdetection has it: ``mean + std`` can exceed every candidate's
    IoU, and then the GT gets no positive at all. With ``topk=2`` on two levels and candidate
    IoUs ``[0.5, 0.5, 0, 0]`` (two good priors on one level, none on the other) the mean is
    0.25, the std 0.289, the threshold 0.539 > 0.5. A single candidate gives ``std = NaN`` and
    nothing passes either. Few candidates and one dominant level (small ``topk``, tiny or
    very elongated objects) make it likely; the tests pin the behaviour.

    ``max_overlaps`` of the result is the IoU with the assigned GT for positives and
    ``-1e8`` (``-INF``) elsewhere, as mmdetection returns.

    Args:
        topk: candidates per level per GT.
        ignore_iof_thr: priors whose IoF (over their own area) with an ignore box exceeds it
            are ignored (``gt_inds = -1``) and pushed out of the nearest-centre ranking
            (``> 0`` to enable).
    """

    def __init__(self, topk: int = 9, ignore_iof_thr: float = -1) -> None:
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected a positive integer, got {topk!r}")
        self.topk = topk
        self.ignore_iof_thr = ignore_iof_thr

    def assign(
        self,
        priors: Tensor,
        num_level_priors: Sequence[int],
        gt_bboxes: Tensor,
        gt_labels: Tensor | None = None,
        gt_bboxes_ignore: Tensor | None = None,
    ) -> AssignResult:
        """Assign ``priors: Tensor[N, 4]`` (levels concatenated) to ``gt_bboxes: Tensor[K, 4]``.

        Args:
            priors: anchors ``(x1, y1, x2, y2)``, finest level first.
            num_level_priors: ``list[int]`` priors per level, summing to ``N``.
            gt_bboxes: ground truths; ``K = 0`` makes every prior negative.
            gt_labels: ``LongTensor[K]`` or ``None`` (then ``labels`` is ``None``).
            gt_bboxes_ignore: ``Tensor[G, 4]`` or ``None``.

        Returns:
            :class:`AssignResult` of length ``N``.
        """
        priors, gt_bboxes = check_assigner_inputs(priors, gt_bboxes, gt_labels, gt_bboxes_ignore)
        num_level_priors = [int(n) for n in num_level_priors]
        if sum(num_level_priors) != priors.shape[0] or min(num_level_priors, default=0) < 0:
            raise ValueError(
                f"num_level_priors: expected non-negative counts summing to {priors.shape[0]} "
                f"priors, got {num_level_priors}"
            )
        num_gt, num_priors = gt_bboxes.shape[0], priors.shape[0]
        gt_inds = priors.new_zeros((num_priors,), dtype=torch.long)
        if num_gt == 0 or num_priors == 0:
            labels = None if gt_labels is None else gt_inds.new_full((num_priors,), -1)
            return AssignResult(num_gt, gt_inds, priors.new_zeros((num_priors,)), labels)

        overlaps, candidate_idxs, candidate_overlaps, ignored = self._candidates(
            priors, num_level_priors, gt_bboxes, gt_bboxes_ignore
        )
        if ignored is not None:
            gt_inds[ignored] = -1
        gt_arange = torch.arange(num_gt, device=priors.device)
        thr = candidate_overlaps.mean(0) + candidate_overlaps.std(0)  # [K]
        is_pos = candidate_overlaps >= thr[None, :]

        priors_cx, priors_cy = _centers(priors)
        # Candidate centre must lie inside the GT: its smallest distance to a side > 0.01.
        cand_cx, cand_cy = priors_cx[candidate_idxs], priors_cy[candidate_idxs]  # [C, K]
        side_dist = torch.stack(
            [
                cand_cx - gt_bboxes[:, 0],
                cand_cy - gt_bboxes[:, 1],
                gt_bboxes[:, 2] - cand_cx,
                gt_bboxes[:, 3] - cand_cy,
            ],
            dim=1,
        )
        is_pos &= side_dist.min(dim=1).values > 0.01

        # A prior claimed by several GTs keeps the one it overlaps most: all other entries
        # are -INF and the row-wise max picks (first index on ties).
        overlaps_inf = torch.full_like(overlaps, -INF)
        pos_prior = candidate_idxs[is_pos]
        pos_gt = gt_arange.expand_as(candidate_idxs)[is_pos]
        overlaps_inf[pos_prior, pos_gt] = overlaps[pos_prior, pos_gt]
        max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
        assigned = max_overlaps != -INF
        gt_inds[assigned] = argmax_overlaps[assigned] + 1
        return AssignResult(num_gt, gt_inds, max_overlaps, labels_from_gt_inds(gt_inds, gt_labels))

    def _candidates(self, priors, num_level_priors, gt_bboxes, gt_bboxes_ignore):
        """IoUs ``[N, K]``, candidate indices and IoUs ``[C, K]``, ignored priors (or None)."""
        overlaps = bbox_overlaps(priors, gt_bboxes, check=False)  # [N, K]
        priors_cx, priors_cy = _centers(priors)
        gt_cx, gt_cy = _centers(gt_bboxes)
        dx = priors_cx[:, None] - gt_cx[None, :]
        dy = priors_cy[:, None] - gt_cy[None, :]
        distances = (dx * dx + dy * dy).sqrt()  # [N, K]
        ignored = None
        if (
            self.ignore_iof_thr > 0
            and gt_bboxes_ignore is not None
            and gt_bboxes_ignore.numel() > 0
        ):
            iof = bbox_overlaps(priors, gt_bboxes_ignore, mode="iof", check=False)
            ignored = iof.max(dim=1).values > self.ignore_iof_thr
            # Out of the nearest-centre ranking (mmdetection's INF distance).
            distances[ignored, :] = INF
        candidate_idxs = atss_candidates(distances, num_level_priors, self.topk)  # [C, K]
        gt_arange = torch.arange(gt_bboxes.shape[0], device=priors.device)
        return overlaps, candidate_idxs, overlaps[candidate_idxs, gt_arange], ignored

    def candidate_stats(
        self,
        priors: Tensor,
        num_level_priors: Sequence[int],
        gt_bboxes: Tensor,
        gt_bboxes_ignore: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """What the threshold is made of, for plots and exercises (``K >= 1``).

        Returns:
            ``{"candidate_idxs": LongTensor[C, K], "candidate_overlaps": Tensor[C, K],
            "mean": Tensor[K], "std": Tensor[K], "threshold": Tensor[K]}`` with
            ``C = sum over levels of min(topk, priors on the level)``.
        """
        priors, gt_bboxes = check_assigner_inputs(priors, gt_bboxes, None, gt_bboxes_ignore)
        _, idxs, cand, _ = self._candidates(
            priors, [int(n) for n in num_level_priors], gt_bboxes, gt_bboxes_ignore
        )
        mean, std = cand.mean(0), cand.std(0)
        return {
            "candidate_idxs": idxs,
            "candidate_overlaps": cand,
            "mean": mean,
            "std": std,
            "threshold": mean + std,
        }

    def __repr__(self) -> str:
        return f"ATSSAssigner(topk={self.topk}, ignore_iof_thr={self.ignore_iof_thr})"
