"""Anchor benchmark: labkit's FCOS vs torchvision's FCOS, same backbone, data, schedule, eval, init.

Run: ``.venv/bin/python -m benchmarks.bench_fcos_torchvision [--quick] [--device cuda]
[--epochs 12] [--output results.json]``

What is compared: ``labkit.recipes.fcos(5, backbone="tiny")`` (mmdetection's FCOS "tricks"
configuration: center sampling, norm_on_bbox, centerness on the regression tower, GIoU) against
``torchvision.models.detection.FCOS`` built around the very same backbone + FPN, both trained
from scratch on the shapes dataset and scored on its val split. One run trains both and prints
their COCO APs side by side with the ratio AP(labkit) / AP(torchvision); the check this
benchmark exists for is that the ratio is at least 1 (labkit's FCOS is as good as torchvision's).

What is shared, exactly:

* backbone + FPN: labkit's tiny backbone (C3-C5) and FPN P3-P7 (P6 from P5, ReLU before P7).
  torchvision's model wraps deep copies of the labkit model's own ``backbone`` and ``neck``
  modules (:class:`BackboneWithFPN`, forward -> ``OrderedDict`` of the 5 levels), taken right
  after the seeded build, so their initial weights are bit-identical (the test checks this);
* head initial weights (``--head-init copy``, the default): torchvision's ``FCOSHead`` with
  ``num_convs`` = labkit's ``stacked_convs`` (2 for tiny) has the same layers as labkit's tiny
  ``FCOSHead`` (3x3 conv with bias + GroupNorm(32) + ReLU towers, 3x3 cls / reg / centerness
  convs, centerness on the regression tower), so labkit's head weights are copied into it
  layer by layer. Both libraries draw them from the same distribution anyway (N(0, 0.01),
  zero bias, classification bias from prior 0.01); ``--head-init torchvision`` keeps
  torchvision's own draw of them instead;
* data: the same shapes subsets, resized / flipped / normalized / padded by labkit's
  ``train_transforms`` / ``test_transforms`` (the flip RNG and the loader's shuffle seeded by
  ``--seed``, rebuilt fresh for each model, so both see the same images in the same order
  with the same flips). torchvision's ``GeneralizedRCNNTransform`` is replaced by
  :class:`NoResizeTransform`, which neither resizes nor normalizes: it only re-pads the
  images (cropped to ``img_shape``) to a multiple of 32, which for the shapes images (all
  square) reproduces labkit's padded batch exactly, and maps boxes back unchanged;
* schedule: one ``labkit.engine.train.TrainConfig`` (AdamW, ``--lr``, ``--weight-decay``,
  linear warm-up, step milestones, gradient clipping ``--max-norm``) and the same
  ``labkit.engine.train.train`` loop for both: :class:`TorchvisionFCOS` gives torchvision's
  model labkit's detector interface (``loss(batch)``, ``predict(batch, rescale=True)``);
* evaluation: the same ``labkit.engine.evaluate.evaluate`` (pycocotools, mmdetection's
  settings) on the same val subset; torchvision's boxes are divided by ``scale_factor`` to
  original pixels exactly as labkit's ``predict(batch, rescale=True)`` does;
* test settings: torchvision's ``score_thresh``, ``nms_thresh``, ``detections_per_img`` and
  ``topk_candidates`` take labkit's FCOS ``test_cfg`` values (0.05, 0.6, 100, 1000 per level).

What differs (each library's own FCOS, by design):

* loss: torchvision averages the GIoU loss over positives with no weighting; labkit (as
  mmdetection) weights each positive's GIoU by its centerness target and divides by their
  sum. Both: sigmoid focal loss (alpha 0.25, gamma 2) over positives, centerness BCE over
  positives;
* assignment: torchvision's points sit at ``x * stride`` (anchor centres of an
  ``AnchorGenerator`` with sizes = strides, one anchor per location), labkit's at
  ``(x + 0.5) * stride`` (mmdetection 3.x). The rest is the same rule written twice: center
  sampling (within 1.5 strides of the box centre and inside the box), regress ranges
  0-64-128-256-512-inf px (torchvision's bounds strict, labkit's inclusive), ambiguous points
  to the smallest box;
* centerness target: the same formula, computed from torchvision's anchor-centre encoding vs
  labkit's point targets (so it follows each one's point offset);
* regression: labkit has a learnable ``Scale`` per level (init 1) before the ReLU/clamp,
  torchvision none (so ``--head-init copy`` is exact at step 0: Scale = 1);
* scores at test time: torchvision thresholds (0.05), ranks (top 1000 per level) and
  NMSes ``sqrt(sigmoid(cls) * sigmoid(centerness))``; labkit thresholds and ranks
  ``sigmoid(cls)`` alone, then multiplies by ``sigmoid(centerness)`` for NMS and the final
  score. Both clip boxes to ``img_shape`` and run class-aware NMS at IoU 0.6, 100 per image;
* ground truth: boxes with zero width/height would trip torchvision's assertion and are dropped
  on its side (the shapes data has none); ignore boxes are unused by both.

Quick mode (``--quick``) is a smoke test (64 px, 8 train / 4 val images, 2 steps each): its
APs mean nothing. The comparison is the full setting: ``--epochs 12`` (and 36), 320 px, all
256 train / 64 val images, batch 4, AdamW lr 1e-3, e.g. on a GPU

    .venv/bin/python -m benchmarks.bench_fcos_torchvision --device cuda --epochs 12 \\
        --output build/fcos_torchvision_12e.json

Record the printed table (with the device and the command) in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Subset
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from benchmarks._common import describe_device, print_table
from labkit.data import make_loader, shapes_dataset, test_transforms, train_transforms
from labkit.detectors.base import Detector
from labkit.engine.evaluate import evaluate
from labkit.engine.train import TrainConfig, train
from labkit.heads.dense_head import scale_factor_wh

NUM_CLASSES = 5  # shapes
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# torchvision's loss names -> labkit's (train() sums every entry whose name contains "loss").
LOSS_NAMES = {
    "classification": "loss_cls",
    "bbox_regression": "loss_bbox",
    "bbox_ctrness": "loss_centerness",
}


# ----------------------------------------------------------------------------- torchvision side


class BackboneWithFPN(nn.Module):
    """labkit's backbone + FPN as torchvision wants a detection backbone: ``forward(x)`` ->
    ``OrderedDict`` of the pyramid levels (finest first), plus ``out_channels``."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.neck(self.backbone(x))
        return OrderedDict((f"p{i + 3}", f) for i, f in enumerate(feats))


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without resize and normalize: labkit's loader already did both.

    What is left is ``batch_images`` (pad to a multiple of 32, bottom-right, zeros) and
    ``postprocess`` (boxes scaled by original / resized size = 1, i.e. unchanged).
    """

    def __init__(self, size: int) -> None:
        super().__init__(size, size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=32)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


class TorchvisionFCOS(Detector):
    """torchvision's ``FCOS`` behind labkit's detector interface, so ``labkit.engine.train``
    and ``labkit.engine.evaluate`` run it unchanged.

    ``loss(batch)`` -> ``{"loss_cls", "loss_bbox", "loss_centerness"}`` (torchvision's three
    losses, renamed); ``predict(batch, rescale=True)`` -> per image ``{"boxes", "scores",
    "labels"}``, boxes in original pixels (divided by ``scale_factor``) when ``rescale``.
    """

    def __init__(self, model: FCOS, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone.backbone

    @property
    def neck(self) -> nn.Module:
        return self.model.backbone.neck

    @staticmethod
    def images_of(batch: dict) -> list[Tensor]:
        """The batch's images cropped to their ``img_shape`` (torchvision pads them again)."""
        out = []
        for img, meta in zip(batch["img"], batch["img_metas"], strict=True):
            h, w = tuple(meta["img_shape"])[:2]
            out.append(img[:, :h, :w])
        return out

    @staticmethod
    def targets_of(batch: dict) -> list[dict[str, Tensor]]:
        """``[{"boxes": [K, 4] xyxy, "labels": [K] in 0..C-1}]`` without zero-size boxes."""
        targets = []
        for boxes, labels in zip(batch["gt_bboxes"], batch["gt_labels"], strict=True):
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            targets.append({"boxes": boxes[keep], "labels": labels[keep].long()})
        return targets

    def loss(self, batch: dict) -> dict[str, Tensor]:
        batch = self.inputs(batch)
        was_training = self.model.training
        self.model.train()  # torchvision returns losses only in training mode
        try:
            losses = self.model(self.images_of(batch), self.targets_of(batch))
        finally:
            self.model.train(was_training)
        return {LOSS_NAMES.get(k, k): v for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, batch: dict, rescale: bool = True) -> list[dict[str, Tensor]]:
        batch = self.inputs(batch, with_gt=False)
        was_training = self.model.training
        self.model.eval()
        try:
            dets = self.model(self.images_of(batch))
        finally:
            self.model.train(was_training)
        results = []
        for det, meta in zip(dets, batch["img_metas"], strict=True):
            boxes = det["boxes"]
            if rescale:  # as labkit's dense heads: multiply by the reciprocal
                sw, sh = scale_factor_wh(meta)
                boxes = boxes * boxes.new_tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh])
            results.append(
                {"boxes": boxes, "scores": det["scores"], "labels": det["labels"].long()}
            )
        return results


