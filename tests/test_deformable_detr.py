"""Deformable-DETR: positional encoding, proposals, every forward path, masks, criterion, predict, overfit."""

import math

import pytest
import torch

from labkit.detectors.deformable_detr import DeformableDETR, gen_encoder_output_proposals
from labkit.detr.criterion import DETRCriterion
from labkit.detr.positional_encoding import SinePositionalEncoding, proposal_pos_embed
from labkit.detr.transformer import (
    encoder_reference_points,
    inverse_sigmoid,
    valid_ratios_from_mask,
)
from labkit.engine.train import build_optimizer
from labkit.recipes import deformable_detr, schedule


def param_groups(model, lr=2e-4):
    """The optimizer's groups under Deformable-DETR's schedule at base ``lr``."""
    return build_optimizer(model, schedule("deformable_detr", lr=lr)).param_groups


PATHS = [  # (two_stage, with_box_refine, mixed_selection)
    (False, False, False),
    (False, True, False),
    (True, False, False),
    (True, True, False),
    (True, True, True),
]


def _tiny(two_stage=True, refine=True, mixed=False, **kw):
    torch.manual_seed(0)
    kw = {"embed_dims": 32, "feedforward_channels": 64, "dropout": 0.0, **kw}
    return deformable_detr(
        3,
        backbone="tiny",
        num_queries=8,
        two_stage=two_stage,
        with_box_refine=refine,
        mixed_selection=mixed,
        **kw,
    )


def _batch():
    img = torch.full((2, 3, 64, 64), -1.0)
    img[0, :, 8:30, 10:40] = torch.tensor([2.0, 0, 0])[:, None, None]
    img[0, :, 36:60, 30:56] = torch.tensor([0.0, 2, 0])[:, None, None]
    img[1, :, 20:50, 20:44] = torch.tensor([0.0, 0, 2])[:, None, None]
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    img[1, :, :, 48:] = 0
    metas = [
        {"img_shape": (64, 64), "scale_factor": (1.0, 1.0, 1.0, 1.0)},
        {"img_shape": (64, 48), "scale_factor": (0.5, 0.5, 0.5, 0.5)},
    ]
    return {
        "img": img,
        "padding_mask": mask,
        "img_metas": metas,
        "gt_bboxes": [
            torch.tensor([[10.0, 8, 40, 30], [30, 36, 56, 60]]),
            torch.tensor([[20.0, 20, 44, 50]]),
        ],
        "gt_labels": [torch.tensor([0, 1]), torch.tensor([2])],
    }


def test_sine_positional_encoding_values_and_padding():
    enc = SinePositionalEncoding(num_feats=4, normalize=True, offset=-0.5)
    mask = torch.zeros(1, 1, 2, dtype=torch.bool)
    pos = enc(mask)
    assert pos.shape == (1, 8, 1, 2)
    # x of the second pixel: (2 - 0.5) / (2 + eps) * 2 pi; channels: sin(x), cos(x), sin(x/100), cos(x/100)
    x = 1.5 / (2 + 1e-6) * 2 * math.pi
    expected = torch.tensor([math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)])
    torch.testing.assert_close(pos[0, 4:, 0, 1], expected)
    y = 0.5 / (1 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(
        pos[0, :4, 0, 0],
        torch.tensor([math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]),
    )
    # Padding bottom-right leaves the encoding of the image pixels unchanged.
    enc = SinePositionalEncoding(num_feats=8, normalize=True, offset=-0.5)
    padded = torch.ones(1, 5, 7, dtype=torch.bool)
    padded[:, :3, :4] = False
    torch.testing.assert_close(
        enc(padded)[..., :3, :4], enc(torch.zeros(1, 3, 4, dtype=torch.bool))
    )


def test_proposal_pos_embed_layout():
    props = torch.zeros(1, 1, 4)  # sigmoid -> 0.5 -> pi
    emb = proposal_pos_embed(props, num_pos_feats=4)
    assert emb.shape == (1, 1, 16)
    torch.testing.assert_close(
        emb[0, 0, :4],
        torch.tensor(
            [math.sin(math.pi), math.cos(math.pi), math.sin(math.pi / 100), math.cos(math.pi / 100)]
        ),
    )


def test_gen_encoder_output_proposals_by_hand():
    shapes = torch.tensor([[2, 2], [1, 100]])
    memory = torch.ones(1, 104, 3)
    out_mem, props = gen_encoder_output_proposals(memory, None, shapes)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    torch.testing.assert_close(
        props[0, 0], torch.tensor([logit(0.25), logit(0.25), logit(0.05), logit(0.05)])
    )
    torch.testing.assert_close(
        props[0, 3], torch.tensor([logit(0.75), logit(0.75), logit(0.05), logit(0.05)])
    )
    torch.testing.assert_close(
        props[0, 5], torch.tensor([logit(0.015), logit(0.5), logit(0.1), logit(0.1)])
    )
    # cx = 0.005 < 0.01 is invalid: inf proposal, zero memory
    assert torch.isinf(props[0, 4]).all() and out_mem[0, 4].abs().sum() == 0
    assert torch.isfinite(props[0, :4]).all() and out_mem[0, :4].eq(1).all()
    # With a mask: the valid extent normalizes, padding is invalid.
    mask = torch.zeros(1, 104, dtype=torch.bool)
    mask[0, [1, 3]] = True  # right column of the 2x2 level
    _, props = gen_encoder_output_proposals(memory, mask, shapes)
    torch.testing.assert_close(props[0, 0, :2], torch.tensor([logit(0.5), logit(0.25)]))
    assert torch.isinf(props[0, 1]).all() and torch.isinf(props[0, 3]).all()


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, :2, :3] = False
    ratios = valid_ratios_from_mask(mask)
    torch.testing.assert_close(ratios, torch.tensor([[0.75, 0.5]]))
    refs = encoder_reference_points(torch.tensor([[4, 4]]), ratios[:, None])
    # pixel (x=1, y=0) -> (1.5 / 3, 0.5 / 2) of the valid image -> times the valid ratio
    torch.testing.assert_close(refs[0, 1, 0], torch.tensor([1.5 / 3 * 0.75, 0.25 * 0.5]))
    torch.testing.assert_close(
        inverse_sigmoid(torch.tensor([0.0, 0.5, 1.0])),
        torch.tensor([math.log(1e-5), 0.0, -math.log(1e-5)]),
    )


