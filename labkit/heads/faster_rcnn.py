"""Faster R-CNN: backbone + FPN + RPN + RoI head as one detector, its recipe, and Co-DETR's auxiliary variant.

``FasterRCNNHead`` is the part that works on any list of feature maps (an FPN, or Co-DETR's
encoder memory reshaped into maps): ``loss(feats, batch) -> (losses, positives)`` runs

1. the RPN: its losses (``loss_rpn_cls``, ``loss_rpn_bbox``) and, without gradient, its
   proposals (``train_proposal_cfg``: nms_pre 2000, NMS 0.7, 1000 per image);
2. the RoI head on those proposals: ``loss_cls``, ``loss_bbox`` (and the logged ``acc``),
   and the sampled positive RoIs as ``AuxPositives`` (labkit.heads.aux_positives).

``TwoStageDetector`` puts a backbone and neck in front and implements labkit's detector
interface (``loss(batch)``, ``predict(batch, rescale=True)``), so ``labkit.engine.train``
and ``labkit.engine.evaluate`` use it like any one-stage model. ``faster_rcnn(num_classes,
backbone=...)`` is the recipe (mmdetection's ``faster-rcnn_r50_fpn_1x``: C2-C5, FPN P2-P6 with
a max-pooled P6, anchors 8 x stride on strides 4-64, RoIAlign 7x7 on P2-P5, 2 FCs of 1024).
``codetr_faster_rcnn_head`` builds the auxiliary head with Co-DETR's settings.
"""

from __future__ import annotations

from torch import Tensor, nn

from labkit.anchors import AnchorGenerator
from labkit.boxes import DeltaXYWHBBoxCoder
from labkit.heads.aux_positives import AuxPositives
from labkit.heads.detector import SingleStageDetector
from labkit.heads.roi_extractor import RoIExtractor
from labkit.heads.roi_head import Shared2FCBBoxHead, StandardRoIHead
from labkit.heads.rpn import RPNHead, rpn_anchor_generator
from labkit.losses import CrossEntropyLoss, GIoULoss, L1Loss

# Widths of the CPU configuration (backbone="tiny").
TINY_FPN_CHANNELS = 64
TINY_FC_CHANNELS = 256


class FasterRCNNHead(nn.Module):
    """RPN + RoI head on given multi-level features (see the module docstring).

    Args:
        rpn_head: an ``RPNHead`` whose anchor strides match the feature maps.
        roi_head: a ``StandardRoIHead`` whose extractor reads the first levels.
    """

    def __init__(self, rpn_head: RPNHead, roi_head: StandardRoIHead) -> None:
        super().__init__()
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    @property
    def num_classes(self) -> int:
        """Foreground classes ``C``."""
        return self.roi_head.num_classes

    def loss(self, feats: list[Tensor], batch: dict) -> tuple[dict[str, Tensor], AuxPositives]:
        """``({"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}, roi positives)``.

        ``feats[l]: Tensor[B, C, H_l, W_l]``; ``batch``: ``labkit.data.collate`` output on the
        features' device.
        """
        rpn_losses, proposals, _ = self.rpn_head.loss_and_predict(feats, batch)
        roi_losses, positives = self.roi_head.loss(feats, [p["boxes"] for p in proposals], batch)
        return {**rpn_losses, **roi_losses}, positives

    def predict(
        self, feats: list[Tensor], batch_img_metas: list[dict], rescale: bool = False
    ) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes", "scores", "labels"}`` (original pixels if ``rescale``)."""
        proposals = self.rpn_head.predict(feats, batch_img_metas, rescale=False)
        return self.roi_head.predict(
            feats, [p["boxes"] for p in proposals], batch_img_metas, rescale=rescale
        )


class TwoStageDetector(SingleStageDetector):
    """Backbone -> neck -> ``FasterRCNNHead``, with labkit's detector interface.

    Everything but the losses is the one-stage detector's: ``extract_feat``, ``predict`` (the
    head proposes, then classifies), input checks and device handling.

    Args:
        backbone: ``Tensor[B, 3, H, W]`` -> tuple of maps. neck: e.g. ``labkit.nn.FPN`` or ``None``.
        head: a ``FasterRCNNHead``.
    """

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses of a collated batch: RPN and RoI losses plus the logged ``acc``."""
        return self.loss_and_positives(batch)[0]

    def loss_and_positives(self, batch: dict) -> tuple[dict[str, Tensor], AuxPositives]:
        """``loss(batch)`` plus the RoI head's positives (what Co-DETR would receive)."""
        batch = self._training_batch(batch)
        return self.head.loss(self.extract_feat(batch["img"]), batch)


def faster_rcnn_head(
    num_classes: int,
    in_channels: int = 256,
    *,
    fc_out_channels: int = 1024,
    rpn_strides: tuple[int, ...] = (4, 8, 16, 32, 64),
    roi_strides: tuple[int, ...] = (4, 8, 16, 32),
    rpn_test_cfg: dict | None = None,
    rpn_train_proposal_cfg: dict | None = None,
    rcnn_test_cfg: dict | None = None,
) -> FasterRCNNHead:
    """mmdetection's Faster R-CNN heads: RPN (L1, sigmoid CE) + Shared2FC RoI head (L1 on deltas)."""
    rpn = RPNHead(
        in_channels,
        in_channels,
        anchor_generator=rpn_anchor_generator(rpn_strides),
        test_cfg=rpn_test_cfg,
        train_proposal_cfg=rpn_train_proposal_cfg,
    )
    roi = StandardRoIHead(
        RoIExtractor(roi_strides, output_size=7, sampling_ratio=0, finest_scale=56),
        Shared2FCBBoxHead(num_classes, in_channels, 7, fc_out_channels),
        test_cfg=rcnn_test_cfg,
    )
    return FasterRCNNHead(rpn, roi)