def copy_head_weights(labkit_head: nn.Module, tv_head: FCOSHead) -> None:
    """Load labkit's ``FCOSHead`` weights into torchvision's ``FCOSHead`` layer by layer.

    Needs the same tower depth and width, GroupNorm towers and the centerness branch on the
    regression tower; labkit's ``Scale`` factors have no counterpart and must be 1.
    """
    for scale in labkit_head.scales:
        if float(scale.scale.detach()) != 1.0:
            raise ValueError("labkit head: Scale factors must be 1 to copy into torchvision's head")
    if not getattr(labkit_head, "centerness_on_reg", False):
        raise ValueError("labkit head: centerness must be on the regression tower")
    mapping = {"conv_cls.": "classification_head.cls_logits."}
    mapping["conv_reg."] = "regression_head.bbox_reg."
    mapping["conv_centerness."] = "regression_head.bbox_ctrness."
    for i in range(labkit_head.stacked_convs):
        for j in range(3):  # conv, GroupNorm, ReLU
            mapping[f"cls_convs.{i}.{j}."] = f"classification_head.conv.{3 * i + j}."
            mapping[f"reg_convs.{i}.{j}."] = f"regression_head.conv.{3 * i + j}."
    src = labkit_head.state_dict()
    dst = tv_head.state_dict()
    new = {}
    for key, value in src.items():
        if key.startswith("scales."):
            continue
        prefix = next((p for p in mapping if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"labkit head: no torchvision counterpart for {key!r}")
        target = mapping[prefix] + key[len(prefix) :]
        if target not in dst or dst[target].shape != value.shape:
            raise KeyError(f"torchvision head: {target!r} missing or shaped unlike {key!r}")
        new[target] = value.clone()
    missing = sorted(set(dst) - set(new))
    if missing:
        raise KeyError(f"torchvision head: not filled from labkit's head: {missing}")
    tv_head.load_state_dict(new)


def torchvision_fcos(labkit_model: nn.Module, image_size: int, head_init: str = "copy"):
    """torchvision's FCOS on deep copies of ``labkit_model``'s backbone and FPN.

    The head has labkit's tower depth (``num_convs``) and GroupNorm(32) towers; its weights
    are copied from labkit's head (``head_init="copy"``) or left as torchvision draws them
    (``"torchvision"``). Test settings follow labkit's ``test_cfg``. Returns a
    :class:`TorchvisionFCOS`.
    """
    if head_init not in ("copy", "torchvision"):
        raise ValueError(f"head_init: expected 'copy' or 'torchvision', got {head_init!r}")
    head = labkit_model.head
    if head.feat_channels != head.in_channels:
        raise ValueError("torchvision's FCOSHead towers are as wide as its input")
    body = BackboneWithFPN(
        copy.deepcopy(labkit_model.backbone), copy.deepcopy(labkit_model.neck), head.in_channels
    )
    tv_head = FCOSHead(head.in_channels, 1, head.num_classes, num_convs=head.stacked_convs)
    if head_init == "copy":
        copy_head_weights(head, tv_head)
    strides = tuple(int(s) for s in head.strides)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    cfg = head.test_cfg
    model = FCOS(
        body,
        head.num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=anchors,
        head=tv_head,
        center_sampling_radius=head.center_sample_radius,
        score_thresh=cfg.score_thr,
        nms_thresh=cfg.iou_threshold,
        detections_per_img=cfg.max_per_img,
        topk_candidates=cfg.nms_pre,
    )
    model.transform = NoResizeTransform(image_size)
    return TorchvisionFCOS(model, head.num_classes)


# labkit FCOS variants that take one of torchvision's three choices each (or all of them), to
# find which difference matters: ``--variants uniform_giou point_offset_0 fixed_scale``.
VARIANTS = {
    "uniform_giou": {"bbox_loss_weight": "uniform"},
    "point_offset_0": {"point_offset": 0.0},
    "fixed_scale": {"learnable_scale": False},
    "all_three": {"bbox_loss_weight": "uniform", "point_offset": 0.0, "learnable_scale": False},
}


def build_models(
    seed: int, image_size: int, head_init: str = "copy", variants: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """``{"labkit": FCOS, "torchvision": TorchvisionFCOS, "labkit+<variant>": ...}``, all from
    the same initial weights (the variants change no parameter, only how they are used)."""
    from labkit.recipes import fcos

    torch.manual_seed(seed)
    labkit_model = fcos(NUM_CLASSES, backbone="tiny")
    models = {
        "labkit": labkit_model,
        "torchvision": torchvision_fcos(labkit_model, image_size, head_init),
    }
    for name in variants:
        torch.manual_seed(seed)
        models[f"labkit+{name}"] = fcos(NUM_CLASSES, backbone="tiny", **VARIANTS[name])
    return models


# ----------------------------------------------------------------------------- benchmark


def default_milestones(epochs: int) -> tuple[int, ...]:
    """mmdetection's 1x steps scaled to ``epochs``: (8, 11) of 12, (24, 33) of 36."""
    return tuple(sorted({max(1, epochs * 8 // 12), max(1, epochs * 11 // 12)}))


def _subset(dataset, n: int | None):
    return dataset if not n else Subset(dataset, range(min(n, len(dataset))))


def _loss_ends(history) -> tuple[float | None, float | None]:
    """Mean total loss over the first and the last tenth of the steps (at least one step)."""
    _, losses = history.series("loss")
    if not losses:
        return None, None
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def run_one(name: str, model: nn.Module, args, config: TrainConfig, device) -> dict:
    """Train ``model`` on a freshly built loader, evaluate on val; one result row as a dict."""
    size = (args.image_size, args.image_size)
    train_set = _subset(
        shapes_dataset("train", root=args.root, transforms=train_transforms(size, seed=args.seed)),
        args.num_train,
    )
    val_set = _subset(
        shapes_dataset("val", root=args.root, transforms=test_transforms(size)), args.num_val
    )
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed)
    val_loader = make_loader(val_set, args.batch_size)
    start = time.perf_counter()
    history = train(model, loader, config, device=device)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate(model, val_loader, val_set, device=device, progress=False)
    first, last = _loss_ends(history)
    return {
        "implementation": name,
        **{k: float(metrics[k]) for k in METRICS},
        "num_detections": int(metrics["num_detections"]),
        "train_minutes": minutes,
        "steps": len(history.train),
        "loss_first": first,
        "loss_last": last,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 64 px, 8/4 images, 2 steps"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-iters", type=int, default=None, help="default min(500, steps/4)")
    parser.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=None,
        help="epochs (default 8/12, 11/12 of the run)",
    )
    parser.add_argument("--max-norm", type=float, default=35.0, help="gradient clipping, 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=None, help="train images (default all)")
    parser.add_argument("--num-val", type=int, default=None, help="val images (default all)")
    parser.add_argument("--head-init", choices=("copy", "torchvision"), default="copy")
    parser.add_argument(
        "--variants", nargs="*", choices=sorted(VARIANTS), default=[],
        help="also train labkit FCOS with torchvision's loss weighting / point offset / scale",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--root", default=None, help="shapes folder (default data/shapes)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.num_train, args.num_val = 64, 8, 4
        args.batch_size, args.epochs = 4, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and evaluate both FCOS implementations; print the table and return the results
    (``{"rows": [...], "ratio_AP": float | None, "table": str, ...}``)."""
    args = parse_args(argv)
    import labkit

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = labkit.device(args.device)
        models = build_models(args.seed, args.image_size, args.head_init, tuple(args.variants))
        num_train = len(_subset(shapes_dataset("train", root=args.root), args.num_train))
        steps = args.epochs * math.ceil(num_train / args.batch_size)
        config = TrainConfig(
            epochs=args.epochs,
            max_iters=2 if args.quick else None,
            optimizer="adamw",
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_iters=(
                args.warmup_iters if args.warmup_iters is not None else min(500, steps // 4)
            ),
            milestones=tuple(args.milestones or default_milestones(args.epochs)),
            max_norm=args.max_norm or None,
            progress=False,
            log_every=10**9,
            eval_every=10**9,
            checkpoint_every=10**9,
            sampler_seed=args.seed,
        )
        rows = [run_one(name, model, args, config, device) for name, model in models.items()]
        device_text = describe_device(device)
    finally:
        torch.set_num_threads(threads)

    ap_tv = rows[1]["AP"]
    ratio = rows[0]["AP"] / ap_tv if ap_tv > 0 else None
    subset = f"{args.num_train or 'all'} train / {args.num_val or 'all'} val images"
    title = (
        f"FCOS, labkit vs torchvision: COCO AP on shapes val after {args.epochs} epoch(s) from "
        f"the same initial weights ({subset}, {args.image_size} px, batch {args.batch_size}, "
        f"AdamW lr {args.lr:g}, head init {args.head_init}, seed {args.seed}; "
        f"{device_text})"
    )
    header = [
        "implementation",
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AP vs torchvision",
        "train min",
        "steps",
        "loss first",
        "loss last",
    ]
    table_rows = [
        [
            r["implementation"],
            r["AP"],
            r["AP50"],
            r["AP75"],
            r["APs"],
            r["APm"],
            r["APl"],
            (r["AP"] / ap_tv if ap_tv > 0 else None),
            r["train_minutes"],
            r["steps"],
            r["loss_first"],
            r["loss_last"],
        ]
        for r in rows
    ]
    table = print_table(title, header, table_rows)
    ratio_text = "n/a (torchvision AP is 0)" if ratio is None else f"{ratio:.3f}"
    print(f"AP(labkit) / AP(torchvision) = {ratio_text}")
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "train_config": {k: v for k, v in vars(config).items() if k != "lr_mult"},
        "device": device_text,
        "rows": rows,
        "ratio_AP": ratio,
        "table": table,
    }
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
