"""Shared base of every dense (one-stage) head: flattening, target helpers, loss entry points, inference.

A dense head predicts, at every location of every pyramid level, ``A`` priors' worth of
class scores and box regressions: ``cls_scores[l]: Tensor[B, A * C, H_l, W_l]`` and
``bbox_preds[l]: Tensor[B, A * 4, H_l, W_l]`` (plus optional per-prior score factors such as
ATSS's centerness or PAA's IoU: ``[B, A * 1, H_l, W_l]``). Flattened in mmdetection's order
(``[B, A*C, H, W] -> [B, H*W*A, C]``, location-major, anchor index innermost, levels
concatenated finest first) these line up one-to-one with the priors of
``prior_generator.grid_priors``, which may be anchors ``[N, 4]`` or points ``[N, 2]``.

Extension points for a new head (see RetinaNetHead / ATSSHead / PAAHead, FCOSHead, ...):

* ``__init__``: call ``DenseHead.__init__(num_classes, prior_generator, bbox_coder, test_cfg)``
  then build layers. ``self.num_base_priors`` (``A``) is read from the prior generator.
* ``forward(feats: list[Tensor[B, C_in, H_l, W_l]]) -> tuple[list[Tensor], ...]``: the raw
  per-level outputs, ``(cls_scores, bbox_preds)`` or ``(cls_scores, bbox_preds, score_factors)``
  (further outputs are allowed if ``predict_by_feat`` is overridden).
* ``loss_and_targets_by_feat(*outs, batch_gt_bboxes, batch_gt_labels, batch_img_metas,
  batch_gt_bboxes_ignore=None) -> (losses, targets)``: the training losses
  (``dict[str, Tensor]``, keys ``loss_*``) AND the targets they were computed from, i.e. the
  very assignment the loss used (each head documents its targets type: ``AnchorTargets`` for
  anchor heads, ``FCOSTargets``, ``FoveaTargets``, ...). This is the one method a concrete head
  implements for training; ``AnchorHead`` (anchor_head.py) implements the anchor-based version.
  Ground truth is not validated here: the detector (``labkit.detectors.base.Detector.inputs``)
  checks it once with ``check_gt_instances``.
* inference: ``predict_by_feat`` handles everything generic (sigmoid, ``score_thr`` then
  ``nms_pre`` top-k per level, decoding with ``bbox_coder.decode(priors, pred, max_shape)``,
  rescale, score factors, ``min_bbox_size``, batched NMS, ``max_per_img``). Override
  ``_decode_bboxes`` when decoding needs more than the coder (e.g. stride scaling) and
  ``_predict_by_feat_single`` / ``_bbox_post_process`` for a different post-process (PAA).

The training entry points built on ``loss_and_targets_by_feat`` (heads do not override them):

* ``loss_and_targets(feats, batch) -> (losses, targets)``: ``forward`` then
  ``loss_and_targets_by_feat`` with the batch's ``gt_bboxes``, ``gt_labels``, ``img_metas`` and
  ``gt_bboxes_ignore`` (for callers that need the positives the loss trained, e.g. Co-DETR);
* ``loss(feats, batch) -> losses`` and ``loss_by_feat(*outs, **gt) -> losses``: the same
  without the targets.

The module-level helpers (``flatten_level``, ``flatten_levels``, ``images_to_levels``,
``levels_to_images``, ``level_major_to_images``, ``unmap``, ``select_single_mlvl``,
``filter_scores_and_topk``, ``scale_factor_wh``, ``check_gt_instances``) are plain functions
so anchor-free heads can reuse them without inheriting anything else. The mean over training
processes that some losses take of their normaliser is ``labkit.nn.distributed.reduce_mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from labkit._validation import check_boxes, check_labels, check_tensor


def _to_float32(outs):
    """``outs`` (tensors nested in tuples/lists) with every floating tensor in float32."""
    if isinstance(outs, torch.Tensor):
        return outs.float() if outs.is_floating_point() else outs
    if isinstance(outs, (list, tuple)):
        return type(outs)(_to_float32(o) for o in outs)
    return outs


@dataclass
class TestConfig:
    """Inference settings of a dense head (mmdetection's ``test_cfg``).

    Attributes:
        nms_pre: per level, keep at most this many (prior, class) candidates before NMS;
            ``-1`` keeps all but, as in mmdetection, slicing with ``min(-1, n)`` drops the last one.
        score_thr: candidates need a score strictly above this.
        iou_threshold: NMS IoU threshold (boxes overlapping more than this are suppressed).
        max_per_img: detections kept per image after NMS.
        min_bbox_size: drop boxes whose width or height is not above this (``< 0``: no filter).
    """

    __test__ = False  # not a pytest class, despite the name

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    min_bbox_size: float = 0.0


def make_test_cfg(value: TestConfig | dict | None, **defaults: object) -> TestConfig:
    """A ``TestConfig`` from ``None`` (``TestConfig(**defaults)``), a dict of fields, or itself.

    Recipes accept dicts so their recorded keyword arguments stay plain data in checkpoints.
    """
    if value is None:
        return TestConfig(**defaults)
    if isinstance(value, TestConfig):
        return value
    if isinstance(value, dict):
        unknown = set(value) - set(TestConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"test_cfg: unknown fields {sorted(unknown)}")
        return TestConfig(**{**defaults, **value})
    raise TypeError(f"test_cfg: expected a TestConfig, a dict or None, got {type(value).__name__}")


def flatten_level(x: Tensor, channels: int) -> Tensor:
    """``[B, A * channels, H, W] -> [B, H * W * A, channels]`` (location-major, anchor innermost)."""
    b = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(b, -1, channels)


def flatten_levels(mlvl: list[Tensor], channels: int) -> Tensor:
    """Flatten every level with ``flatten_level`` and concatenate: ``[B, sum_l H_l*W_l*A, channels]``."""
    return torch.cat([flatten_level(x, channels) for x in mlvl], dim=1)


def images_to_levels(targets: list[Tensor], num_level_priors: list[int]) -> list[Tensor]:
    """Per-image targets ``[N, ...]`` (all levels) to per-level targets ``[B, N_l, ...]``."""
    stacked = torch.stack(targets, 0)
    return list(torch.split(stacked, num_level_priors, dim=1))


def levels_to_images(mlvl: list[Tensor]) -> list[Tensor]:
    """Per-level maps ``[B, K, H_l, W_l]`` to per-image ``[sum_l H_l*W_l, K]`` (PAA's layout)."""
    channels = mlvl[0].shape[1]
    flat = flatten_levels(mlvl, channels)
    return list(flat.unbind(0))


def level_major_to_images(per_level: list[Tensor], num_imgs: int) -> Tensor:
    """Per-level targets ``[B * N_l, ...]`` (image-major inside a level, the order of predictions
    flattened with ``permute(0, 2, 3, 1).reshape(-1, K)``) to ``[B, sum_l N_l, ...]``."""
    return torch.cat([x.reshape(num_imgs, -1, *x.shape[1:]) for x in per_level], dim=1)


def unmap(data: Tensor, count: int, inds: Tensor, fill: float = 0) -> Tensor:
    """Scatter ``data`` (one row per True in the bool mask ``inds[count]``) back to ``count`` rows.

    Rows where ``inds`` is False get ``fill`` (e.g. background label for anchors outside the image).
    """
    ret = data.new_full((count,) + tuple(data.shape[1:]), fill)
    ret[inds.bool()] = data
    return ret


def select_single_mlvl(mlvl: list[Tensor], img_id: int, detach: bool = True) -> list[Tensor]:
    """The ``img_id``-th image of every level: ``[B, K, H, W] -> [K, H, W]`` per level."""
    return [x[img_id].detach() if detach else x[img_id] for x in mlvl]


def filter_scores_and_topk(
    scores: Tensor, score_thr: float, topk: int, results: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor] | None]:
    """Keep (prior, class) pairs scoring above ``score_thr``, then the ``topk`` best of those.

    mmdetection's semantics: the threshold is applied first, then the survivors are sorted
    by score over the flattened ``[num_priors * C]`` pairs and cut to ``min(topk, n)``
    (so ``topk=-1`` drops the lowest survivor, exactly as mmdetection does).

    Args:
        scores: Tensor[N, C] per-prior class scores.
        score_thr: strict lower bound on kept scores.
        topk: the number of pairs kept.
        results: optional dict of Tensor[N, ...] indexed by the kept priors.

    Returns:
        ``(scores[K], labels[K], keep_idxs[K], filtered_results)``, sorted by descending score,
        where ``keep_idxs`` index the priors.
    """
    valid_mask = scores > score_thr
    scores = scores[valid_mask]
    valid_idxs = torch.nonzero(valid_mask)
    num_topk = min(topk, valid_idxs.size(0))
    scores, idxs = scores.sort(descending=True, stable=True)
    scores = scores[:num_topk]
    topk_idxs = valid_idxs[idxs[:num_topk]]
    keep_idxs, labels = topk_idxs.unbind(dim=1)
    filtered = None
    if results is not None:
        filtered = {k: v[keep_idxs] for k, v in results.items()}
    return scores, labels, keep_idxs, filtered


def scale_factor_wh(img_meta: dict) -> tuple[float, float]:
    """``(w_scale, h_scale)`` of an image meta whose ``scale_factor`` is ``(w, h)`` or ``(w, h, w, h)``."""
    sf = img_meta.get("scale_factor", (1.0, 1.0))
    sf = [float(s) for s in (sf.tolist() if isinstance(sf, Tensor) else sf)]
    if len(sf) not in (2, 4):
        raise ValueError(f"img_meta['scale_factor']: expected 2 or 4 numbers, got {sf}")
    return sf[0], sf[1]


def check_gt_instances(
    batch_gt_bboxes: object,
    batch_gt_labels: object,
    num_classes: int,
    batch_gt_bboxes_ignore: object = None,
    batch_img_metas: object = None,
) -> None:
    """Validate a batch's ground truth at a loss entry point; raise naming the argument.

    Args:
        batch_gt_bboxes: list (one per image) of Tensor[K_i, 4] xyxy pixels; ``K_i = 0`` is valid.
        batch_gt_labels: list of LongTensor[K_i] in ``0..num_classes-1``.
        num_classes: the head's number of foreground classes.
        batch_gt_bboxes_ignore: ``None`` or list of Tensor[G_i, 4].
        batch_img_metas: ``None`` or list of dicts, same length as the boxes.
    """
    if not isinstance(batch_gt_bboxes, (list, tuple)):
        raise TypeError(
            f"gt_bboxes: expected a list of Tensor[K, 4] (one per image), got {type(batch_gt_bboxes).__name__}"
        )
    if not isinstance(batch_gt_labels, (list, tuple)):
        raise TypeError(
            f"gt_labels: expected a list of LongTensor[K] (one per image), got {type(batch_gt_labels).__name__}"
        )
    if len(batch_gt_bboxes) == 0:
        raise ValueError("gt_bboxes: empty batch (no images)")
    if len(batch_gt_labels) != len(batch_gt_bboxes):
        raise ValueError(
            f"gt_labels: expected {len(batch_gt_bboxes)} entries (one per image), got {len(batch_gt_labels)}"
        )
    if batch_img_metas is not None and len(batch_img_metas) != len(batch_gt_bboxes):
        raise ValueError(
            f"img_metas: expected {len(batch_gt_bboxes)} entries (one per image), got {len(batch_img_metas)}"
        )
    for i, (boxes, labels) in enumerate(zip(batch_gt_bboxes, batch_gt_labels, strict=True)):
        name = f"gt_bboxes[{i}]"
        check_tensor(boxes, name)
        if boxes.dim() != 2:
            raise ValueError(f"{name}: expected shape [K, 4], got {tuple(boxes.shape)}")
        check_boxes(boxes, name)
        check_labels(labels, f"gt_labels[{i}]", boxes.shape[0], num_classes)
    if batch_gt_bboxes_ignore is not None:
        for i, boxes in enumerate(batch_gt_bboxes_ignore):
            if boxes is None:
                continue
            name = f"gt_bboxes_ignore[{i}]"
            check_tensor(boxes, name)
            if boxes.dim() != 2:
                raise ValueError(f"{name}: expected shape [G, 4], got {tuple(boxes.shape)}")
            check_boxes(boxes, name)


class DenseHead(nn.Module):
    """Base of dense heads: the batch -> loss entry point and the generic inference path.

    Args:
        num_classes: foreground classes ``C`` (label ``C`` is background; sigmoid classifiers,
            so ``cls_out_channels == C``).
        prior_generator: an ``AnchorGenerator`` or ``PointGenerator`` (``grid_priors``,
            ``valid_flags``, ``num_base_anchors`` or ``num_base_priors``).
        bbox_coder: turns ``(priors, bbox_pred)`` into boxes with ``decode(priors, pred,
            max_shape=(h, w))``.
        test_cfg: inference settings (``TestConfig()`` when ``None``).
    """

    def __init__(
        self,
        num_classes: int,
        prior_generator: object,
        bbox_coder: object,
        test_cfg: TestConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes
        self.prior_generator = prior_generator
        self.bbox_coder = bbox_coder
        self.test_cfg = test_cfg if test_cfg is not None else TestConfig()
        base = getattr(prior_generator, "num_base_anchors", None)
        if base is None:
            base = getattr(prior_generator, "num_base_priors", [1])
        self.num_base_priors = int(base[0]) if isinstance(base, (list, tuple)) else int(base)
        # The last dimension of a flattened bbox_pred (4 for deltas and distances).
        self.encode_size = 4

    # ------------------------------------------------------------------ training
    def loss(self, feats: list[Tensor], batch: dict) -> dict[str, Tensor]:
        """Run the head on ``feats`` and compute its losses for a collated ``batch``.

        ``loss_and_targets(feats, batch)[0]``; see there for the arguments.
        """
        return self.loss_and_targets(feats, batch)[0]

    def loss_and_targets(
        self, feats: list[Tensor], batch: dict
    ) -> tuple[dict[str, Tensor], object]:
        """Run the head on ``feats``; its losses and the targets those losses were computed from.

        The ground truth is not validated here: ``labkit.detectors.base.Detector.inputs``
        checks it once (``check_gt_instances``) before any head sees it.

        Args:
            feats: per-level features ``Tensor[B, C_in, H_l, W_l]``.
            batch: ``labkit.data.collate`` output (``gt_bboxes``, ``gt_labels`` and optional
                ``gt_bboxes_ignore`` lists, ``img_metas``).

        Returns:
            ``(losses, targets)``: ``{"loss_*": Tensor[]}`` and the head's targets (its type is
            documented by each head's ``loss_and_targets_by_feat``).
        """
        outs = self(feats)
        device_type = feats[0].device.type
        if torch.is_autocast_enabled(device_type):
            # Under mixed precision only the convolutions run in bf16/fp16: box decoding,
            # assignment and the losses need float32 (bf16 spaces pixel coordinates 2 px apart
            # at 256-512 px).
            outs = _to_float32(outs)
        with torch.autocast(device_type, enabled=False):
            return self.loss_and_targets_by_feat(
                *outs,
                batch_gt_bboxes=batch["gt_bboxes"],
                batch_gt_labels=batch["gt_labels"],
                batch_img_metas=batch["img_metas"],
                batch_gt_bboxes_ignore=batch.get("gt_bboxes_ignore"),
            )

    def loss_by_feat(self, *outs: list[Tensor], **gt: object) -> dict[str, Tensor]:
        """Losses from the raw outputs of ``forward``: ``loss_and_targets_by_feat(...)[0]``."""
        return self.loss_and_targets_by_feat(*outs, **gt)[0]

    def loss_and_targets_by_feat(
        self,
        *outs: list[Tensor],
        batch_gt_bboxes: list[Tensor],
        batch_gt_labels: list[Tensor],
        batch_img_metas: list[dict],
        batch_gt_bboxes_ignore: list[Tensor | None] | None = None,
    ) -> tuple[dict[str, Tensor], object]:
        """Losses and the targets they used, from the raw outputs of ``forward``.

        Every concrete head implements it (see the module docstring).

        Args:
            *outs: ``forward``'s per-level outputs (``cls_scores``, ``bbox_preds``, ...).
            batch_gt_bboxes: per image Tensor[K_i, 4] xyxy pixels.
            batch_gt_labels: per image LongTensor[K_i] in ``0..num_classes-1``.
            batch_img_metas: per image dicts (``img_shape``, ``pad_shape``, ...).
            batch_gt_bboxes_ignore: ``None`` or per image Tensor[G_i, 4] (or ``None``).

        Returns:
            ``(losses, targets)``: ``{"loss_*": Tensor[]}`` and the head's targets.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- inference
    def predict(
        self, feats: list[Tensor], batch_img_metas: list[dict], rescale: bool = False
    ) -> list[dict[str, Tensor]]:
        """Run the head and post-process: one ``{"boxes", "scores", "labels"}`` dict per image."""
        outs = self(feats)
        return self.predict_by_feat(*outs, batch_img_metas=batch_img_metas, rescale=rescale)

    def predict_by_feat(
        self,
        cls_scores: list[Tensor],
        bbox_preds: list[Tensor],
        score_factors: list[Tensor] | None = None,
        *,
        batch_img_metas: list[dict],
        cfg: TestConfig | None = None,
        rescale: bool = False,
        with_nms: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Turn raw head outputs into detections, image by image.

        Args:
            cls_scores: per level Tensor[B, A*C, H_l, W_l] (logits).
            bbox_preds: per level Tensor[B, A*4, H_l, W_l].
            score_factors: ``None`` or per level Tensor[B, A*1, H_l, W_l] (logits), multiplied
                into the class scores after the top-k (ATSS centerness, FCOS centerness).
            batch_img_metas: per image dicts with ``img_shape`` and ``scale_factor``.
            cfg: overrides ``self.test_cfg``.
            rescale: map boxes back to the original image (divide by ``scale_factor``).
            with_nms: run batched NMS and keep ``max_per_img``.

        Returns:
            list of ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": LongTensor[K]}``.
        """
        if len(cls_scores) != len(bbox_preds):
            raise ValueError(
                f"bbox_preds: expected {len(cls_scores)} levels like cls_scores, got {len(bbox_preds)}"
            )
        cfg = self.test_cfg if cfg is None else cfg
        featmap_sizes = [tuple(x.shape[-2:]) for x in cls_scores]
        mlvl_priors = self.prior_generator.grid_priors(
            featmap_sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device
        )
        results = []
        for img_id, img_meta in enumerate(batch_img_metas):
            factors = (
                select_single_mlvl(score_factors, img_id)
                if score_factors is not None
                else [None] * len(cls_scores)
            )
            results.append(
                self._predict_by_feat_single(
                    select_single_mlvl(cls_scores, img_id),
                    select_single_mlvl(bbox_preds, img_id),
                    factors,
                    mlvl_priors,
                    img_meta,
                    cfg,
                    rescale=rescale,
                    with_nms=with_nms,
                )
            )
        return results

    def _decode_bboxes(self, priors: Tensor, bbox_pred: Tensor, img_shape: tuple) -> Tensor:
        """Boxes ``[N, 4]`` from priors and flattened predictions, clipped to ``img_shape``."""
        return self.bbox_coder.decode(priors, bbox_pred, max_shape=img_shape)

    def _predict_by_feat_single(
        self,
        cls_score_list: list[Tensor],
        bbox_pred_list: list[Tensor],
        score_factor_list: list[Tensor | None],
        mlvl_priors: list[Tensor],
        img_meta: dict,
        cfg: TestConfig,
        rescale: bool = False,
        with_nms: bool = True,
    ) -> dict[str, Tensor]:
        """One image: per level sigmoid, ``score_thr`` + ``nms_pre`` top-k, then decode and post-process.

        ``cls_score_list[l]: Tensor[A*C, H_l, W_l]``, ``bbox_pred_list[l]: Tensor[A*4, H_l, W_l]``,
        ``score_factor_list[l]: Tensor[A, H_l, W_l] | None``, ``mlvl_priors[l]: Tensor[H_l*W_l*A, 2|4]``.
        """
        with_factors = score_factor_list[0] is not None
        mlvl_preds, mlvl_priors_kept, mlvl_scores, mlvl_labels, mlvl_factors = [], [], [], [], []
        for cls_score, bbox_pred, factor, priors in zip(
            cls_score_list, bbox_pred_list, score_factor_list, mlvl_priors, strict=True
        ):
            if cls_score.shape[-2:] != bbox_pred.shape[-2:]:
                raise ValueError(
                    f"bbox_preds: level size {tuple(bbox_pred.shape[-2:])} differs from "
                    f"cls_scores {tuple(cls_score.shape[-2:])}"
                )
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, self.encode_size)
            scores = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels).sigmoid()
            scores, labels, keep, kept = filter_scores_and_topk(
                scores, cfg.score_thr, cfg.nms_pre, {"bbox_pred": bbox_pred, "priors": priors}
            )
            mlvl_preds.append(kept["bbox_pred"])
            mlvl_priors_kept.append(kept["priors"])
            mlvl_scores.append(scores)
            mlvl_labels.append(labels)
            if with_factors:
                mlvl_factors.append(factor.permute(1, 2, 0).reshape(-1).sigmoid()[keep])
        bboxes = self._decode_bboxes(
            torch.cat(mlvl_priors_kept), torch.cat(mlvl_preds), tuple(img_meta["img_shape"][:2])
        )
        results = {
            "boxes": bboxes,
            "scores": torch.cat(mlvl_scores),
            "labels": torch.cat(mlvl_labels),
        }
        if with_factors:
            results["score_factors"] = torch.cat(mlvl_factors)
        return self._bbox_post_process(results, cfg, rescale, with_nms, img_meta)

    def _bbox_post_process(
        self,
        results: dict[str, Tensor],
        cfg: TestConfig,
        rescale: bool = False,
        with_nms: bool = True,
        img_meta: dict | None = None,
    ) -> dict[str, Tensor]:
        """Rescale, apply score factors, drop tiny boxes, batched NMS, keep ``max_per_img``."""
        results = dict(results)
        if rescale:
            sw, sh = scale_factor_wh(img_meta)
            # mmdetection multiplies by the reciprocal; same rounding here.
            results["boxes"] = results["boxes"] * results["boxes"].new_tensor(
                [1 / sw, 1 / sh, 1 / sw, 1 / sh]
            )
        factors = results.pop("score_factors", None)
        if factors is not None:
            results["scores"] = results["scores"] * factors
        if cfg.min_bbox_size >= 0:
            boxes = results["boxes"]
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
            if not valid.all():
                results = {k: v[valid] for k, v in results.items()}
        if with_nms and results["boxes"].numel() > 0:
            keep = batched_nms(
                results["boxes"], results["scores"], results["labels"], cfg.iou_threshold
            )
            keep = keep[: cfg.max_per_img]
            results = {k: v[keep] for k, v in results.items()}
        return results

    def with_test_cfg(self, **changes: object) -> TestConfig:
        """A copy of ``self.test_cfg`` with some fields changed (e.g. ``score_thr=0.3``)."""
        return replace(self.test_cfg, **changes)
