"""FSAF: CenterRegionAssigner hand cases, TBLR coder, online feature selection, head loss."""

import pytest
import torch

from labkit.assigners.center_region import CenterRegionAssigner
from labkit.heads.fsaf import (
    FSAFHead,
    TBLRBBoxCoder,
    fsaf_anchor_generator,
    level_loss_table,
    select_levels,
)

PRIORS = torch.tensor(
    [
        [18.0, 18.0, 22.0, 22.0],  # centre (20, 20): in both cores
        [14.0, 14.0, 18.0, 18.0],  # touches only the big core
        [0.0, 0.0, 8.0, 8.0],  # inside the big box, outside its core
        [36.0, 36.0, 52.0, 52.0],  # outside everything
        [22.0, 18.0, 62.0, 24.0],  # centre (42, 21) outside the big box, overlaps its core
    ]
)
GTS = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 30.0, 30.0]])


def test_center_region_mmdet_docstring_case():
    res = CenterRegionAssigner(0.2, 0.2).assign(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]]),
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        torch.tensor([0]),
    )
    assert res.gt_inds.tolist() == [1, 0]


def test_center_region_smallest_wins_and_shadows():
    res = CenterRegionAssigner(0.2, 0.2, min_pos_iof=0.01).assign(PRIORS, GTS, torch.tensor([0, 1]))
    assert res.gt_inds.tolist() == [2, 1, 0, 0, 0]
    assert res.labels.tolist() == [1, 0, -1, -1, -1]
    # Shadow pairs (prior, class): prior 4 overlaps the big core with its centre outside;
    # prior 0 lost the big GT's core to the small GT.
    assert res.shadowed_labels.tolist() == [[4, 0], [0, 0]]


def test_center_region_shadow_of_same_class_overrides_positive():
    same = torch.tensor([0, 0])
    res = CenterRegionAssigner(0.2, 0.2).assign(PRIORS, GTS, same)
    assert res.gt_inds.tolist() == [0, 1, 0, 0, 0]  # prior 0 is shadowed for its own class
    assert res.labels.tolist() == [-1, 0, -1, -1, -1]
    res = CenterRegionAssigner(0.2, 0.2, foreground_dominate=True).assign(PRIORS, GTS, same)
    assert res.gt_inds.tolist() == [2, 1, 0, 0, 0]
    assert res.shadowed_labels.tolist() == [[4, 0]]


def test_center_region_ignore_and_empty():
    res = CenterRegionAssigner(0.2, 0.2).assign(
        PRIORS, GTS, torch.tensor([0, 1]), gt_bboxes_ignore=torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    )
    assert res.gt_inds.tolist() == [2, 1, -1, 0, 0]  # centre (4, 4) inside [2.5, 7.5]^2
    res = CenterRegionAssigner(0.2, 0.2).assign(
        PRIORS, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert res.gt_inds.tolist() == [0] * 5 and res.shadowed_labels.shape == (0, 2)
    with pytest.raises(ValueError, match="gt_bboxes"):
        CenterRegionAssigner(0.2, 0.2).assign(
            PRIORS, torch.tensor([[5.0, 0.0, 1.0, 1.0]]), torch.tensor([0])
        )


def test_tblr_coder_hand_values_and_clip():
    coder = TBLRBBoxCoder(normalizer=4.0)
    prior = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    gt = torch.tensor([[0.0, 2.0, 12.0, 6.0]])
    enc = coder.encode(prior, gt)
    assert enc.tolist() == [[0.0625, 0.0625, 0.125, 0.25]]  # (t, b, l, r) / (4 * 8)
    assert torch.allclose(coder.decode(prior, enc), gt)
    assert coder.decode(prior, enc, max_shape=(5, 10)).tolist() == [[0.0, 2.0, 10.0, 5.0]]


def test_anchor_per_location_is_stride_square_at_cell_corner():
    anchors = fsaf_anchor_generator((8, 16)).grid_priors([(2, 2), (1, 1)])
    assert anchors[0][:2].tolist() == [[-4.0, -4.0, 4.0, 4.0], [4.0, -4.0, 12.0, 4.0]]
    assert anchors[1].tolist() == [[-8.0, -8.0, 8.0, 8.0]]


def test_online_feature_selection_on_constructed_loss_table():
    table = torch.tensor([[1.0, 5.0, 1e6, 2.0], [2.0, 3.0, 1e6, 2.0], [0.5, 7.0, 1e6, 9.0]])
    assert select_levels(table).tolist() == [2, 1, 0, 0]  # ties and "nowhere" -> first level
    assert select_levels(torch.zeros(3, 0)).shape == (0,)
    # Mean of (summed focal + IoU) over each GT's positives on each level.
    cls = [
        torch.tensor([[0.1, 0.2], [0.3, 0.0], [1.0, 1.0]]),
        torch.tensor([[0.0, 0.4], [0.2, 0.2]]),
    ]
    reg = [torch.tensor([0.5, 0.1, 2.0]), torch.tensor([0.1, 0.2])]
    gt_inds = [torch.tensor([0, 0, -1]), torch.tensor([1, 0])]
    t = level_loss_table(cls, reg, gt_inds, num_gts=2)
    assert t[0].tolist() == pytest.approx([(0.8 + 0.4) / 2, 1e6])
    assert t[1].tolist() == pytest.approx([0.6, 0.5])
    assert select_levels(t).tolist() == [0, 1]  # GT 0 ties at 0.6: the first level


def test_head_loss_selects_one_level_per_gt():
    torch.manual_seed(0)
    head = FSAFHead(2, 8, 8, 1, strides=(8, 16))
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), scale_factor=(1.0, 1.0, 1.0, 1.0))]
    batch = dict(
        img_metas=metas,
        gt_bboxes=[torch.tensor([[4.0, 4.0, 60.0, 60.0]])],
        gt_labels=[torch.tensor([1])],
    )
    losses = head.loss(feats, batch)
    assert set(losses) == {"loss_cls", "loss_bbox"} and all(
        torch.isfinite(v) for v in losses.values()
    )
    assert losses["loss_bbox"] > 0
    # Redo the selection by hand: the loss divided by the positives of the chosen level only.
    cls_scores, bbox_preds = head(feats)
    sums = []
    for lvl in range(2):
        anchors = head.prior_generator.grid_priors([(8, 8), (4, 4)])[lvl]
        res = head.assigner.assign(anchors, batch["gt_bboxes"][0], batch["gt_labels"][0])
        pos = (res.gt_inds > 0).nonzero().flatten()
        pred = bbox_preds[lvl].clamp(min=1e-4).permute(0, 2, 3, 1).reshape(-1, 4)
        iou = head.loss_bbox(
            head.bbox_coder.decode(anchors[pos], pred[pos]),
            batch["gt_bboxes"][0].expand(len(pos), 4),
        )
        sums.append((len(pos), iou.sum()))
    assert all(n > 0 for n, _ in sums)  # the GT has positives on both levels
    assert any(
        losses["loss_bbox"].item() == pytest.approx((s / n).item(), rel=1e-5) for n, s in sums
    )
    batch = dict(
        img_metas=metas, gt_bboxes=[torch.zeros(0, 4)], gt_labels=[torch.zeros(0, dtype=torch.long)]
    )
    losses = head.loss(feats, batch)
    assert losses["loss_bbox"].item() == 0 and torch.isfinite(losses["loss_cls"])
