"""Weight-initialisation helpers with mmdetection's defaults (normal, xavier, prior-probability bias)."""

from __future__ import annotations

import math

from torch import nn


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias that makes ``sigmoid(bias) == prior_prob``: ``-log((1 - p) / p)``.

    RetinaNet starts every classifier at p = 0.01 so the ~100k easy negatives do not swamp
    the focal loss in the first iterations.
    """
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob: expected a probability in (0, 1), got {prior_prob!r}")
    return float(-math.log((1 - prior_prob) / prior_prob))


def normal_init(module: nn.Module, mean: float = 0.0, std: float = 1.0, bias: float = 0.0) -> None:
    """Fill ``module.weight`` from N(mean, std) and ``module.bias`` with ``bias`` (if present)."""
    if getattr(module, "weight", None) is not None:
        nn.init.normal_(module.weight, mean, std)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def xavier_init(
    module: nn.Module, gain: float = 1.0, bias: float = 0.0, distribution: str = "normal"
) -> None:
    """Xavier (Glorot) init of ``module.weight`` (``"uniform"`` or ``"normal"``), constant bias."""
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"distribution: expected 'uniform' or 'normal', got {distribution!r}")
    if getattr(module, "weight", None) is not None:
        if distribution == "uniform":
            nn.init.xavier_uniform_(module.weight, gain=gain)
        else:
            nn.init.xavier_normal_(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def constant_init(module: nn.Module, val: float, bias: float = 0.0) -> None:
    """Fill ``module.weight`` with ``val`` and ``module.bias`` with ``bias`` (norm layers)."""
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)
