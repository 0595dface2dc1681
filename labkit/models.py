"""Every recipe labkit ships, by name: the table the CLI, the benchmarks and checkpoints use.

A recipe is a plain function ``recipe(num_classes, **kwargs) -> model`` defined next to its
head; this module only imports them, so ``RECIPES["atss"](num_classes=5, backbone="tiny")``
and ``labkit.heads.atss.atss(5, backbone="tiny")`` build the same model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from labkit.codetr.co_detr import co_deformable_detr
from labkit.detr.deformable_detr import deformable_detr
from labkit.heads.atss import atss
from labkit.heads.faster_rcnn import faster_rcnn
from labkit.heads.fcos import fcos
from labkit.heads.fovea import foveabox
from labkit.heads.fsaf import fsaf
from labkit.heads.paa import paa
from labkit.heads.reppoints import reppoints
from labkit.heads.retina import retinanet

RECIPES: dict[str, Callable[..., nn.Module]] = {
    "retinanet": retinanet,
    "atss": atss,
    "paa": paa,
    "fcos": fcos,
    "foveabox": foveabox,
    "fsaf": fsaf,
    "reppoints": reppoints,
    "faster_rcnn": faster_rcnn,
    "deformable_detr": deformable_detr,
    "co_deformable_detr": co_deformable_detr,
}

__all__ = ["RECIPES", *RECIPES]


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the recipe called ``name`` (a key of :data:`RECIPES`) for ``num_classes`` classes."""
    if name not in RECIPES:
        raise ValueError(f"name: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name](num_classes, **kwargs)
