"""AssignResult: which ground truth (if any) each prior is responsible for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AssignResult:
    """The output of every assigner (mmdetection's ``AssignResult``).

    Attributes:
        num_gts: number of ground-truth boxes ``K`` the assignment was computed against.
        gt_inds: ``LongTensor[N]`` per prior: ``0`` negative (background), ``-1`` ignored,
            ``k >= 1`` positive for the k-th ground truth (1-based, so ``gt_inds - 1`` indexes
            ``gt_bboxes``).
        max_overlaps: ``Tensor[N]``, the overlap an assigner ranked the prior by (MaxIoU: the
            best IoU with any ground truth; ATSS: the IoU with the assigned ground truth and
            ``-1e8`` for priors that are not positive, as mmdetection returns).
        labels: ``LongTensor[N]`` class of the assigned ground truth, ``-1`` where the prior is
            not positive; ``None`` when the assigner was given no ``gt_labels``.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor | None = None

    @property
    def num_preds(self) -> int:
        """Number of priors (predictions) ``N`` that were assigned."""
        return len(self.gt_inds)

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Prepend the ground truths themselves as positive priors (in place).

        Samplers with ``add_gt_as_proposals`` put the ``K`` ground-truth boxes in front of the
        priors; this makes the assignment agree: prior ``k`` is GT ``k + 1`` with overlap 1.

        Args:
            gt_labels: ``LongTensor[K]`` labels of the ground truths being added.
        """
        self_inds = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=gt_labels.device)
        self.gt_inds = torch.cat([self_inds, self.gt_inds])
        self.max_overlaps = torch.cat(
            [self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps]
        )
        if self.labels is not None:
            self.labels = torch.cat([gt_labels, self.labels])

    def __repr__(self) -> str:
        gt_inds = self.gt_inds
        num_pos = int((gt_inds > 0).sum())
        num_neg = int((gt_inds == 0).sum())
        num_ignored = int((gt_inds < 0).sum())
        labels = "None" if self.labels is None else f"shape={tuple(self.labels.shape)}"
        return (
            f"AssignResult(num_gts={self.num_gts}, num_preds={self.num_preds}, "
            f"positive={num_pos}, negative={num_neg}, ignored={num_ignored}, labels {labels})"
        )
