"""Two-stage detector = backbone + neck + ``FasterRCNNHead`` (RPN proposals, then RoI head)."""

from __future__ import annotations

from labkit.detectors.single_stage import SingleStageDetector

__all__ = ["TwoStageDetector"]


class TwoStageDetector(SingleStageDetector):
    """Backbone -> neck -> ``labkit.heads.faster_rcnn.FasterRCNNHead``.

    Everything is the one-stage detector's (``inputs``, ``extract_feat``, ``loss``,
    ``loss_and_targets``, ``predict``): the head proposes, then classifies. The losses add
    the RPN's (``loss_rpn_cls``, ``loss_rpn_bbox``) to the RoI head's (``loss_cls``,
    ``loss_bbox`` and the logged ``acc``); the targets are a ``TwoStageTargets``.

    Args:
        backbone: ``Tensor[B, 3, H, W]`` -> tuple of maps. neck: e.g. ``labkit.nn.FPN`` or ``None``.
        head: a ``FasterRCNNHead``.
    """
