"""Every dense head's ``loss_and_targets``: the same losses as ``loss``, and the targets the loss used.

Each head is small (two levels, strides 8 and 16, 8 channels) and sees two 64 x 64 images:
three GT boxes in the first, none in the second. Besides ``loss_and_targets(...)[0] ==
loss(...)``, each test recomputes (at least) one loss term from the returned targets alone
(positives, labels, weights, normaliser) and the raw head outputs, so targets that differ from
the loss's own assignment fail.
"""

from __future__ import annotations

import pytest
import torch

from labkit.anchors import AnchorGenerator
from labkit.boxes import bbox_overlaps
from labkit.heads.anchor_head import AnchorTargets
from labkit.heads.atss import ATSSHead, centerness_target
from labkit.heads.dense_head import flatten_levels
from labkit.heads.fcos import INF, FCOSHead, FCOSTargets
from labkit.heads.fcos import centerness_target as fcos_centerness_target
from labkit.heads.fovea import FoveaHead, FoveaTargets
from labkit.heads.fsaf import FSAFHead, FSAFTargets
from labkit.heads.paa import PAAHead, PAATargets
from labkit.heads.reppoints import RepPointsHead, RepPointsTargets, offsets_to_points
from labkit.heads.retina import RetinaNetHead

C = 3
SIZES = [(8, 8), (4, 4)]
META = {
    "img_shape": (64, 64),
    "pad_shape": (64, 64),
    "batch_input_shape": (64, 64),
    "scale_factor": (1.0, 1.0, 1.0, 1.0),
}
GTS = torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 62.0, 60.0], [10.0, 36.0, 26.0, 58.0]])
LABELS = torch.tensor([0, 2, 1])


def batch() -> dict:
    return {
        "img_metas": [META, META],
        "gt_bboxes": [GTS.clone(), torch.zeros(0, 4)],
        "gt_labels": [LABELS.clone(), torch.zeros(0, dtype=torch.long)],
    }


def feats() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, h, w, generator=g) for h, w in SIZES]


def anchors(octave_base_scale: int, ratios: list[float]) -> AnchorGenerator:
    return AnchorGenerator(
        strides=[8, 16], ratios=ratios, octave_base_scale=octave_base_scale, scales_per_octave=1
    )


def build(name: str):
    torch.manual_seed(0)
    if name == "retina":
        return RetinaNetHead(C, 8, 8, 1, anchor_generator=anchors(4, [0.5, 1.0, 2.0]))
    if name == "atss":
        return ATSSHead(C, 8, 8, 1, num_groups=4, anchor_generator=anchors(4, [1.0]))
    if name == "paa":
        return PAAHead(C, 8, 8, 1, num_groups=4, anchor_generator=anchors(4, [1.0]))
    if name == "fcos":
        return FCOSHead(
            C,
            8,
            feat_channels=8,
            stacked_convs=1,
            strides=(8, 16),
            regress_ranges=((-1, 32), (32, INF)),
            center_sampling=True,
            norm_on_bbox=True,
        )
    if name == "fovea":
        return FoveaHead(
            C,
            8,
            feat_channels=8,
            stacked_convs=1,
            strides=(8, 16),
            base_edges=(16, 32),
            scale_ranges=((1, 64), (32, 128)),
        )
    if name == "fsaf":
        return FSAFHead(C, 8, 8, 1, strides=(8, 16))
    if name == "reppoints":
        return RepPointsHead(
            C, 8, feat_channels=8, stacked_convs=1, point_feat_channels=8, strides=(8, 16)
        )
    raise AssertionError(name)


HEADS = ["retina", "atss", "paa", "fcos", "fovea", "fsaf", "reppoints"]


def run(name: str):
    """``(head, losses, targets, outs)`` from ``loss_and_targets``, ``outs`` a fresh forward."""
    head = build(name)
    losses, targets = head.loss_and_targets(feats(), batch())
    with torch.no_grad():
        outs = head(feats())
    return head, losses, targets, outs


def pos_mask(labels: torch.Tensor) -> torch.Tensor:
    return (labels >= 0) & (labels < C)


