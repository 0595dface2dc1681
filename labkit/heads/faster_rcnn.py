"""Faster R-CNN's two heads as one: the RPN and the RoI head on any list of feature maps.

``FasterRCNNHead`` works on an FPN's levels or on Co-DETR's encoder memory reshaped into
maps: ``loss_and_targets(feats, batch) -> (losses, TwoStageTargets)`` runs

1. the RPN: its losses (``loss_rpn_cls``, ``loss_rpn_bbox``) and, without gradient, its
   proposals (``train_proposal_cfg``: nms_pre 2000, NMS 0.7, 1000 per image);
2. the RoI head on those proposals: ``loss_cls``, ``loss_bbox`` (and the logged ``acc``).

The targets are both heads' (``TwoStageTargets``: the RPN's ``AnchorTargets`` and the RoI
head's ``RoITargets``). ``faster_rcnn_head`` builds mmdetection's ``faster-rcnn_r50_fpn_1x``
heads (anchors 8 x stride on strides 4-64, RoIAlign 7x7 on P2-P5, 2 FCs of 1024); the
detector around them is ``labkit.detectors.TwoStageDetector`` and the recipe
``labkit.recipes.faster_rcnn``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from labkit.heads.anchor_head import AnchorTargets
from labkit.heads.roi_extractor import RoIExtractor
from labkit.heads.roi_head import RoITargets, Shared2FCBBoxHead, StandardRoIHead
from labkit.heads.rpn import RPNHead, rpn_anchor_generator


@dataclass
class TwoStageTargets:
    """The targets of both stages: ``rpn`` (sampled anchors) and ``roi`` (sampled proposals)."""

    rpn: AnchorTargets
    roi: RoITargets


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

    def loss_and_targets(
        self, feats: list[Tensor], batch: dict
    ) -> tuple[dict[str, Tensor], TwoStageTargets]:
        """RPN then RoI head: ``({"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox",
        "acc"}, TwoStageTargets)``.

        ``feats[l]: Tensor[B, C, H_l, W_l]``; ``batch``: ``labkit.data.collate`` output on the
        features' device, already validated by the detector.
        """
        rpn_losses, proposals, rpn_targets = self.rpn_head.loss_and_predict(feats, batch)
        roi_losses, roi_targets = self.roi_head.loss_and_targets(
            feats, [p["boxes"] for p in proposals], batch
        )
        return {**rpn_losses, **roi_losses}, TwoStageTargets(rpn_targets, roi_targets)

    def loss(self, feats: list[Tensor], batch: dict) -> dict[str, Tensor]:
        """The losses of :meth:`loss_and_targets`."""
        return self.loss_and_targets(feats, batch)[0]

    def predict(
        self, feats: list[Tensor], batch_img_metas: list[dict], rescale: bool = False
    ) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes", "scores", "labels"}`` (original pixels if ``rescale``)."""
        proposals = self.rpn_head.predict(feats, batch_img_metas, rescale=False)
        return self.roi_head.predict(
            feats, [p["boxes"] for p in proposals], batch_img_metas, rescale=rescale
        )


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
