"""PAA re-assignment: hand case, GTs with 0/1/2 candidates, topk per level, backends agree."""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks.bench_paa import make_inputs, retinanet_anchors
from labkit.assigners.gmm import COVARIANCE_TYPES
from labkit.assigners.paa import paa_reassign, paa_select

C = 3  # classes; label 3 = background


def hand_case():
    """20 anchors on two levels of 10. GT0 has 3 low-loss and 3 high-loss positives, GT1 a
    single positive, GT2 none at all, GT3 two positives with almost equal losses."""
    pos_inds = torch.tensor([0, 1, 2, 5, 6, 10, 11, 12, 15])
    pos_gt_inds = torch.tensor([0, 0, 0, 1, 3, 0, 0, 0, 3])
    pos_losses = torch.tensor([0.1, 0.11, 0.12, 0.3, 0.5, 0.9, 1.0, 1.1, 0.52])
    labels = torch.full((20,), C)
    labels[pos_inds] = torch.tensor([0, 0, 0, 1, 2, 0, 0, 0, 2])
    label_weights = torch.ones(20)
    bbox_weights = (labels < C).float()[:, None].repeat(1, 4)
    return pos_losses, labels, label_weights, bbox_weights, pos_inds, pos_gt_inds


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
@pytest.mark.parametrize("cov", COVARIANCE_TYPES)
def test_hand_case(backend, cov):
    pos_losses, labels, lw, bw, pos_inds, pos_gt_inds = hand_case()
    before = labels.clone()
    new_labels, new_lw, new_bw, num_pos = paa_reassign(
        pos_losses, labels, lw, bw, pos_inds, pos_gt_inds, [10, 10],
        num_classes=C, covariance_type=cov, backend=backend,
    )  # fmt: skip
    # GT0 keeps its three low-loss anchors; GT1 (one candidate) loses its positive;
    # GT3's two samples collapse into one component each: the lower loss (anchor 6) stays.
    assert torch.nonzero(new_labels < C).flatten().tolist() == [0, 1, 2, 6]
    assert num_pos == 4
    assert new_labels[[5, 10, 11, 12, 15]].tolist() == [C] * 5
    assert new_labels[[0, 6]].tolist() == [0, 2]
    assert torch.equal(new_bw[:, 0], (new_labels < C).float())
    assert torch.equal(new_lw, lw)  # this separation scheme ignores nothing
    assert torch.equal(labels, before)  # inputs are not modified


def test_select_exposes_candidates_gmm_and_separation():
    pos_losses, _, _, _, pos_inds, pos_gt_inds = hand_case()
    sel = paa_select(pos_losses, pos_inds, pos_gt_inds, [10, 10])
    assert sel.fitted.tolist() == [True, False, False, True]
    assert sel.cand_inds[0].tolist() == [0, 1, 2, 10, 11, 12]
    assert sel.cand_inds[3, :2].tolist() == [6, 15]
    assert sel.components[0].tolist() == [0, 0, 0, 1, 1, 1]
    # separation point: the fg candidate with the highest log-likelihood (loss 0.12)
    assert sel.separation_loss[0].item() == pytest.approx(0.12)
    assert sel.pos_inds.tolist() == [0, 1, 2, 6]
    assert sel.gmm.means.shape == (2, 2)


def test_topk_per_level_limits_the_candidates():
    # 12 positives of one GT on level 0: only the 3 with the smallest loss are candidates.
    pos_inds = torch.arange(12)
    pos_losses = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.8, 0.3, 1.0, 0.7, 0.4, 0.6, 1.1, 1.2])
    pos_gt_inds = torch.zeros(12, dtype=torch.long)
    sel = paa_select(pos_losses, pos_inds, pos_gt_inds, [20, 4], topk=3)
    assert sorted(sel.cand_inds[0][sel.cand_mask[0]].tolist()) == [1, 3, 5]
    labels = torch.full((24,), C)
    labels[:12] = 0
    for backend in ("torch", "sklearn"):
        out, _, _, n = paa_reassign(
            pos_losses, labels, torch.ones(24), torch.ones(24, 4), pos_inds, pos_gt_inds,
            [20, 4], num_classes=C, topk=3, backend=backend,
        )  # fmt: skip
        assert 0 < n <= 3 and set(torch.nonzero(out == 0).flatten().tolist()) <= {1, 3, 5}
        assert (out[[0, 2, 4, 6, 7, 8, 9, 10, 11]] == C).all()


def test_no_positives_returns_the_inputs():
    labels, lw, bw = torch.full((5,), C), torch.ones(5), torch.zeros(5, 4)
    empty = torch.zeros(0, dtype=torch.long)
    out = paa_reassign(torch.zeros(0), labels, lw, bw, empty, empty, [5], num_classes=C)
    assert out[0] is labels and out[3] == 0


