"""Samplers: which assigned priors a loss sees (all of them, or a random fixed-size subset)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labkit._validation import check_boxes, check_tensor
from labkit.assigners.base import AssignResult

__all__ = ["PseudoSampler", "RandomSampler", "SamplingResult"]


@dataclass
class SamplingResult:
    """Positive and negative priors chosen for the loss, with their targets.

    Attributes:
        pos_inds: ``LongTensor[P]`` indices (into the priors given to ``sample``; with
            ``add_gt_as_proposals`` the GTs come first) of positives, sorted.
        neg_inds: ``LongTensor[Q]`` indices of negatives, sorted.
        pos_priors: ``Tensor[P, 4]``; neg_priors: ``Tensor[Q, 4]``.
        pos_gt_bboxes: ``Tensor[P, 4]`` the GT each positive regresses to.
        pos_assigned_gt_inds: ``LongTensor[P]`` 0-based GT index of each positive.
        pos_gt_labels: ``LongTensor[P]`` or ``None`` (assignment without labels).
        pos_is_gt: ``uint8 Tensor[P]``, 1 where the positive is a GT added as a proposal.
        num_gts: number of ground truths ``K``.
        avg_factor: ``max(P, 1)`` (pseudo sampler) or ``max(P, 1) + max(Q, 1)`` (random).
    """

    pos_inds: Tensor
    neg_inds: Tensor
    pos_priors: Tensor
    neg_priors: Tensor
    pos_gt_bboxes: Tensor
    pos_assigned_gt_inds: Tensor
    pos_gt_labels: Tensor | None
    pos_is_gt: Tensor
    num_gts: int
    avg_factor: int

    @classmethod
    def build(
        cls,
        pos_inds: Tensor,
        neg_inds: Tensor,
        priors: Tensor,
        gt_bboxes: Tensor,
        assign_result: AssignResult,
        gt_flags: Tensor,
        avg_factor_with_neg: bool = True,
    ) -> SamplingResult:
        """Gather priors, GT boxes and labels for chosen ``pos_inds`` / ``neg_inds``."""
        pos_assigned_gt_inds = assign_result.gt_inds[pos_inds] - 1
        if gt_bboxes.numel() == 0:
            pos_gt_bboxes = gt_bboxes.view(-1, 4)
        else:
            pos_gt_bboxes = gt_bboxes.view(-1, 4)[pos_assigned_gt_inds]
        labels = assign_result.labels
        num_pos, num_neg = max(pos_inds.numel(), 1), max(neg_inds.numel(), 1)
        return cls(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            pos_priors=priors[pos_inds],
            neg_priors=priors[neg_inds],
            pos_gt_bboxes=pos_gt_bboxes,
            pos_assigned_gt_inds=pos_assigned_gt_inds,
            pos_gt_labels=None if labels is None else labels[pos_inds],
            pos_is_gt=gt_flags[pos_inds],
            num_gts=gt_bboxes.shape[0],
            avg_factor=num_pos + num_neg if avg_factor_with_neg else num_pos,
        )

    @property
    def priors(self) -> Tensor:
        """``Tensor[P + Q, 4]``: positives then negatives."""
        return torch.cat([self.pos_priors, self.neg_priors])

    def __repr__(self) -> str:
        return (
            f"SamplingResult(num_gts={self.num_gts}, num_pos={self.pos_inds.numel()}, "
            f"num_neg={self.neg_inds.numel()}, avg_factor={self.avg_factor})"
        )


def _check_sample_args(assign_result, priors, gt_bboxes):
    if not isinstance(assign_result, AssignResult):
        raise TypeError(
            f"assign_result: expected an AssignResult, got {type(assign_result).__name__}"
        )
    priors = check_tensor(priors, "priors")
    if priors.dim() == 1:
        priors = priors[None, :]
    check_boxes(priors, "priors")
    check_boxes(gt_bboxes, "gt_bboxes")
    if priors.shape[0] != assign_result.num_preds:
        raise ValueError(
            f"priors: expected {assign_result.num_preds} priors (the assignment's length), "
            f"got {priors.shape[0]}"
        )
    return priors


class PseudoSampler:
    """Take every positive and every negative (dense heads: RetinaNet, ATSS, PAA)."""

    def sample(
        self, assign_result: AssignResult, priors: Tensor, gt_bboxes: Tensor
    ) -> SamplingResult:
        """All priors with ``gt_inds > 0`` as positives and ``gt_inds == 0`` as negatives.

        Args:
            assign_result: the assignment of ``priors``.
            priors: ``Tensor[N, 4]``.
            gt_bboxes: ``Tensor[K, 4]``.
        """
        priors = _check_sample_args(assign_result, priors, gt_bboxes)
        pos_inds = torch.nonzero(assign_result.gt_inds > 0, as_tuple=False).squeeze(-1).unique()
        neg_inds = torch.nonzero(assign_result.gt_inds == 0, as_tuple=False).squeeze(-1).unique()
        gt_flags = priors.new_zeros(priors.shape[0], dtype=torch.uint8)
        return SamplingResult.build(
            pos_inds, neg_inds, priors, gt_bboxes, assign_result, gt_flags, False
        )


class RandomSampler:
    """Sample ``num`` priors, at most ``pos_fraction`` of them positive (two-stage detectors).

    Args:
        num: total samples per image.
        pos_fraction: the largest share of positives, ``int(num * pos_fraction)``.
        neg_pos_ub: at most ``neg_pos_ub * max(1, num_pos)`` negatives (``-1``: no bound).
        add_gt_as_proposals: put the GT boxes in front of the priors as extra positives.
        generator: ``torch.Generator`` for reproducible draws (default: the global RNG).
    """

    def __init__(
        self,
        num: int,
        pos_fraction: float,
        neg_pos_ub: float = -1,
        add_gt_as_proposals: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(num, int) or num < 0:
            raise ValueError(f"num: expected a non-negative integer, got {num!r}")
        if not 0 <= pos_fraction <= 1:
            raise ValueError(f"pos_fraction: expected a value in [0, 1], got {pos_fraction!r}")
        self.num = num
        self.pos_fraction = pos_fraction
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals
        self.generator = generator

    def random_choice(self, gallery: Tensor, num: int) -> Tensor:
        """``num`` distinct entries of ``gallery: Tensor[M]`` drawn uniformly (``num <= M``)."""
        if len(gallery) < num:
            raise ValueError(f"num: cannot draw {num} from {len(gallery)} entries")
        # randperm on the CPU generator, then move: works with any device and one seed.
        perm = torch.randperm(gallery.numel(), generator=self.generator)[:num]
        return gallery[perm.to(gallery.device)]

    def _sample(self, mask: Tensor, num_expected: int) -> Tensor:
        inds = torch.nonzero(mask, as_tuple=False).squeeze(-1)
        if inds.numel() <= num_expected:
            return inds
        return self.random_choice(inds, num_expected)

    def sample(
        self,
        assign_result: AssignResult,
        priors: Tensor,
        gt_bboxes: Tensor,
        gt_labels: Tensor | None = None,
    ) -> SamplingResult:
        """Draw positives then negatives; ``assign_result`` gains the GTs (in place) if added.

        Args:
            assign_result: the assignment of ``priors``.
            priors: ``Tensor[N, 4]``.
            gt_bboxes: ``Tensor[K, 4]``.
            gt_labels: ``LongTensor[K]``; required with ``add_gt_as_proposals`` when the
                assignment carries labels (the added GTs need theirs).
        """
        priors = _check_sample_args(assign_result, priors, gt_bboxes)
        gt_flags = priors.new_zeros((priors.shape[0],), dtype=torch.uint8)
        if self.add_gt_as_proposals and len(gt_bboxes) > 0:
            if gt_labels is None:
                if assign_result.labels is not None:
                    raise ValueError("gt_labels: needed to add the GTs as proposals")
                gt_labels = gt_bboxes.new_zeros((len(gt_bboxes),), dtype=torch.long)
            priors = torch.cat([gt_bboxes.to(priors.dtype), priors], dim=0)
            assign_result.add_gt_(gt_labels)
            gt_flags = torch.cat([gt_flags.new_ones(gt_bboxes.shape[0]), gt_flags])

        num_expected_pos = int(self.num * self.pos_fraction)
        pos_inds = self._sample(assign_result.gt_inds > 0, num_expected_pos).unique()
        num_sampled_pos = pos_inds.numel()
        num_expected_neg = self.num - num_sampled_pos
        if self.neg_pos_ub >= 0:
            neg_upper_bound = int(self.neg_pos_ub * max(1, num_sampled_pos))
            num_expected_neg = min(num_expected_neg, neg_upper_bound)
        neg_inds = self._sample(assign_result.gt_inds == 0, num_expected_neg).unique()
        return SamplingResult.build(pos_inds, neg_inds, priors, gt_bboxes, assign_result, gt_flags)
