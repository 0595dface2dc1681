"""PseudoSampler and RandomSampler: indices, gathered targets, GTs as proposals, seeding."""

from __future__ import annotations

import pytest
import torch

from labkit.assigners import AssignResult, PseudoSampler, RandomSampler


def make_assignment(num_priors=10):
    # priors 0, 3 -> GT 1; prior 5 -> GT 2; priors 1, 2 ignored; the rest negative
    gt_inds = torch.zeros(num_priors, dtype=torch.long)
    gt_inds[[0, 3]] = 1
    gt_inds[5] = 2
    gt_inds[[1, 2]] = -1
    labels = torch.full((num_priors,), -1)
    labels[[0, 3]] = 7
    labels[5] = 4
    priors = torch.arange(num_priors, dtype=torch.float32)[:, None] * torch.tensor([1.0, 1, 1, 1])
    priors[:, 2:] += 5
    gt_bboxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [5.0, 5.0, 10.0, 10.0]])
    result = AssignResult(2, gt_inds, torch.rand(num_priors), labels)
    return result, priors, gt_bboxes


def test_pseudo_sampler_takes_everything():
    result, priors, gts = make_assignment()
    s = PseudoSampler().sample(result, priors, gts)
    assert s.pos_inds.tolist() == [0, 3, 5]
    assert s.neg_inds.tolist() == [4, 6, 7, 8, 9]
    assert s.pos_assigned_gt_inds.tolist() == [0, 0, 1]
    assert torch.equal(s.pos_gt_bboxes, gts[[0, 0, 1]])
    assert s.pos_gt_labels.tolist() == [7, 7, 4]
    assert torch.equal(s.pos_priors, priors[[0, 3, 5]])
    assert s.num_gts == 2 and s.avg_factor == 3
    assert s.pos_is_gt.tolist() == [0, 0, 0]
    assert s.priors.shape == (8, 4)


def test_pseudo_sampler_empty_gt():
    priors = torch.rand(4, 4)
    priors[:, 2:] += 1
    result = AssignResult(0, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.full((4,), -1))
    s = PseudoSampler().sample(result, priors, torch.zeros(0, 4))
    assert s.pos_inds.numel() == 0 and s.neg_inds.tolist() == [0, 1, 2, 3]
    assert s.pos_gt_bboxes.shape == (0, 4) and s.avg_factor == 1


def test_random_sampler_counts_and_seed():
    result, priors, gts = make_assignment()
    sampler = RandomSampler(4, 0.25, add_gt_as_proposals=False)
    sampler.generator = torch.Generator().manual_seed(0)
    s = sampler.sample(result, priors, gts)
    assert s.pos_inds.numel() == 1 and set(s.pos_inds.tolist()) <= {0, 3, 5}
    assert s.neg_inds.numel() == 3 and set(s.neg_inds.tolist()) <= {4, 6, 7, 8, 9}
    assert s.pos_inds.tolist() == sorted(s.pos_inds.tolist())  # unique() sorts, as mmdet
    assert s.avg_factor == 1 + 3
    again = RandomSampler(
        4, 0.25, add_gt_as_proposals=False, generator=torch.Generator().manual_seed(0)
    )
    s2 = again.sample(result, priors, gts)
    assert torch.equal(s.pos_inds, s2.pos_inds) and torch.equal(s.neg_inds, s2.neg_inds)


def test_random_sampler_neg_pos_ub_and_too_few_positives():
    result, priors, gts = make_assignment()
    # 3 positives available, 8 wanted: take all 3; negatives bounded by 1 * 3
    s = RandomSampler(16, 0.5, neg_pos_ub=1, add_gt_as_proposals=False).sample(result, priors, gts)
    assert s.pos_inds.tolist() == [0, 3, 5] and s.neg_inds.numel() == 3


def test_random_sampler_adds_gts_as_proposals():
    result, priors, gts = make_assignment()
    s = RandomSampler(20, 0.5, generator=torch.Generator().manual_seed(1)).sample(
        result, priors, gts, gt_labels=torch.tensor([7, 4])
    )
    # the 2 GTs are prepended: indices shift by 2 and GTs are positives of themselves
    assert s.pos_inds.tolist() == [0, 1, 2, 5, 7]
    assert s.pos_is_gt.tolist() == [1, 1, 0, 0, 0]
    assert s.pos_gt_labels.tolist() == [7, 4, 7, 7, 4]
    assert torch.equal(s.pos_priors[:2], gts)
    assert result.num_preds == 12  # add_gt_ modified the assignment in place
    with pytest.raises(ValueError, match="gt_labels"):
        RandomSampler(4, 0.5).sample(*make_assignment())


def test_bad_arguments():
    result, priors, gts = make_assignment()
    with pytest.raises(ValueError, match="priors"):
        PseudoSampler().sample(result, priors[:5], gts)
    with pytest.raises(TypeError, match="assign_result"):
        PseudoSampler().sample(None, priors, gts)
    with pytest.raises(ValueError, match="pos_fraction"):
        RandomSampler(4, 1.5)