def test_backends_agree_on_random_images():
    anchors = retinanet_anchors((256, 384))
    total = equal = pos_total = pos_equal = same_count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning on rare GTs
        for seed in range(50):
            cov = "diag" if seed < 30 else COVARIANCE_TYPES[seed % 4]
            inputs = make_inputs(num_gts=6, image_shape=(256, 384), seed=seed, anchors=anchors)
            a, _, _, na = paa_reassign(**inputs, covariance_type=cov, backend="torch")
            b, _, _, nb = paa_reassign(**inputs, covariance_type=cov, backend="sklearn")
            total += a.numel()
            equal += int((a == b).sum())
            # The priors PAA decides on: the first-stage positives (the rest stay background).
            pos = inputs["pos_inds"]
            pos_total += pos.numel()
            pos_equal += int((a[pos] == b[pos]).sum())
            same_count += na == nb
    assert equal / total >= 0.995
    assert pos_equal / pos_total >= 0.995
    assert same_count >= 49


def test_bad_arguments():
    pos_losses, labels, lw, bw, pos_inds, pos_gt_inds = hand_case()
    args = (pos_losses, labels, lw, bw, pos_inds, pos_gt_inds)
    with pytest.raises(ValueError, match="backend"):
        paa_reassign(*args, [10, 10], num_classes=C, backend="numpy")
    with pytest.raises(ValueError, match="num_level_anchors"):
        paa_reassign(*args, [10, 9], num_classes=C)
    with pytest.raises(ValueError, match="covariance_type"):
        paa_reassign(*args, [10, 10], num_classes=C, covariance_type="none")
    with pytest.raises(ValueError, match="pos_losses"):
        paa_reassign(pos_losses[:3], *args[1:], [10, 10], num_classes=C)


def test_duplicate_pos_inds_are_refused():
    # Prior 1 listed twice (for GT 0 and GT 3): num_pos would count it twice.
    pos_losses, labels, lw, bw, pos_inds, pos_gt_inds = hand_case()
    pos_inds = pos_inds.clone()
    pos_inds[8] = 1
    for backend in ("torch", "sklearn"):
        with pytest.raises(
            ValueError, match=r"^pos_inds: expected each prior at most once, got duplicates \[1\]$"
        ):
            paa_reassign(
                pos_losses,
                labels,
                lw,
                bw,
                pos_inds,
                pos_gt_inds,
                [10, 10],
                num_classes=C,
                backend=backend,
            )
    with pytest.raises(ValueError, match=r"pos_inds: expected each prior at most once"):
        paa_select(pos_losses, pos_inds, pos_gt_inds, [10, 10])
    # Unsorted but distinct indices are fine and give the sorted result.
    order = torch.tensor([8, 0, 7, 1, 6, 2, 5, 3, 4])
    _, labels_b, lw_b, bw_b, inds_b, gts_b = hand_case()
    out, _, _, num_pos = paa_reassign(
        hand_case()[0][order],
        labels_b,
        lw_b,
        bw_b,
        inds_b[order],
        gts_b[order],
        [10, 10],
        num_classes=C,
    )
    assert torch.nonzero(out < C).flatten().tolist() == [0, 1, 2, 6] and num_pos == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses_name_pos_losses(bad):
    pos_losses, labels, lw, bw, pos_inds, pos_gt_inds = hand_case()
    pos_losses = pos_losses.clone()
    pos_losses[4] = bad
    match = (
        rf"^pos_losses: expected finite losses, got {bad} at 1 position\(s\) \[4\] "
        r"\(prior indices \[6\]\); the first-stage loss diverged$"
    )
    for backend in ("torch", "sklearn"):
        with pytest.raises(ValueError, match=match):
            paa_reassign(
                pos_losses,
                labels,
                lw,
                bw,
                pos_inds,
                pos_gt_inds,
                [10, 10],
                num_classes=C,
                backend=backend,
            )
    with pytest.raises(ValueError, match=match):
        paa_select(pos_losses, pos_inds, pos_gt_inds, [10, 10])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i, g: (i.float(), g), r"^pos_inds: expected an integer \(int64\) tensor, got dtype torch.float32$"),
        (lambda i, g: (i, g.float()), r"^pos_gt_inds: expected an integer \(int64\) tensor, got dtype torch.float32$"),
        (lambda i, g: (i.index_fill(0, torch.tensor([8]), 20), g), r"^pos_inds: expected prior indices in \[0, 19\] \(sum\(num_level_anchors\) = 20 priors\), got values in \[0, 20\]$"),
        (lambda i, g: (i.index_fill(0, torch.tensor([0]), -1), g), r"^pos_inds: expected prior indices in \[0, 19\] \(sum\(num_level_anchors\) = 20 priors\), got values in \[-1, 15\]$"),
        (lambda i, g: (i, g.index_fill(0, torch.tensor([3]), -2)), r"^pos_gt_inds: expected 0-based GT indices >= 0, got -2$"),
    ],
)  # fmt: skip
def test_bad_index_tensors_name_the_argument(edit, match):
    pos_losses, labels, lw, bw, pos_inds, pos_gt_inds = hand_case()
    pos_inds, pos_gt_inds = edit(pos_inds, pos_gt_inds)
    with pytest.raises(ValueError, match=match):
        paa_reassign(pos_losses, labels, lw, bw, pos_inds, pos_gt_inds, [10, 10], num_classes=C)
    with pytest.raises(ValueError, match=match):
        paa_select(pos_losses, pos_inds, pos_gt_inds, [10, 10])