@pytest.mark.parametrize("two_stage,refine,mixed", PATHS)
def test_every_path_shapes_losses_and_predict(two_stage, refine, mixed):
    model = _tiny(two_stage, refine, mixed)
    batch = _batch()
    out = model(batch["img"], batch["padding_mask"])
    assert out["all_cls_scores"].shape == (2, 2, 8, 3)
    assert out["all_bbox_preds"].shape == (2, 2, 8, 4)
    assert ((out["all_bbox_preds"] > 0) & (out["all_bbox_preds"] < 1)).all()
    assert out["references"][0].shape[-1] == (4 if two_stage else 2)
    num_keys = int(out["spatial_shapes"].prod(1).sum())
    assert out["memory"].shape == (2, num_keys, 32)
    if two_stage:
        assert out["enc_outputs_class"].shape == (2, num_keys, 3)
        assert out["enc_outputs_coord"].shape == (2, num_keys, 4)
    else:
        assert out["enc_outputs_class"] is None
    losses = model.loss(batch)
    expected = {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou"}
    if two_stage:
        expected |= {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.decoder.layers[0].cross_attn.sampling_offsets.weight.grad.abs().sum() > 0
    model.eval()
    dets = model.predict(batch)
    assert [d["boxes"].shape for d in dets] == [(24, 4), (24, 4)]
    assert dets[1]["boxes"][:, 0::2].max() <= 48 / 0.5 and dets[1]["boxes"].min() >= 0
    assert (dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all()


def test_head_initialisation():
    one = _tiny(two_stage=False, refine=False)
    assert one.cls_branches[0] is one.cls_branches[1]  # shared without refinement
    torch.testing.assert_close(one.cls_branches[0].bias, torch.full((3,), -math.log(99)))
    assert one.reg_branches[1][-1].weight.abs().sum() == 0
    torch.testing.assert_close(one.reg_branches[0][-1].bias, torch.tensor([0.0, 0, -2, -2]))
    two = _tiny(two_stage=True, refine=True)
    assert len(two.cls_branches) == 3 and two.cls_branches[0] is not two.cls_branches[1]
    assert all(b[-1].bias.abs().sum() == 0 for b in two.reg_branches)
    with pytest.raises(ValueError, match="mixed_selection"):
        _tiny(two_stage=False, mixed=True)


@pytest.mark.parametrize("refine", [False, True])
def test_padding_does_not_change_the_unpadded_image(refine):
    """Padded features (garbage behind the mask) give the same decoder output as unpadded ones."""
    model = _tiny(two_stage=False, refine=refine).eval()
    torch.manual_seed(1)
    valid = [(6, 5), (3, 3), (2, 2), (1, 1)]
    padded = [(8, 7), (4, 4), (3, 3), (2, 2)]
    feats, pfeats, masks, pmasks = [], [], [], []
    for (h, w), (ph, pw) in zip(valid, padded, strict=True):
        f = torch.randn(1, 32, h, w)
        pf = torch.randn(1, 32, ph, pw) * 10  # garbage outside the image
        pf[..., :h, :w] = f
        m = torch.ones(1, ph, pw, dtype=torch.bool)
        m[:, :h, :w] = False
        feats.append(f)
        masks.append(torch.zeros(1, h, w, dtype=torch.bool))
        pfeats.append(pf)
        pmasks.append(m)
    with torch.no_grad():
        a = model.forward_transformer(feats, masks)
        b = model.forward_transformer(pfeats, pmasks)
    torch.testing.assert_close(a["hidden_states"], b["hidden_states"], atol=1e-5, rtol=1e-5)
    for ra, rb in zip(a["references"], b["references"], strict=True):
        torch.testing.assert_close(ra, rb, atol=1e-6, rtol=1e-5)


def test_criterion_perfect_boxes_and_avg_factor():
    crit = DETRCriterion(num_classes=2)
    metas = [{"img_shape": (100, 200)}]
    gt = torch.tensor([[20.0, 10.0, 60.0, 50.0]])
    boxes = torch.tensor(
        [[[0.2, 0.3, 0.2, 0.4], [0.7, 0.7, 0.1, 0.1]]]
    )  # query 0 is the GT exactly
    logits = torch.tensor([[[5.0, -5.0], [-5.0, -5.0]]])
    losses = crit(
        torch.stack([logits, logits]), torch.stack([boxes, boxes]), [gt], [torch.tensor([0])], metas
    )
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_iou"]) == pytest.approx(0.0, abs=1e-6)
    assert set(losses) == {
        "loss_cls",
        "loss_bbox",
        "loss_iou",
        "d0.loss_cls",
        "d0.loss_bbox",
        "d0.loss_iou",
    }
    # focal loss summed over all queries x classes, divided by the 1 matched query, times 2
    p = torch.sigmoid(logits[0])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    pt1 = (1 - p) * target + p * (1 - target)
    fl = (
        torch.nn.functional.binary_cross_entropy_with_logits(logits[0], target, reduction="none")
        * (0.25 * target + 0.75 * (1 - target))
        * pt1**2
    )
    assert float(losses["loss_cls"]) == pytest.approx(2.0 * float(fl.sum()), rel=1e-5)
    # no ground truth: only the classification loss is non-zero
    empty = crit(
        logits[None], boxes[None], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], metas
    )
    assert float(empty["loss_bbox"]) == 0 and float(empty["loss_cls"]) > 0


def test_encoder_proposal_loss_is_class_agnostic():
    crit = DETRCriterion(num_classes=3)
    metas = [{"img_shape": (50, 50)}]
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])
    logits = torch.tensor([[[3.0, -3.0, -3.0]]])
    losses = crit(
        logits[None],
        boxes[None],
        [torch.tensor([[15.0, 15, 35, 35]])],
        [torch.tensor([2])],
        metas,
        logits,
        boxes,
    )
    # GT of class 2 but the proposal target is class 0: a confident class-0 logit costs little.
    assert float(losses["enc_loss_cls"]) < float(losses["loss_cls"])