def codetr_faster_rcnn_head(
    num_classes: int,
    in_channels: int = 256,
    *,
    loss_scale: float = 12.0,
    fc_out_channels: int = 1024,
) -> FasterRCNNHead:
    """Co-DETR's auxiliary Faster R-CNN (co_deformable_detr_r50_1x_coco) on maps of strides 8-128.

    RPN: 9 anchors per location (octave base scale 4, 3 scales per octave, ratios 0.5/1/2) on
    strides 8-128, sigmoid CE and L1 with weight ``loss_scale``, training proposals nms_pre
    4000 / NMS 0.7 / 1000. RoI head: RoIAlign on strides 8-64 with ``finest_scale=112``,
    class-specific regression with ``reg_decoded_bbox`` and stds (0.1, 0.1, 0.2, 0.2), CE with
    weight ``loss_scale`` and GIoU with ``10 * loss_scale``; test score_thr 0, NMS 0.5, 100.
    ``loss_scale`` is Co-DETR's ``num_dec_layer * lambda_2`` (6 x 2 = 12).
    """
    anchors = AnchorGenerator(
        strides=[8, 16, 32, 64, 128],
        ratios=[0.5, 1.0, 2.0],
        octave_base_scale=4,
        scales_per_octave=3,
    )
    rpn = RPNHead(
        in_channels,
        in_channels,
        anchor_generator=anchors,
        loss_cls=CrossEntropyLoss(use_sigmoid=True, loss_weight=1.0 * loss_scale),
        loss_bbox=L1Loss(loss_weight=1.0 * loss_scale),
        train_proposal_cfg={"nms_pre": 4000, "max_per_img": 1000, "iou_threshold": 0.7},
    )
    bbox_head = Shared2FCBBoxHead(
        num_classes,
        in_channels,
        7,
        fc_out_channels,
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        bbox_coder=DeltaXYWHBBoxCoder((0.0,) * 4, (0.1, 0.1, 0.2, 0.2)),
        loss_cls=CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0 * loss_scale),
        loss_bbox=GIoULoss(loss_weight=10.0 * loss_scale),
    )
    roi = StandardRoIHead(
        RoIExtractor([8, 16, 32, 64], output_size=7, sampling_ratio=0, finest_scale=112),
        bbox_head,
        test_cfg={"score_thr": 0.0, "iou_threshold": 0.5, "max_per_img": 100},
    )
    return FasterRCNNHead(rpn, roi)


def faster_rcnn(
    num_classes: int,
    backbone: str = "resnet18",
    *,
    fpn_channels: int | None = None,
    fc_out_channels: int | None = None,
    rpn_test_cfg: dict | None = None,
    rcnn_test_cfg: dict | None = None,
) -> TwoStageDetector:
    """Faster R-CNN with FPN (mmdetection's ``faster-rcnn_r50_fpn_1x``), no pretrained weights.

    Backbone C2-C5 -> FPN P2-P6 (P6 by stride-2 max-pooling) -> ``faster_rcnn_head``.
    The default ResNet-18 matches labkit's other recipes; ``backbone="resnet50"`` is
    mmdetection's configuration. ``backbone="tiny"`` is the CPU configuration: 64-channel FPN
    and 256-wide FCs.

    Args:
        num_classes: foreground classes (5 for shapes).
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        fpn_channels: FPN width (``None``: 256, tiny 64). fc_out_channels: FC width
            (``None``: 1024, tiny 256).
        rpn_test_cfg: dict of ``TestConfig`` fields for test-time proposals (nms_pre 1000,
            NMS 0.7, 1000 per image).
        rcnn_test_cfg: dict for detections (score_thr 0.05, NMS 0.5, 100 per image).

    Returns:
        A ``TwoStageDetector`` with ``model.recipe == ("faster_rcnn", {...kwargs})``.
    """
    from labkit.nn.backbones import build_backbone
    from labkit.nn.fpn import FPN

    kwargs = {
        "num_classes": num_classes,
        "backbone": backbone,
        "fpn_channels": fpn_channels,
        "fc_out_channels": fc_out_channels,
        "rpn_test_cfg": rpn_test_cfg,
        "rcnn_test_cfg": rcnn_test_cfg,
    }
    tiny = backbone == "tiny"
    if fpn_channels is None:
        fpn_channels = TINY_FPN_CHANNELS if tiny else 256
    if fc_out_channels is None:
        fc_out_channels = TINY_FC_CHANNELS if tiny else 1024
    body = build_backbone(
        backbone, out_indices=(0, 1, 2, 3), **({} if tiny else {"norm_eval": False})
    )
    neck = FPN(body.out_channels, fpn_channels, num_outs=5, add_extra_convs=False)
    head = faster_rcnn_head(
        num_classes,
        fpn_channels,
        fc_out_channels=fc_out_channels,
        rpn_test_cfg=rpn_test_cfg,
        rcnn_test_cfg=rcnn_test_cfg,
    )
    model = TwoStageDetector(body, neck, head)
    model.recipe = ("faster_rcnn", kwargs)
    return model
