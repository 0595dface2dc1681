"""COCO box evaluation through pycocotools: AP, AP50, AP75, APs/m/l, AR and per-class AP."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from labkit import to_device

__all__ = ["coco_evaluate", "evaluate", "format_table", "results_to_coco"]

# Positions of pycocotools' COCOeval.stats, with mmdetection's maxDets = (100, 300, 1000):
# AP uses 100 detections per image, AP50..APl use 1000, as in mmdetection's CocoMetric.
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "AR300", "AR1000", "ARs", "ARm", "ARl")  # fmt: skip
_MAX_DETS = [100, 300, 1000]


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def results_to_coco(results: Iterable[dict], dataset: Any) -> list[dict]:
    """Convert labkit detections into COCO result dicts.

    Args:
        results: per image ``{"image_id": int, "boxes": [N, 4] xyxy original-image pixels,
            "scores": [N], "labels": [N] in 0..C-1}`` (tensors, arrays or lists).
        dataset: anything with ``.cat_ids`` (label -> COCO category id) and ``.coco`` (or a
            ``Subset`` of it).

    Returns:
        ``[{"image_id", "bbox": [x, y, w, h], "score", "category_id"}, ...]``.
    """
    dataset, _ = _unwrap(dataset)
    cat_ids = list(dataset.cat_ids)
    known_images = set(dataset.coco.getImgIds())
    dets = []
    for i, res in enumerate(results):
        if not isinstance(res, dict):
            raise TypeError(f"results[{i}]: expected a dict, got {type(res).__name__}")
        missing = {"image_id", "boxes", "scores", "labels"} - set(res)
        if missing:
            raise ValueError(f"results[{i}]: missing keys {sorted(missing)}")
        image_id = int(res["image_id"])
        if image_id not in known_images:
            raise ValueError(f"results[{i}]: image_id {image_id} is not in the dataset")
        boxes = _as_numpy(res["boxes"], "boxes").astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(res["scores"], "scores").astype(np.float64).reshape(-1)
        labels = _as_numpy(res["labels"], "labels").astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"results[{i}]: boxes, scores, labels lengths differ "
                f"({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(
                f"results[{i}]: labels must lie in [0, {len(cat_ids) - 1}], got {labels.tolist()}"
            )
        if not np.isfinite(boxes).all():
            raise ValueError(f"results[{i}]: boxes contain NaN or inf")
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            dets.append(
                {
                    "image_id": image_id,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],  # no +1
                    "score": float(score),
                    "category_id": cat_ids[label],
                }
            )
    return dets


def _class_ap(precision: np.ndarray) -> float:
    # -1 marks (IoU, recall) cells of a class without ground truth; such a class has no AP.
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


def _unwrap(dataset: Any) -> tuple[Any, list[int] | None]:
    """The COCO-backed dataset and the image ids it covers (a ``Subset`` covers only its own)."""
    if isinstance(dataset, Subset):
        base, ids = _unwrap(dataset.dataset)
        if ids is None:
            raise TypeError("dataset: a Subset needs a base dataset with .image_ids")
        return base, [ids[i] for i in dataset.indices]
    ids = getattr(dataset, "image_ids", None)
    return dataset, None if ids is None else list(ids)


def coco_evaluate(
    results: Sequence[dict],
    dataset: Any,
    verbose: bool = False,
    img_ids: Sequence[int] | None = None,
) -> dict:
    """COCO bbox metrics of ``results`` against ``dataset``'s annotations (mmdetection's way).

    Every image of the dataset counts, with or without detections (for a ``torch.utils.data
    .Subset`` of a dataset, only the subset's images, so quick runs on a few images score
    fairly). Metrics are pycocotools'
    ``COCOeval.stats`` with ``maxDets = (100, 300, 1000)`` as in mmdetection; an area range
    without ground truth gives ``-1`` and a class without ground truth a ``nan`` AP (the
    pycocotools/mmdetection conventions). No detections at all gives zeros, not an error.

    Args:
        results: per image ``{"image_id", "boxes": [N, 4] xyxy original pixels, "scores": [N],
            "labels": [N] in 0..C-1}``.
        dataset: object with ``.coco`` (pycocotools ``COCO``), ``.cat_ids`` (label -> category
            id) and ``.classes`` (label -> name), e.g. ``labkit.data.CocoDetection``, or a
            ``Subset`` of one.
        verbose: print pycocotools' own summary.
        img_ids: evaluate these image ids only (default: the dataset's ``image_ids``, else
            every image of its COCO file).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "AR300", "AR1000", "ARs", "ARm",
        "ARl": float, "per_class": {name: AP}, "per_class_AP50": {name: AP50},
        "num_detections": int}``.
    """
    dataset, covered = _unwrap(dataset)
    for attr in ("coco", "cat_ids", "classes"):
        if not hasattr(dataset, attr):
            raise TypeError(f"dataset: expected an object with .{attr} (e.g. CocoDetection)")
    from pycocotools.cocoeval import COCOeval

    if img_ids is None:
        img_ids = covered if covered is not None else dataset.coco.getImgIds()
    img_ids = [int(i) for i in img_ids]
    unknown = set(img_ids) - set(dataset.coco.getImgIds())
    if unknown:
        raise ValueError(f"img_ids: {sorted(unknown)[:5]} are not images of the dataset")

    classes = list(dataset.classes)
    dets = results_to_coco(results, dataset)
    if not dets:
        metrics: dict[str, Any] = dict.fromkeys(_STAT_NAMES, 0.0)
        metrics["per_class"] = dict.fromkeys(classes, 0.0)
        metrics["per_class_AP50"] = dict.fromkeys(classes, 0.0)
        metrics["num_detections"] = 0
        return metrics

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = dataset.coco.loadRes(dets)
        coco_eval = COCOeval(dataset.coco, coco_dt, "bbox")
        coco_eval.params.catIds = list(dataset.cat_ids)
        coco_eval.params.imgIds = img_ids
        coco_eval.params.maxDets = list(_MAX_DETS)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    metrics = {name: float(v) for name, v in zip(_STAT_NAMES, coco_eval.stats, strict=True)}
    # precision: [IoU thresholds, recall thresholds, classes, area ranges, maxDets]; COCOeval
    # sorts params.catIds, so look each class up by its category id, not by its label.
    precision = coco_eval.eval["precision"]
    column = {cat_id: k for k, cat_id in enumerate(coco_eval.params.catIds)}
    ks = [column[cat_id] for cat_id in dataset.cat_ids]
    metrics["per_class"] = {
        name: _class_ap(precision[:, :, k, 0, -1]) for name, k in zip(classes, ks, strict=True)
    }
    metrics["per_class_AP50"] = {
        name: _class_ap(precision[0, :, k, 0, -1]) for name, k in zip(classes, ks, strict=True)
    }
    metrics["num_detections"] = len(dets)
    return metrics


def format_table(metrics: dict) -> str:
    """Render :func:`coco_evaluate`'s dict as a fixed-width text table (3 decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    names = [k for k in _STAT_NAMES if k in metrics]
    lines = ["  ".join(f"{n:>6}" for n in names), "  ".join(f"{fmt(metrics[n]):>6}" for n in names)]
    per_class = metrics.get("per_class") or {}
    if per_class:
        ap50 = metrics.get("per_class_AP50", {})
        width = max(8, *(len(str(n)) for n in per_class))
        lines += ["", f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
        for name, ap in per_class.items():
            lines.append(f"{name:<{width}}  {fmt(ap):>6}  {fmt(ap50.get(name, '-')):>6}")
    return "\n".join(lines)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict],
    dataset: Any,
    device: torch.device | str | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Run ``model.predict`` over ``loader`` (collated batches) and score it with COCO metrics.

    Args:
        model: a labkit detector (``predict(batch, rescale=True) -> list[dict]``).
        loader: yields batches from ``labkit.data.collate`` (``img_metas`` carry ``image_id``).
        dataset: the dataset the loader reads (for its COCO annotations).
        device: where to run; defaults to the model's device.

    Returns:
        :func:`coco_evaluate`'s dict.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
                preds = model.predict(to_device(batch, device), rescale=True)
                for meta, pred in zip(batch["img_metas"], preds, strict=True):
                    results.append(
                        {
                            "image_id": meta["image_id"],
                            **{k: pred[k].cpu() for k in ("boxes", "scores", "labels")},
                        }
                    )
    finally:
        model.train(was_training)
    return coco_evaluate(results, dataset, verbose=verbose)