def check_positives(labels: torch.Tensor, pos_inds: list[torch.Tensor], num_pos: list[int]):
    """``pos_inds`` are exactly the foreground rows of ``labels [B, N]``; image 1 has none."""
    assert labels.shape[0] == 2 == len(pos_inds) == len(num_pos)
    for i in range(2):
        expected = pos_mask(labels[i]).nonzero().view(-1)
        assert torch.equal(pos_inds[i], expected)
        assert num_pos[i] == len(expected)
    assert num_pos[0] > 0, "the case needs positives in the first image"
    assert num_pos[1] == 0 and (labels[1] == C).all()


@pytest.mark.parametrize("name", HEADS)
def test_loss_and_targets_losses_equal_loss_exactly(name):
    head = build(name)
    losses, _ = head.loss_and_targets(feats(), batch())
    reference = head.loss(feats(), batch())
    assert set(losses) == set(reference) and all(k.startswith("loss_") for k in losses)
    for key in losses:
        assert torch.equal(losses[key], reference[key]), key
    by_feat = head.loss_by_feat(
        *head(feats()),
        batch_gt_bboxes=batch()["gt_bboxes"],
        batch_gt_labels=batch()["gt_labels"],
        batch_img_metas=batch()["img_metas"],
    )
    for key in losses:
        assert torch.equal(by_feat[key], reference[key]), key


def test_retinanet_targets_reproduce_both_losses():
    head, losses, t, (cls_scores, bbox_preds) = run("retina")
    assert isinstance(t, AnchorTargets)
    check_positives(t.labels, t.pos_inds, t.num_pos)
    # mmdetection's avg_factor: max(P_i, 1) per image (image 1 has no GT and counts 1)
    assert t.avg_factor == t.num_pos[0] + 1
    cls = flatten_levels(cls_scores, C)  # [B, N, C], the anchors' order
    expected_cls = head.loss_cls(
        cls.reshape(-1, C),
        t.labels.reshape(-1),
        t.label_weights.reshape(-1),
        reduction_override="sum",
    )
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item() / t.avg_factor, rel=1e-5)
    deltas = flatten_levels(bbox_preds, 4)[0, t.pos_inds[0]]
    expected_bbox = (deltas - t.bbox_targets[0, t.pos_inds[0]]).abs().sum() / t.avg_factor
    assert losses["loss_bbox"].item() == pytest.approx(expected_bbox.item(), rel=1e-5)
    # targets of the positives are their GTs, encoded
    gt = GTS[t.pos_gt_inds[0]]
    enc = head.bbox_coder.encode(t.anchors[t.pos_inds[0]], gt)
    assert torch.allclose(t.bbox_targets[0, t.pos_inds[0]], enc, atol=1e-6)
    assert (t.labels[0, t.pos_inds[0]] == LABELS[t.pos_gt_inds[0]]).all()


def test_atss_targets_carry_what_codetr_reads_and_reproduce_centerness_loss():
    head, losses, t, (_, _, centernesses) = run("atss")
    assert isinstance(t, AnchorTargets)
    check_positives(t.labels, t.pos_inds, t.num_pos)
    n = sum(h * w for h, w in SIZES)
    assert t.anchors.shape == (n, 4) and t.bbox_targets.shape == (2, n, 4)
    assert t.avg_factor == t.num_pos[0] + 1
    pos = t.pos_inds[0]
    # regression targets are the assigned GT boxes themselves (reg_decoded_bbox)
    assert torch.equal(t.bbox_targets[0, pos], GTS[t.pos_gt_inds[0]])
    ctr_target = centerness_target(t.anchors[pos], t.bbox_targets[0, pos])
    ctr_pred = flatten_levels(centernesses, 1)[0, pos, 0]
    expected = head.loss_centerness(ctr_pred, ctr_target, reduction_override="sum")
    assert losses["loss_centerness"].item() == pytest.approx(
        expected.item() / t.avg_factor, rel=1e-5
    )


