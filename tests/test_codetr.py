"""Co-DETR: every auxiliary path, positive-query construction by hand, loss weights, inference cost."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.codetr.positive_queries import (
    PositiveQueryEmbedding,
    group_size,
    hand_reference,
    pad_positives,
    padding_attn_mask,
)
from labkit.codetr.positives import AuxPositives
from labkit.data import collate
from labkit.detectors.co_detr import CoDETR
from labkit.detr.positional_encoding import proposal_pos_embed
from labkit.recipes import co_deformable_detr, deformable_detr

NUM_CLASSES = 3
AUX_PATHS = [(), ("atss",), ("faster_rcnn",), ("atss", "faster_rcnn")]


def make_batch(sizes=((96, 128), (128, 96))) -> dict:
    """Two images of different sizes (so padding masks matter) with 2 and 1 objects."""
    g = torch.Generator().manual_seed(0)
    boxes = [
        torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]),
        torch.tensor([[20.0, 20.0, 80.0, 110.0]]),
    ]
    items = []
    for i, (h, w) in enumerate(sizes):
        meta = dict(
            image_id=i, file_name=f"{i}.png", ori_shape=(h, w), img_shape=(h, w),
            pad_shape=(h, w), scale_factor=(1.0, 1.0, 1.0, 1.0), flip=False, flip_direction=None,
        )  # fmt: skip
        items.append(
            {
                "img": torch.randn(3, h, w, generator=g),
                "gt_bboxes": boxes[i],
                "gt_labels": torch.tensor([0, 2][: len(boxes[i])]),
                "gt_bboxes_ignore": torch.zeros(0, 4),
                "img_metas": meta,
                "img_meta": meta,
            }
        )
    return collate(items)


def tiny(aux=("atss", "faster_rcnn"), seed=0, **kwargs) -> CoDETR:
    torch.manual_seed(seed)
    return co_deformable_detr(NUM_CLASSES, aux=aux, backbone="tiny", num_queries=20, **kwargs)


def loss_values(model, batch, seed=1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the RPN / RoI samplers draw from the global RNG
    return {k: v.detach() for k, v in model.loss(batch).items()}


@pytest.mark.parametrize("aux", AUX_PATHS, ids=lambda a: "+".join(a) or "none")
def test_every_aux_path_trains_and_predicts(aux):
    batch = make_batch()
    model = tiny(aux)
    assert [h.name for h in model.aux_heads] == [n for n in ("faster_rcnn", "atss") if n in aux]
    losses = model.loss(batch)
    keys = set(losses)
    assert {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "enc_loss_cls"} <= keys
    idx = {name: k for k, name in enumerate(h.name for h in model.aux_heads)}
    if "atss" in idx:
        k = idx["atss"]
        assert {f"loss_cls{k}", f"loss_bbox{k}", f"loss_centerness{k}"} <= keys
    if "faster_rcnn" in idx:
        k = idx["faster_rcnn"]
        assert {"loss_rpn_cls", "loss_rpn_bbox", f"loss_cls{k}", f"loss_bbox{k}", f"acc{k}"} <= keys
    for k in range(len(aux)):
        assert {f"loss_cls_aux{k}", f"loss_bbox_aux{k}", f"d0.loss_iou_aux{k}"} <= keys
    assert not any(key.endswith(f"aux{len(aux)}") for key in keys)
    assert all(torch.isfinite(v).all() for v in losses.values())
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    # Every parameter gets a gradient: DDP needs no find_unused_parameters.
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []

    model.eval()
    dets = model.predict(batch)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(96, 128), (128, 96)], strict=True):
        assert det["boxes"].shape == (min(20 * NUM_CLASSES, 100), 4)
        assert det["scores"].shape == det["labels"].shape == det["boxes"].shape[:1]
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()


def test_positives_per_path_are_real_positives():
    batch = make_batch()
    _, groups = tiny().loss_and_targets(batch)
    (rcnn_pos, rcnn_q), (atss_pos, atss_q) = groups
    for pos in (rcnn_pos, atss_pos):
        assert pos.num_images == 2 and pos.feats is not None
        for i in range(2):
            assert set(pos.labels[i].tolist()) <= set(batch["gt_labels"][i].tolist())
            # every target is one of the image's ground-truth boxes
            gts = batch["gt_bboxes"][i]
            assert (pos.targets[i][:, None] == gts[None]).all(-1).any(-1).all()
            assert pos.feats[i].shape == (pos.num_positives[i], 64)
    # one-to-many: ATSS gives several positives per object (topk 9 per level candidate pool)
    assert all(n >= 2 for n in atss_pos.num_positives)
    assert atss_q.num_queries == max(9, max(atss_pos.num_positives))


def _img_and_mask(model, batch):
    batch = model.inputs(batch)
    return batch["img"], batch["padding_mask"]


# ----------------------------------------------------------------------- positive queries
def test_hand_box_to_inverse_sigmoid_reference():
    # (10, 20, 30, 60) in a 100 x 200 image -> cxcywh (0.1, 0.4, 0.1, 0.4)
    expected = torch.tensor([math.log(1 / 9), math.log(2 / 3), math.log(1 / 9), math.log(2 / 3)])
    torch.testing.assert_close(hand_reference((10, 20, 30, 60), (100, 200)), expected)

    positives = AuxPositives(
        [torch.tensor([[10.0, 20.0, 30.0, 60.0]])],
        [torch.tensor([1])],
        [torch.tensor([[0.0, 0.0, 100.0, 50.0]])],
        [torch.zeros(1, 8)],
    )
    aux = pad_positives(positives, [{"img_shape": (100, 200)}], num_classes=3, min_coords=1)
    torch.testing.assert_close(aux.coords, torch.tensor([[[0.1, 0.4, 0.1, 0.4]]]))
    torch.testing.assert_close(aux.targets, torch.tensor([[[0.25, 0.25, 0.5, 0.5]]]))

    torch.manual_seed(0)
    emb = PositiveQueryEmbedding(num_heads=2, embed_dims=8)
    with torch.no_grad():
        emb.head_pos_embed.copy_(torch.tensor([[0.5], [-1.0]]))
    query, query_pos, ref = emb(aux.coords, head_idx=1, feats=aux.feats)
    torch.testing.assert_close(ref, aux.coords)  # decoding starts at the positive itself
    # by hand: sine embedding of the logits -> head 1's Linear + LayerNorm -> split
    sine = proposal_pos_embed(expected.view(1, 1, 4), num_pos_feats=4)
    out = emb.pos_trans_norm[1](emb.pos_trans[1](sine))
    feat = emb.feat_norm[1](emb.feat_trans[1](aux.feats))
    torch.testing.assert_close(query_pos, out[..., :8] - 1.0)  # head 1's scalar embedding
    torch.testing.assert_close(query, out[..., 8:] + feat)
    assert query.shape == query_pos.shape == (1, 1, 8)


def test_padding_to_batch_max_with_zero_label_weights():
    coords = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 40.0, 20.0]]),
        torch.tensor([[10.0, 0.0, 20.0, 20.0]]),
    ]
    labels = [torch.tensor([0, 2, 1]), torch.tensor([1])]
    positives = AuxPositives(coords, labels, [c.clone() for c in coords])
    metas = [{"img_shape": (20, 40)}, {"img_shape": (40, 20)}]
    aux = pad_positives(positives, metas, num_classes=3, min_coords=1)
    assert aux.num_queries == 3 and aux.num_pos == [3, 1]
    assert aux.labels.tolist() == [[0, 2, 1], [1, 3, 3]]
    assert aux.label_weights.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert aux.bbox_weights[1].tolist() == [[1] * 4, [0] * 4, [0] * 4]
    torch.testing.assert_close(aux.coords[1, 0], torch.tensor([0.75, 0.25, 0.5, 0.5]))
    assert aux.coords[1, 1:].abs().sum() == 0 and aux.feats is None
    # nobody attends to padding, padding attends only to itself
    assert aux.attn_mask[0].sum() == 0
    assert aux.attn_mask[1].tolist() == [
        [False, True, True],
        [True, False, True],
        [True, True, False],
    ]
    # Co-DETR's group size: at least 9, at most max_pos_coords
    assert pad_positives(positives, metas, 3).num_queries == 9
    assert group_size([0, 0]) == 9 and group_size([500, 3]) == 300 and group_size([12]) == 12
    # too many positives: a random subset of max_pos_coords
    sub = pad_positives(positives, metas, 3, max_pos_coords=2, min_coords=1)
    assert sub.num_queries == 2 and sub.num_pos == [2, 1]
    assert padding_attn_mask([], 4, torch.device("cpu")).shape == (0, 4, 4)


def test_background_entries_are_dropped_and_bad_metas_rejected():
    positives = AuxPositives(
        [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]])],
        [torch.tensor([3, 0])],
        [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]])],
    )
    aux = pad_positives(positives, [{"img_shape": (10, 10)}], num_classes=3, min_coords=1)
    assert aux.num_pos == [1] and aux.labels.tolist() == [[0]]
    with pytest.raises(ValueError, match="img_metas"):
        pad_positives(positives, [], num_classes=3)
    with pytest.raises(ValueError, match="head_idx"):
        PositiveQueryEmbedding(1, 8)(aux.coords, head_idx=1, feats=torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="aux"):
        co_deformable_detr(3, aux=("yolo",), backbone="tiny")


def test_padding_does_not_change_the_real_queries():
    batch = make_batch()
    model = tiny(("atss",)).eval()
    with torch.no_grad():
        out = model(*_img_and_mask(model, batch))
        _, positives = model.aux_heads[0](
            model.memory_maps(out), batch["gt_bboxes"], batch["gt_labels"], batch["img_metas"]
        )
        n = min(positives.num_positives)
        trimmed = AuxPositives(
            [c[:n] for c in positives.coords],
            [lab[:n] for lab in positives.labels],
            [t[:n] for t in positives.targets],
            [f[:n] for f in positives.feats],
        )
        exact = pad_positives(trimmed, batch["img_metas"], NUM_CLASSES, min_coords=1)
        padded = pad_positives(trimmed, batch["img_metas"], NUM_CLASSES, min_coords=n + 5)
        cls_a, box_a = model.forward_aux(out, exact, 0)
        cls_b, box_b = model.forward_aux(out, padded, 0)
    assert padded.num_queries == n + 5 and exact.num_queries == n
    torch.testing.assert_close(cls_b[:, :, :n], cls_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(box_b[:, :, :n], box_a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- loss weights
def test_lambda_1_scales_only_the_positive_query_losses():
    batch = make_batch()
    base = loss_values(tiny(lambda_1=1.0), batch)
    double = loss_values(tiny(lambda_1=2.0), batch)
    assert base.keys() == double.keys()
    for key in base:
        factor = 2.0 if "_aux" in key else 1.0
        torch.testing.assert_close(double[key], base[key] * factor, msg=key)


def test_lambda_2_times_decoder_layers_scales_the_aux_head_losses():
    batch = make_batch()
    one = tiny(lambda_2=1.0)
    two = tiny(lambda_2=2.0)
    # loss weight = base weight x num_decoder_layers (2 in the tiny config) x lambda_2
    atss = two.aux_heads[1].head
    assert (atss.loss_cls.loss_weight, atss.loss_bbox.loss_weight) == (4.0, 8.0)
    assert atss.loss_centerness.loss_weight == 4.0
    roi = two.aux_heads[0].head.roi_head.bbox_head
    assert (roi.loss_cls.loss_weight, roi.loss_bbox.loss_weight) == (4.0, 40.0)
    assert two.aux_heads[0].head.rpn_head.loss_cls.loss_weight == 4.0
    base, double = loss_values(one, batch), loss_values(two, batch)
    head_keys = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0"}
    head_keys |= {"loss_cls1", "loss_bbox1", "loss_centerness1"}
    for key in base:
        factor = 2.0 if key in head_keys else 1.0
        torch.testing.assert_close(double[key], base[key] * factor, msg=key)
    # the recipe's default is Co-DETR's lambda_2 = 2 with 6 layers: weight 12
    assert co_deformable_detr(3, aux=("atss",), backbone="tiny", num_layers=6).aux_heads[
        0
    ].head.loss_cls.loss_weight == pytest.approx(12.0)


# ----------------------------------------------------------------------- inference cost
def test_predict_equals_deformable_detr_and_skips_aux_modules():
    batch = make_batch()
    co = tiny().eval()
    torch.manual_seed(1)
    ddetr = deformable_detr(
        NUM_CLASSES, backbone="tiny", num_queries=20, mixed_selection=True,
        feedforward_channels=128, dropout=0.0,
    ).eval()  # fmt: skip
    missing, unexpected = ddetr.load_state_dict(co.state_dict(), strict=False)
    assert missing == []
    assert all(k.split(".")[0] in {"aux_heads", "aux_queries", "downsample"} for k in unexpected)
    shared = sum(p.numel() for p in ddetr.parameters())
    assert shared == sum(p.numel() for n, p in co.named_parameters() if n not in unexpected)

    calls = []
    for name in ("aux_heads", "aux_queries", "downsample"):
        getattr(co, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    for head in co.aux_heads:
        head.register_forward_hook(lambda *_: calls.append("head"))
    queries = []
    co.decoder.layers[0].register_forward_hook(lambda m, args, out: queries.append(out.shape[1]))
    got, want = co.predict(batch), ddetr.predict(batch)
    assert calls == [] and queries == [20]
    for a, b in zip(got, want, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key])


def test_look_forward_twice_lets_the_next_layer_train_the_box_head():
    batch = make_batch()
    for twice, expect_grad in ((True, True), (False, False)):
        model = tiny(())
        model.decoder.look_forward_twice = twice
        out = model(*_img_and_mask(model, batch))
        out["all_bbox_preds"][1].sum().backward()  # only the second layer's boxes
        grad = model.reg_branches[0][-1].weight.grad  # the zero-initialised last FC
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad


# ----------------------------------------------------------------------- notebook analysis
def test_positives_per_layer_and_auc_hand_cases():
    from labkit.lessons.codetr_analysis import _auc, positives_per_layer

    counts = positives_per_layer(5, {"atss": 40, "rcnn": 12}, num_layers=3)
    assert counts == {"hungarian": [5, 5, 5], "atss": [40, 40, 40], "rcnn": [12, 12, 12]}
    scores = torch.tensor([0.9, 0.2, 0.5, 0.5, 0.1])
    labels = torch.tensor([True, False, True, False, False])
    # pairs (pos, neg): 0.9 beats all 3; 0.5 beats 0.2 and 0.1, ties 0.5 -> (3 + 2.5) / 6
    assert _auc(scores, labels) == pytest.approx(5.5 / 6)


def test_one_to_one_positives_and_encoder_probe_run_on_a_batch():
    from labkit.lessons.codetr_analysis import encoder_separability, one_to_one_positives

    batch = make_batch()
    model = tiny(("atss",))
    matched = one_to_one_positives(model, batch)
    assert [len(m.query_inds) for m in matched] == [2, 1]
    assert matched[0].reference_boxes.shape == (2, 4)
    probe = encoder_separability(model, batch, batch)
    assert 0.0 <= probe["auc"] <= 1.0 and probe["fisher_ratio"] >= 0
    norm, fg, valid = probe["maps"][0]
    assert norm.shape == fg.shape == valid.shape == (16, 16)  # stride 8 of the 128 x 128 batch
    assert fg[valid].any() and (~fg[valid]).any()


def test_memory_knobs_frozen_stages_and_queries():
    frozen = tiny(("atss",), frozen_stages=1)
    names = [n for n, p in frozen.named_parameters() if not p.requires_grad]
    assert names and all(n.startswith("backbone.") for n in names)
    assert all(p.requires_grad for p in tiny(("atss",)).parameters())
    model = co_deformable_detr(NUM_CLASSES, aux=(), backbone="tiny", num_queries=7).eval()
    assert model.predict(make_batch())[0]["boxes"].shape == (7 * NUM_CLASSES, 4)
