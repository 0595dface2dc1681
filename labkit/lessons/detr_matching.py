"""What the DETR notebook measures: a small matching problem, its cost terms, and how often a
training DETR changes its mind about which query answers which object."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.assigners.hungarian import BBoxL1Cost, FocalLossCost, HungarianAssigner, IoUCost

__all__ = [
    "MatchingProblem",
    "cost_terms",
    "matching_flips",
    "one_to_many_gt_inds",
    "one_to_many_report",
    "toy_problem",
]


@dataclass
class MatchingProblem:
    """One image's predictions and ground truth, the inputs of DETR's matcher.

    Attributes:
        cls_scores: Tensor[N, C] class logits of the ``N`` queries.
        pred_bboxes: Tensor[N, 4] predicted boxes, absolute xyxy pixels.
        gt_bboxes: Tensor[K, 4] ground-truth boxes, absolute xyxy pixels.
        gt_labels: LongTensor[K] their classes.
        img_shape: ``(h, w)`` of the image.
    """

    cls_scores: Tensor
    pred_bboxes: Tensor
    gt_bboxes: Tensor
    gt_labels: Tensor
    img_shape: tuple[int, int]


def toy_problem(num_queries: int = 8, seed: int = 0) -> MatchingProblem:
    """Three objects on a 200x300 image and ``num_queries`` predictions of mixed quality.

    Queries 0-2 sit near the objects with the right class (one of them loosely), query 3 has
    object 0's box but the wrong class, and the rest are random boxes with weak logits, so the
    cost terms disagree and the matching has something to decide.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = 200, 300
    gt_bboxes = torch.tensor([[30.0, 40, 110, 120], [150, 30, 280, 90], [120, 110, 210, 190]])
    gt_labels = torch.tensor([0, 2, 1])
    pred = torch.empty(num_queries, 4)
    pred[0] = gt_bboxes[0] + torch.tensor([4.0, -3, 2, 5])
    pred[1] = gt_bboxes[1] + torch.tensor([-10.0, 8, 15, -6])
    pred[2] = gt_bboxes[2] + torch.tensor([20.0, 15, -5, -10])  # loose
    pred[3] = gt_bboxes[0] + torch.tensor([-2.0, 2, 1, -1])  # good box, wrong class
    for i in range(4, num_queries):
        cx, cy = torch.rand(2, generator=g) * torch.tensor([w, h])
        bw, bh = 20 + torch.rand(2, generator=g) * 100
        pred[i] = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    pred[:, 0::2] = pred[:, 0::2].clamp(0, w)
    pred[:, 1::2] = pred[:, 1::2].clamp(0, h)
    logits = torch.full((num_queries, 3), -4.0) + 0.5 * torch.randn(num_queries, 3, generator=g)
    logits[0, 0], logits[1, 2], logits[2, 1], logits[3, 1] = 2.0, 1.0, 0.5, 2.5
    return MatchingProblem(logits, pred, gt_bboxes, gt_labels, (h, w))


def cost_terms(
    problem: MatchingProblem, weights: tuple[float, float, float] = (2.0, 5.0, 2.0)
) -> dict[str, Tensor]:
    """Deformable-DETR's matching cost of ``problem``, term by term: ``Tensor[N, K]`` each.

    Keys ``"class"`` (focal cost x ``weights[0]``), ``"l1"`` (L1 of normalized cxcywh x
    ``weights[1]``), ``"giou"`` (``-GIoU`` x ``weights[2]``) and ``"total"`` (their sum, what
    ``HungarianAssigner`` minimises).
    """
    w_cls, w_l1, w_giou = weights
    terms = {
        "class": FocalLossCost(weight=w_cls),
        "l1": BBoxL1Cost(weight=w_l1, box_format="xywh"),
        "giou": IoUCost(iou_mode="giou", weight=w_giou),
    }
    shape = torch.tensor([problem.img_shape], dtype=torch.float32)
    out = {}
    for name, term in terms.items():
        assigner = HungarianAssigner([term])
        out[name] = assigner.cost_matrix(
            problem.cls_scores[None],
            problem.pred_bboxes[None],
            problem.gt_bboxes[None],
            problem.gt_labels[None],
            shape,
        )[0]
    out["total"] = out["class"] + out["l1"] + out["giou"]
    return out


def one_to_many_gt_inds(cost: Tensor, k: int) -> Tensor:
    """One-to-many assignment: every ground truth takes its ``k`` cheapest queries; a query
    wanted by several ground truths goes to the cheapest of them.

    Args:
        cost: Tensor[N, K] matching cost (queries x ground truths).
        k: queries per ground truth (at most ``N``).

    Returns:
        LongTensor[N] ``gt_inds``: 0 for a negative query, ``j + 1`` for ground truth ``j``.
    """
    num_queries, num_gts = cost.shape
    gt_inds = torch.zeros(num_queries, dtype=torch.long)
    if num_gts == 0 or num_queries == 0:
        return gt_inds
    k = min(k, num_queries)
    wanted = torch.full_like(cost, float("inf"))
    top = cost.topk(k, dim=0, largest=False).indices  # [k, K] the cheapest queries per GT
    wanted.scatter_(0, top, cost.gather(0, top))
    best_cost, best_gt = wanted.min(dim=1)
    chosen = torch.isfinite(best_cost)
    gt_inds[chosen] = best_gt[chosen] + 1
    return gt_inds


