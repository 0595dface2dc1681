"""Weights from other codebases: mmdetection 3.x (and Co-DETR) checkpoints into labkit recipes.

    from labkit.convert import from_mmdet
    model = from_mmdet("atss_r50_fpn_1x_coco.pth", "atss")

``from_mmdet`` loads through an explicit key map per architecture (``mmdet_key_map``) and
refuses what it cannot reproduce exactly; ``seeded_state_dict`` makes the stand-in weights
the mmdetection and Co-DETR conformance fixtures (``tests/fixtures/mmdet``) are built and
checked with.
"""

from labkit.convert.mmdet import from_mmdet, load_mmdet_state
from labkit.convert.mmdet_keys import MMDET_RECIPES, mmdet_key_map
from labkit.convert.seeded import seeded_state_dict

__all__ = ["MMDET_RECIPES", "from_mmdet", "load_mmdet_state", "mmdet_key_map", "seeded_state_dict"]
