"""Measurements notebook 05 makes on Co-DETR: who is positive, how many per layer, and how
separable the encoder memory is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.boxes import bbox_cxcywh_to_xyxy
from labkit.detectors.co_detr import CoDETR

__all__ = [
    "OneToOne",
    "QuerySource",
    "encoder_separability",
    "one_to_one_positives",
    "positive_queries_by_layer",
    "positives_per_layer",
]


@dataclass
class OneToOne:
    """The Hungarian (one-to-one) positives of one image.

    Attributes:
        query_inds: LongTensor[K] the query matched to each ground truth (GT order).
        reference_boxes: Tensor[K, 4] those queries' initial reference boxes, xyxy pixels.
        pred_boxes: Tensor[K, 4] their last-layer predictions, xyxy pixels.
    """

    query_inds: Tensor
    reference_boxes: Tensor
    pred_boxes: Tensor


@torch.no_grad()
def one_to_one_positives(model: CoDETR, batch: dict) -> list[OneToOne]:
    """Match the last decoder layer to the ground truth as the loss does; one entry per image."""
    batch = model.inputs(batch)
    out = model(batch["img"], batch["padding_mask"])
    cls, box = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
    metas = batch["img_metas"]
    shapes = [tuple(int(v) for v in m["img_shape"][:2]) for m in metas]
    results = []
    gts, labels = batch["gt_bboxes"], batch["gt_labels"]
    factors = [box.new_tensor([w, h, w, h]) for h, w in shapes]
    pred_xyxy = torch.stack([bbox_cxcywh_to_xyxy(box[i]) * factors[i] for i in range(len(metas))])
    assigned = model.criterion.assigner.assign_batch(cls, pred_xyxy, gts, labels, shapes)
    for i, res in enumerate(assigned):
        pos = torch.nonzero(res.gt_inds > 0).view(-1)
        order = torch.argsort(res.gt_inds[pos])  # ground-truth order
        q = pos[order]
        ref = bbox_cxcywh_to_xyxy(out["references"][0][i, q]) * factors[i]
        results.append(OneToOne(q, ref, pred_xyxy[i, q]))
    return results


def positives_per_layer(
    num_gts: int, aux_positives: dict[str, int], num_layers: int
) -> dict[str, list[int]]:
    """Positive queries each decoder layer is trained on, by source.

    One-to-one matching gives every layer exactly ``num_gts`` positives; each auxiliary group
    adds all its positives to every layer (the groups run through the whole decoder).

    Returns:
        ``{"hungarian": [num_gts] * L, name: [P_name] * L, ...}``.
    """
    counts = {"hungarian": [int(num_gts)] * num_layers}
    for name, p in aux_positives.items():
        counts[name] = [int(p)] * num_layers
    return counts


def _auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def _pixel_features(model: CoDETR, batch: dict, level: int) -> tuple[Tensor, Tensor, list]:
    batch = model.inputs(batch)
    img = batch["img"]
    out = model(img, batch["padding_mask"])
    h, w = out["spatial_shapes"][level].tolist()
    start = int(out["level_start_index"][level])
    memory = out["memory"][:, start : start + h * w]  # [B, hw, C]
    stride_y, stride_x = img.shape[-2] / h, img.shape[-1] / w
    ys = (torch.arange(h, device=img.device) + 0.5) * stride_y
    xs = (torch.arange(w, device=img.device) + 0.5) * stride_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    feats, fg, maps = [], [], []
    for i, meta in enumerate(batch["img_metas"]):
        ih, iw = meta["img_shape"][:2]
        boxes = batch["gt_bboxes"][i]
        inside = (
            (cx[..., None] >= boxes[:, 0])
            & (cx[..., None] <= boxes[:, 2])
            & (cy[..., None] >= boxes[:, 1])
            & (cy[..., None] <= boxes[:, 3])
        ).any(-1)  # [h, w]
        valid = (cx < iw) & (cy < ih)
        feats.append(memory[i][valid.view(-1)])
        fg.append(inside[valid])
        maps.append((memory[i].norm(dim=-1).view(h, w), inside, valid))
    return torch.cat(feats).double(), torch.cat(fg), maps


@torch.no_grad()
def encoder_separability(
    model: CoDETR, fit_batch: dict, test_batch: dict, level: int = 0, ridge: float = 1e-3
) -> dict:
    """How linearly separable objects are from background in the encoder memory.

    A pixel of level ``level`` is foreground when its centre lies inside a ground-truth box.
    Fisher's linear discriminant ``w = (S_w + ridge * tr(S_w)/C * I)^-1 (mu_fg - mu_bg)`` is
    fitted on ``fit_batch`` and scored on ``test_batch`` by the ROC AUC of ``x . w``
    (0.5 = no linear signal, 1 = perfectly separable).

    Returns:
        ``{"auc": float, "fisher_ratio": float (between/within variance on the test pixels),
        "maps": per test image (feature-norm map Tensor[h, w], fg BoolTensor[h, w],
        valid BoolTensor[h, w])}``.
    """
    was_training = model.training
    model.eval()
    x_fit, y_fit, _ = _pixel_features(model, fit_batch, level)
    x_test, y_test, maps = _pixel_features(model, test_batch, level)
    model.train(was_training)
    mu1, mu0 = x_fit[y_fit].mean(0), x_fit[~y_fit].mean(0)
    centred = torch.cat([x_fit[y_fit] - mu1, x_fit[~y_fit] - mu0])
    s_w = centred.T @ centred / len(centred)
    c = s_w.shape[0]
    reg = ridge * torch.trace(s_w) / c
    w = torch.linalg.solve(s_w + reg * torch.eye(c, dtype=s_w.dtype), mu1 - mu0)
    scores = x_test @ w
    s1, s0 = scores[y_test], scores[~y_test]
    fisher = float((s1.mean() - s0.mean()) ** 2 / (s1.var() + s0.var()).clamp(min=1e-12))
    return {"auc": _auc(scores, y_test), "fisher_ratio": fisher, "maps": maps}


@dataclass
class QuerySource:
    """The positive queries one source trains, on one image, at every decoder layer.

    Attributes:
        start: per layer, Tensor[P_l, 4] the positives' reference boxes where decoding starts
            (xyxy pixels): the encoder proposals for Hungarian, the positive boxes themselves for
            an auxiliary group.
        predicted: per layer, Tensor[P_l, 4] what that layer predicts for them (xyxy pixels).
        targets: per layer, Tensor[P_l, 4] the ground-truth box each one learns (xyxy pixels).
    """

    start: list[Tensor]
    predicted: list[Tensor]
    targets: list[Tensor]


@torch.no_grad()
def positive_queries_by_layer(model: CoDETR, batch: dict) -> list[dict[str, QuerySource]]:
    """Per image: for the Hungarian matcher and each auxiliary head (``model.aux_heads`` names),
    which queries are positive at each decoder layer, where they start and what they predict.

    Hungarian positives are re-matched at every layer on that layer's predictions (as the loss
    does, deep supervision); an auxiliary group is the same set of queries at every layer, with
    known targets. Runs in eval mode (no dropout), then restores the model's mode.
    """
    was_training = model.training
    model.eval()
    _, groups = model.loss_and_targets(batch)
    batch = model.inputs(batch)
    out = model(batch["img"], batch["padding_mask"])
    model.train(was_training)
    metas, gts, labels = batch["img_metas"], batch["gt_bboxes"], batch["gt_labels"]
    shapes = [tuple(int(v) for v in m["img_shape"][:2]) for m in metas]
    factors = [gts[0].new_tensor([w, h, w, h]) for h, w in shapes]

    def pixels(boxes: Tensor, i: int) -> Tensor:
        return (bbox_cxcywh_to_xyxy(boxes) * factors[i]).cpu()

    num_layers = out["all_cls_scores"].shape[0]
    result: list[dict[str, QuerySource]] = [{} for _ in metas]
    hungarian = [QuerySource([], [], []) for _ in metas]
    for layer in range(num_layers):
        cls, box = out["all_cls_scores"][layer], out["all_bbox_preds"][layer]
        pred = torch.stack([bbox_cxcywh_to_xyxy(box[i]) * factors[i] for i in range(len(metas))])
        assigned = model.criterion.assigner.assign_batch(cls, pred, gts, labels, shapes)
        for i, res in enumerate(assigned):
            pos = torch.nonzero(res.gt_inds > 0).view(-1)
            q = pos[torch.argsort(res.gt_inds[pos])]
            hungarian[i].start.append(pixels(out["references"][0][i, q], i))
            hungarian[i].predicted.append(pred[i, q].cpu())
            hungarian[i].targets.append(gts[i][res.gt_inds[q] - 1].cpu())
    for i in range(len(metas)):
        result[i]["Hungarian"] = hungarian[i]
    for k, (_, aux) in enumerate(groups):
        _, all_box = model.forward_aux(out, aux, k)
        name = model.aux_heads[k].name
        for i in range(len(metas)):
            real = aux.label_weights[i] > 0
            start, target = pixels(aux.coords[i, real], i), pixels(aux.targets[i, real], i)
            result[i][name] = QuerySource(
                [start] * num_layers,
                [pixels(all_box[layer, i, real], i) for layer in range(num_layers)],
                [target] * num_layers,
            )
    return result