def one_to_many_report(cost: Tensor, k: int) -> str:
    """Why :func:`one_to_many_gt_inds` gives each ground truth the queries it gets, in words.

    Args:
        cost: Tensor[N, K] matching cost (queries x ground truths).
        k: queries per ground truth.

    Returns:
        One line per ground truth ``j``: its ``k`` cheapest queries with their costs, the ones it
        keeps, and for each one it loses the ground truth that takes it (and that one's cost);
        then a line naming the queries in no ground truth's ``k`` cheapest (background), e.g.
        ``"GT 1: cheapest q1 -1.47, q0 +6.99 -> keeps q1; loses q0 to GT 0 (-3.85)"``.
    """
    gt_inds = one_to_many_gt_inds(cost, k)
    num_queries, num_gts = cost.shape
    lines = []
    for j in range(num_gts):
        top = cost[:, j].topk(min(k, num_queries), largest=False).indices.tolist()
        wanted = ", ".join(f"q{q} {float(cost[q, j]):+.2f}" for q in top)
        kept = [f"q{q}" for q in top if int(gt_inds[q]) == j + 1]
        lost = [f"q{q} to GT {int(gt_inds[q]) - 1} ({float(cost[q, int(gt_inds[q]) - 1]):+.2f})"
                for q in top if int(gt_inds[q]) != j + 1]  # fmt: skip
        line = f"GT {j}: cheapest {wanted} -> keeps {', '.join(kept) or 'none'}"
        lines.append(line + (f"; loses {', '.join(lost)}" if lost else ""))
    background = [f"q{q}" for q in range(num_queries) if int(gt_inds[q]) == 0]
    lines.append(
        f"background (in no ground truth's {k} cheapest): {', '.join(background) or 'none'}"
    )
    return "\n".join(lines)


@torch.no_grad()
def _matched_queries(model: torch.nn.Module, batch: dict) -> list[Tensor]:
    """Per image of ``batch``: the query the last decoder layer's Hungarian matching gives each
    ground truth, ``LongTensor[K_i]`` in ground-truth order."""
    from labkit.boxes import bbox_cxcywh_to_xyxy

    was_training = model.training
    model.eval()
    batch = model.inputs(batch)
    out = model(batch["img"], batch["padding_mask"])
    model.train(was_training)
    cls, box = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
    shapes = [tuple(int(v) for v in m["img_shape"][:2]) for m in batch["img_metas"]]
    factors = torch.stack([box.new_tensor([w, h, w, h]) for h, w in shapes])[:, None]
    pred = bbox_cxcywh_to_xyxy(box) * factors
    results = model.criterion.assigner.assign_batch(
        cls, pred, batch["gt_bboxes"], batch["gt_labels"], shapes
    )
    matched = []
    for res, gts in zip(results, batch["gt_bboxes"], strict=True):
        q = torch.full((len(gts),), -1, dtype=torch.long)
        pos = torch.nonzero(res.gt_inds > 0).view(-1)
        q[res.gt_inds[pos].cpu() - 1] = pos.cpu()
        matched.append(q)
    return matched


def matching_flips(
    model: torch.nn.Module,
    train_batches: list[dict],
    probe: dict,
    steps: int,
    lr: float = 1e-3,
) -> dict[str, list]:
    """Train ``model`` for ``steps`` AdamW steps (cycling ``train_batches``) and, before every
    step and after the last, match the ``probe`` batch: how many of its ground truths change
    their matched query from one step to the next (DETR's "instability of bipartite matching").

    Returns ``{"step": [...], "flip_fraction": [...], "loss": [...]}`` with one entry per step
    (``flip_fraction[i]``: share of probe ground truths whose query changed by step ``i + 1``).
    """
    from labkit.engine.train import build_optimizer, parse_losses
    from labkit.recipes import schedule

    optimizer = build_optimizer(model, schedule("deformable_detr", lr=lr))
    model.train()
    previous = torch.cat(_matched_queries(model, probe))
    record: dict[str, list] = {"step": [], "flip_fraction": [], "loss": []}
    for step in range(steps):
        total, _ = parse_losses(model.loss(train_batches[step % len(train_batches)]))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        current = torch.cat(_matched_queries(model, probe))
        record["step"].append(step + 1)
        record["flip_fraction"].append(float((current != previous).float().mean()))
        record["loss"].append(float(total.detach()))
        previous = current
    return record