def test_predict_topk_over_queries_and_classes_and_rescale():
    model = _tiny(two_stage=False, refine=False, max_per_img=3)
    cls = torch.tensor([[-5.0, 4.0], [3.0, 2.0], [-5.0, -5.0]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    model.num_classes = 2
    det = model._predict_single(
        cls, box, {"img_shape": (100, 200), "scale_factor": (2.0, 2.0, 2.0, 2.0)}, True
    )
    assert det["labels"].tolist() == [1, 0, 1]
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([4.0, 3.0, 2.0])))
    torch.testing.assert_close(det["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]) / 2)
    torch.testing.assert_close(det["boxes"][1], torch.tensor([0.0, 0.0, 100.0, 50.0]) / 2)


def test_param_groups_and_train_config():
    model = _tiny()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3)}
    assert groups["default"]["lr"] == pytest.approx(1e-3)
    for key in ("backbone", "sampling_offsets"):
        assert groups[key]["lr"] == pytest.approx(1e-4)
    assert all("sampling_offsets" in n for n in groups["sampling_offsets"]["param_names"])
    one = _tiny(two_stage=False)
    assert "reference_points" in {g["name"] for g in param_groups(one)}
    cfg = schedule("deformable_detr", epochs=2)
    assert cfg.optimizer == "adamw" and cfg.max_norm == 0.1 and cfg.lr == 2e-4 and cfg.epochs == 2
    assert model.recipe[0] == "deformable_detr" and model.recipe[1]["backbone"] == "tiny"


def test_loss_rejects_bad_ground_truth():
    model = _tiny()
    batch = _batch()
    batch["gt_labels"] = [torch.tensor([0, 5]), torch.tensor([2])]
    with pytest.raises(ValueError, match="gt_labels"):
        model.loss(batch)
    batch = _batch()
    batch["gt_bboxes"][1] = torch.tensor([[30.0, 20, 10, 50]])
    with pytest.raises(ValueError, match="gt_bboxes"):
        model.loss(batch)


@pytest.mark.slow
def test_overfit_two_images():
    model = _tiny(two_stage=True, refine=True)
    batch = _batch()
    opt = build_optimizer(model, schedule("deformable_detr", lr=1e-3))
    first = None
    for _ in range(80):
        losses = model.loss(batch)
        total = sum(losses.values())
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    assert float(total.detach()) < 0.25 * first
    model.eval()
    det = model.predict(batch, rescale=False)[0]
    from labkit.boxes import bbox_overlaps

    ious = bbox_overlaps(det["boxes"][:2], batch["gt_bboxes"][0]).max(1).values
    assert (ious > 0.5).all(), ious
    assert isinstance(model, DeformableDETR)
