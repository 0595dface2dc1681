"""ATSSAssigner: hand cases with known candidates and thresholds, the mean+std edge case, ties."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.assigners import ATSSAssigner
from labkit.assigners.atss import INF


def grid_priors(n: int = 5, stride: float = 10.0, size: float = 10.0) -> torch.Tensor:
    """n x n square priors of side ``size`` centred at (stride/2 + i*stride, ...), x fastest."""
    c = torch.arange(n) * stride + stride / 2
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    cx, cy = cx.flatten(), cy.flatten()
    h = size / 2
    return torch.stack([cx - h, cy - h, cx + h, cy + h], 1)


def test_hand_case_threshold_mean_plus_std():
    # GT centred on prior 12 (centre (25, 25)); the 9 nearest priors are unique:
    #   centre prior: IoU 100/400 = 0.25; 4 edge neighbours: 50/450 = 1/9; 4 corners: 25/475.
    priors = grid_priors()
    gt = torch.tensor([[15.0, 15.0, 35.0, 35.0]])
    ious = torch.tensor([0.25] + [1 / 9] * 4 + [25 / 475] * 4)
    thr = ious.mean() + ious.std()  # 0.1006 + 0.0632 = 0.1638
    assert thr.item() == pytest.approx(0.16376, abs=1e-4)
    r = ATSSAssigner(topk=9).assign(priors, [25], gt, torch.tensor([3]))
    expected = torch.zeros(25, dtype=torch.long)
    expected[12] = 1
    assert torch.equal(r.gt_inds, expected)
    assert r.labels[12].item() == 3 and (r.labels[expected == 0] == -1).all()
    # max_overlaps: the IoU for the positive, -INF (-1e8) for everything else (mmdetection)
    assert r.max_overlaps[12].item() == pytest.approx(0.25)
    assert (r.max_overlaps[expected == 0] == -INF).all()


def test_four_positives_with_tied_outer_candidates():
    # GT covering the 4 central-ish priors exactly; 5 of the 8 priors at the next distance are
    # drawn (a tie) but all have IoU 0, so the result does not depend on which.
    priors = grid_priors()
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    ious = torch.tensor([0.25] * 4 + [0.0] * 5)
    assert (ious.mean() + ious.std()).item() == pytest.approx(0.2429, abs=1e-4)
    r = ATSSAssigner(topk=9).assign(priors, [25], gt)
    assert torch.nonzero(r.gt_inds).flatten().tolist() == [6, 7, 11, 12]
    assert r.labels is None


def test_edge_case_threshold_above_every_candidate():
    # Level 0: four 10x10 priors along x; level 1: two 20x20 priors. GT [0, 0, 20, 10].
    # topk=2 -> candidates: level 0 priors 0, 1 (IoU 0.5, 0.5), level 1 priors 4 (0.5) and
    # 5 (0.0). mean 0.375 + std 0.25 = 0.625 > 0.5: no candidate passes, the GT gets nothing.
    level0 = torch.tensor([[x, 0.0, x + 10, 10.0] for x in (0.0, 10.0, 20.0, 30.0)])
    level1 = torch.tensor([[0.0, 0.0, 20.0, 20.0], [20.0, 0.0, 40.0, 20.0]])
    priors = torch.cat([level0, level1])
    gt = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    r = ATSSAssigner(topk=2).assign(priors, [4, 2], gt)
    assert (r.gt_inds == 0).all()
    assert (r.max_overlaps == -INF).all()
    # on level 0 alone the two candidates tie at 0.5: mean 0.5, std 0 -> both positive (>=)
    r = ATSSAssigner(topk=2).assign(level0, [4], gt)
    assert r.gt_inds.tolist() == [1, 1, 0, 0]
    # a single candidate: std is NaN (unbiased, one sample; torch warns) and nothing passes
    with pytest.warns(UserWarning):
        r = ATSSAssigner(topk=1).assign(level0, [4], gt)
    assert (r.gt_inds == 0).all()


def test_centre_must_be_strictly_inside_the_gt():
    priors = grid_priors()
    # The two nearest priors have IoU 1/3 with the GT but their centres (25, 25) and (35, 25)
    # lie on the GT's left and right edges.
    gt = torch.tensor([[25.0, 20.0, 35.0, 30.0]])
    r = ATSSAssigner(topk=9).assign(priors, [25], gt)
    assert (r.gt_inds == 0).all()
    # 0.005 px inside is not enough either (mmdetection requires > 0.01) ...
    gt = torch.tensor([[24.995, 20.0, 35.005, 30.0]])
    assert (ATSSAssigner(topk=9).assign(priors, [25], gt).gt_inds == 0).all()
    # ... 0.02 px is
    gt = torch.tensor([[24.98, 20.0, 35.02, 30.0]])
    assert torch.nonzero(
        ATSSAssigner(topk=9).assign(priors, [25], gt).gt_inds
    ).flatten().tolist() == [12, 13]


def test_prior_claimed_by_two_gts_goes_to_the_higher_iou_then_the_lower_index():
    priors = grid_priors()
    a = torch.tensor([10.0, 10.0, 30.0, 30.0])  # inner priors IoU 0.25
    b = torch.tensor([10.0, 10.0, 32.0, 30.0])  # slightly larger: IoU 100/440 with them
    r = ATSSAssigner(topk=9).assign(priors, [25], torch.stack([b, a]))
    assert r.gt_inds[[6, 7, 11, 12]].tolist() == [2, 2, 2, 2]
    assert r.max_overlaps[6].item() == pytest.approx(0.25)
    # identical GTs: the IoUs tie and the first GT wins (argmax's first index)
    r = ATSSAssigner(topk=9).assign(priors, [25], torch.stack([a, a]))
    assert r.gt_inds[[6, 7, 11, 12]].tolist() == [1, 1, 1, 1]


def test_ignore_boxes():
    priors = grid_priors()
    gt = torch.tensor([[15.0, 15.0, 35.0, 35.0]])
    ignore = torch.tensor([[0.0, 40.0, 50.0, 50.0]])  # the bottom row of priors
    r = ATSSAssigner(topk=9, ignore_iof_thr=0.5).assign(priors, [25], gt, gt_bboxes_ignore=ignore)
    assert (r.gt_inds[20:] == -1).all()
    assert r.gt_inds[12].item() == 1
    assert (r.gt_inds[:20][torch.arange(20) != 12] == 0).all()


def test_empty_gt_and_empty_priors():
    priors = grid_priors(2)
    r = ATSSAssigner().assign(priors, [4], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert r.gt_inds.tolist() == [0, 0, 0, 0] and r.max_overlaps.tolist() == [0.0] * 4
    assert r.labels.tolist() == [-1] * 4
    r = ATSSAssigner().assign(torch.zeros(0, 4), [0], priors)
    assert r.gt_inds.shape == (0,) and r.num_gts == 4


def test_levels_respect_topk_per_level_and_bad_input():
    priors = torch.cat([grid_priors(), grid_priors(3, 20.0, 20.0)])
    gt = torch.tensor([[12.0, 12.0, 38.0, 38.0]])
    r = ATSSAssigner(topk=9).assign(priors, [25, 9], gt)
    assert r.gt_inds.shape == (34,)
    assert math.isfinite(r.max_overlaps[r.gt_inds > 0].sum().item())
    with pytest.raises(ValueError, match="num_level_priors"):
        ATSSAssigner().assign(priors, [25, 8], gt)
    with pytest.raises(ValueError, match="topk"):
        ATSSAssigner(topk=0)


def test_candidate_stats_expose_the_threshold():
    priors = grid_priors()
    gt = torch.tensor([[15.0, 15.0, 35.0, 35.0]])
    stats = ATSSAssigner(topk=9).candidate_stats(priors, [25], gt)
    assert stats["candidate_idxs"].shape == (9, 1)
    assert stats["candidate_idxs"][0, 0].item() == 12  # the nearest centre comes first
    assert stats["threshold"][0].item() == pytest.approx(0.16376, abs=1e-4)
    torch.testing.assert_close(stats["threshold"], stats["mean"] + stats["std"])


def reference_atss(priors, num_level_priors, gt_bboxes, topk, ignore=None, ignore_iof_thr=-1):
    """mmdetection's steps written out plainly (flattened-index form, loop over GTs)."""
    from labkit.boxes import bbox_overlaps

    big = 100000000
    num_gt, num_priors = len(gt_bboxes), len(priors)
    overlaps = bbox_overlaps(priors, gt_bboxes)
    gt_inds = torch.zeros(num_priors, dtype=torch.long)
    gc = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2.0
    pc = (priors[:, :2] + priors[:, 2:]) / 2.0
    distances = (pc[:, None, :] - gc[None, :, :]).pow(2).sum(-1).sqrt()
    if ignore is not None and ignore_iof_thr > 0:
        ign = bbox_overlaps(priors, ignore, mode="iof").max(dim=1).values > ignore_iof_thr
        distances[ign, :] = big
        gt_inds[ign] = -1
    cands, start = [], 0
    for n in num_level_priors:
        _, idx = distances[start : start + n].topk(min(topk, n), dim=0, largest=False)
        cands.append(idx + start)
        start += n
    cands = torch.cat(cands)
    cand_ov = overlaps[cands, torch.arange(num_gt)]
    is_pos = cand_ov >= (cand_ov.mean(0) + cand_ov.std(0))[None, :]
    for k in range(num_gt):
        cands[:, k] += k * num_priors
    ex = pc[:, 0].repeat(num_gt)
    ey = pc[:, 1].repeat(num_gt)
    flat = cands.view(-1)
    d = torch.stack(
        [
            ex[flat].view(-1, num_gt) - gt_bboxes[:, 0],
            ey[flat].view(-1, num_gt) - gt_bboxes[:, 1],
            gt_bboxes[:, 2] - ex[flat].view(-1, num_gt),
            gt_bboxes[:, 3] - ey[flat].view(-1, num_gt),
        ],
        dim=1,
    )
    is_pos &= d.min(dim=1).values > 0.01
    inf = torch.full_like(overlaps, -big).t().contiguous().view(-1)
    index = flat[is_pos.view(-1)]
    inf[index] = overlaps.t().contiguous().view(-1)[index]
    max_ov, argmax = inf.view(num_gt, -1).t().max(dim=1)
    gt_inds[max_ov != -big] = argmax[max_ov != -big] + 1
    return gt_inds, max_ov


def test_matches_a_plain_reference_on_random_scenes():
    gen = torch.Generator().manual_seed(0)
    priors = torch.cat(
        [grid_priors(16, 8.0, 32.0), grid_priors(8, 16.0, 64.0), grid_priors(4, 32.0, 128.0)]
    )
    levels = [256, 64, 16]
    for trial in range(20):
        k = int(torch.randint(1, 12, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * 100
        wh = torch.rand(k, 2, generator=gen) * 60 + 4
        gts = torch.cat([xy, xy + wh], 1).round()  # integer boxes: plenty of distance ties
        ignore = torch.tensor([[0.0, 0.0, 40.0, 30.0]]) if trial % 2 else None
        r = ATSSAssigner(9, ignore_iof_thr=0.5).assign(priors, levels, gts, gt_bboxes_ignore=ignore)
        ref_inds, ref_max = reference_atss(priors, levels, gts, 9, ignore, 0.5)
        assert torch.equal(r.gt_inds, ref_inds), trial
        assert torch.equal(r.max_overlaps, ref_max), trial
