"""Detectors: the one entry point a batch goes through (validate once, move once), then the model.

``base.Detector`` (``inputs``, ``loss``, ``predict``) -> ``single_stage.SingleStageDetector``
(backbone, FPN, dense head), ``two_stage.TwoStageDetector`` (RPN + RoI head),
``deformable_detr.DeformableDETR``, ``co_detr.CoDETR``. Build them with ``labkit.recipes``.
"""

from labkit.detectors.base import Detector
from labkit.detectors.co_detr import CoDETR
from labkit.detectors.deformable_detr import DeformableDETR
from labkit.detectors.single_stage import SingleStageDetector
from labkit.detectors.two_stage import TwoStageDetector

__all__ = ["CoDETR", "DeformableDETR", "Detector", "SingleStageDetector", "TwoStageDetector"]
