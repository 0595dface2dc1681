"""Label assignment: which prior learns which ground truth (MaxIoU, ATSS, PAA, point and centre-region) and sampling."""

from labkit.assigners.atss import ATSSAssigner
from labkit.assigners.base import AssignResult
from labkit.assigners.center_region import CenterRegionAssigner
from labkit.assigners.max_iou import MaxIoUAssigner
from labkit.assigners.point import PointAssigner
from labkit.assigners.samplers import PseudoSampler, RandomSampler, SamplingResult

__all__ = [
    "ATSSAssigner",
    "AssignResult",
    "CenterRegionAssigner",
    "MaxIoUAssigner",
    "PointAssigner",
    "PseudoSampler",
    "RandomSampler",
    "SamplingResult",
]
