"""Label assignment: which prior learns which ground truth (MaxIoU, ATSS, PAA) and sampling."""

from labkit.assigners.atss import ATSSAssigner
from labkit.assigners.base import AssignResult
from labkit.assigners.max_iou import MaxIoUAssigner
from labkit.assigners.samplers import PseudoSampler, RandomSampler, SamplingResult

__all__ = [
    "ATSSAssigner",
    "AssignResult",
    "MaxIoUAssigner",
    "PseudoSampler",
    "RandomSampler",
    "SamplingResult",
]