def test_paa_targets_are_the_reassigned_positives_the_loss_used():
    head, losses, t, (cls_scores, bbox_preds, iou_preds) = run("paa")
    assert isinstance(t, PAATargets) and isinstance(t.first_stage, AnchorTargets)
    check_positives(t.labels, t.pos_inds, t.num_pos)
    first = t.first_stage
    pos = t.pos_inds[0]
    # the GMM keeps a subset of the first stage's (MaxIoU 0.1) positives, labels unchanged
    assert set(pos.tolist()) <= set(first.pos_inds[0].tolist())
    assert t.num_pos[0] <= first.num_pos[0]
    assert torch.equal(t.labels[0, pos], first.labels[0, pos])
    dropped = sorted(set(first.pos_inds[0].tolist()) - set(pos.tolist()))
    assert (t.labels[0, dropped] == C).all() and (t.bbox_weights[0, dropped] == 0).all()
    assert (t.bbox_weights[0, pos] == 1).all()
    assert torch.equal(t.pos_gt_inds[0], first.pos_gt_inds[0][torch.isin(first.pos_inds[0], pos)])
    assert t.avg_factor == max(sum(t.num_pos), 2)
    # loss_iou = 0.5 * BCE(iou_pred, IoU(decoded, target)) / num_pos over these positives
    decoded = head.bbox_coder.decode(t.anchors[pos], flatten_levels(bbox_preds, 4)[0, pos])
    iou = bbox_overlaps(decoded, t.bbox_targets[0, pos], is_aligned=True)
    iou_pred = flatten_levels(iou_preds, 1)[0, pos]
    expected = head.loss_centerness(iou_pred, iou.unsqueeze(-1), reduction_override="sum")
    assert losses["loss_iou"].item() == pytest.approx(expected.item() / t.num_pos[0], rel=1e-5)
    expected_cls = head.loss_cls(
        flatten_levels(cls_scores, C).reshape(-1, C),
        t.labels.reshape(-1),
        t.label_weights.reshape(-1),
        reduction_override="sum",
    )
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item() / t.avg_factor, rel=1e-5)


def test_fcos_targets_reproduce_cls_and_centerness_losses():
    head, losses, t, (cls_scores, _, centernesses) = run("fcos")
    assert isinstance(t, FCOSTargets)
    check_positives(t.labels, t.pos_inds, t.num_pos)
    assert t.num_level_points == [h * w for h, w in SIZES]
    assert t.points.shape == (sum(t.num_level_points), 2)
    assert t.strides.tolist() == [8.0] * 64 + [16.0] * 16
    assert t.avg_factor == sum(t.num_pos)
    # get_targets keeps its per-level [B * N_l] layout; FCOSTargets is the same numbers
    labels_lvl, targets_lvl = head.get_targets(
        [t.points[:64], t.points[64:]], batch()["gt_bboxes"], batch()["gt_labels"]
    )
    assert torch.equal(torch.cat([x.view(2, -1) for x in labels_lvl], 1), t.labels)
    assert torch.equal(torch.cat([x.view(2, -1, 4) for x in targets_lvl], 1), t.bbox_targets)
    pos = t.pos_inds[0]
    # norm_on_bbox: the (l, t, r, b) targets are in stride units
    ltrb_px = t.bbox_targets[0, pos] * t.strides[pos, None]
    xy = t.points[pos]
    box = torch.cat([xy - ltrb_px[:, :2], xy + ltrb_px[:, 2:]], 1)
    assert all(((b - GTS).abs().amax(1) < 1e-4).any() for b in box)
    cls = flatten_levels(cls_scores, C).reshape(-1, C)
    expected_cls = head.loss_cls(cls, t.labels.reshape(-1), reduction_override="sum")
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item() / t.avg_factor, rel=1e-5)
    ctr_pred = flatten_levels(centernesses, 1)[0, pos, 0]
    ctr_target = fcos_centerness_target(t.bbox_targets[0, pos])
    expected_ctr = head.loss_centerness(ctr_pred, ctr_target, reduction_override="sum")
    assert losses["loss_centerness"].item() == pytest.approx(
        expected_ctr.item() / t.num_pos[0], rel=1e-5
    )


def test_fovea_targets_reproduce_both_losses():
    head, losses, t, (cls_scores, bbox_preds) = run("fovea")
    assert isinstance(t, FoveaTargets)
    check_positives(t.labels, t.pos_inds, t.num_pos)
    assert t.avg_factor == sum(t.num_pos) + 2
    pos = t.pos_inds[0]
    assert (t.bbox_targets[1] == 0).all()  # log(1) on background
    cls = flatten_levels(cls_scores, C).reshape(-1, C)
    expected_cls = head.loss_cls(cls, t.labels.reshape(-1), reduction_override="sum")
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item() / t.avg_factor, rel=1e-5)
    pred = flatten_levels(bbox_preds, 4)[0, pos]
    expected_bbox = head.loss_bbox(pred, t.bbox_targets[0, pos], reduction_override="sum")
    assert losses["loss_bbox"].item() == pytest.approx(
        expected_bbox.item() / t.num_pos[0], rel=1e-5
    )


