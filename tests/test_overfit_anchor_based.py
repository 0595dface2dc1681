"""Each anchor-based detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch
from toy_batches import assert_detects, overfit

from labkit.recipes import atss, paa, retinanet


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "iters"),
    [(retinanet, 90), (atss, 80), (paa, 70)],
    ids=["retinanet", "atss", "paa"],
)
def test_overfit_two_images(recipe, iters):
    torch.manual_seed(0)
    model = recipe(5, backbone="tiny")
    first, last = overfit(model, iters)
    assert last < 0.35 * first, (first, last)
    assert_detects(model)