def test_fsaf_targets_keep_each_gt_on_its_selected_level():
    head, losses, t, (cls_scores, bbox_preds) = run("fsaf")
    assert isinstance(t, FSAFTargets)
    assert len(t.selected_levels) == 2 and len(t.selected_levels[1]) == 0
    assert len(t.selected_levels[0]) == len(GTS)
    n0 = t.num_level_priors[0]
    pos = t.pos_inds[0]
    assert t.num_pos == [len(pos), 0] and len(pos) > 0 and len(t.pos_inds[1]) == 0
    assert t.avg_factor == sum(t.num_pos)
    # every counted positive sits on the level selected for its GT
    level_of = (pos >= n0).long()
    assert torch.equal(level_of, t.selected_levels[0][t.pos_gt_inds[0]])
    assert torch.equal(t.pos_gt_inds[0], t.gt_inds[0, pos])
    # assigned anchors on another level count for nothing in the box loss
    assigned = (t.gt_inds[0] >= 0).nonzero().view(-1)
    others = assigned[~torch.isin(assigned, pos)]
    assert (t.bbox_weights[0, others] == 0).all() and (t.bbox_weights[0, pos] == 1).all()
    assert (t.label_weights[0, others, t.labels[0, others]] == 0).all()
    # loss_bbox = summed IoU loss of the counted positives / their number
    pred = flatten_levels([b.clamp(min=1e-4) for b in bbox_preds], 4)[0, pos]
    decoded = head.bbox_coder.decode(t.anchors[pos], pred)
    expected_bbox = head.loss_bbox(decoded, t.bbox_targets[0, pos]).sum()
    assert losses["loss_bbox"].item() == pytest.approx(
        expected_bbox.item() / t.avg_factor, rel=1e-5
    )
    cls = flatten_levels(cls_scores, C).reshape(-1, C)
    expected_cls = (head.loss_cls(cls, t.labels.reshape(-1)) * t.label_weights.reshape(-1, C)).sum()
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item() / t.avg_factor, rel=1e-5)


def test_reppoints_targets_of_both_stages_reproduce_their_losses():
    head, losses, t, (cls_scores, pts_init, pts_refine) = run("reppoints")
    assert isinstance(t, RepPointsTargets)
    for stage in (t.init, t.refine):
        check_positives(stage.labels, stage.pos_inds, stage.num_pos)
        # sum over images of max(P_i, 1)
        assert stage.avg_factor == stage.num_pos[0] + 1
        p = stage.pos_inds[0]
        assert torch.equal(stage.bbox_gt[0, p], GTS[stage.pos_gt_inds[0]])
    # PointAssigner(pos_num=1): one init positive per GT
    assert sorted(t.init.pos_gt_inds[0].tolist()) == [0, 1, 2]
    assert t.refine_proposals.shape == (2, t.points.shape[0], 4)
    cls = flatten_levels(cls_scores, C).reshape(-1, C)
    expected_cls = head.loss_cls(
        cls, t.refine.labels.reshape(-1), t.refine.label_weights.reshape(-1),
        reduction_override="sum",
    )  # fmt: skip
    assert losses["loss_cls"].item() == pytest.approx(
        expected_cls.item() / t.refine.avg_factor, rel=1e-5
    )
    levels = t.points[:, 2]
    norm = head.point_base_scale * levels
    for key, preds, stage, loss in (
        ("loss_pts_init", pts_init, t.init, head.loss_bbox_init),
        ("loss_pts_refine", pts_refine, t.refine, head.loss_bbox_refine),
    ):
        split = t.points.split(t.num_level_points)
        pts = torch.cat(
            [
                offsets_to_points(c, x, s)
                for c, x, s in zip(split, preds, head.strides, strict=True)
            ],
            1,
        )[0]
        p = stage.pos_inds[0]
        boxes = head.points2bbox(pts[p], y_first=False)
        expected = loss(
            boxes / norm[p, None], stage.bbox_gt[0, p] / norm[p, None], reduction_override="sum"
        )
        assert losses[key].item() == pytest.approx(expected.item() / stage.avg_factor, rel=1e-5)
