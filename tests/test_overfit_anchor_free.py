"""Each anchor-free detector (tiny backbone, CPU) drives its loss down on two images and then detects them."""

from __future__ import annotations

import pytest
import torch
from toy_batches import assert_detects, overfit

from labkit.recipes import fcos, foveabox, fsaf, reppoints


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "kwargs", "iters", "lr", "max_norm", "min_score"),
    # max_norm: mmdetection trains FSAF and RepPoints with grad_clip max_norm 10.
    [
        (fcos, {}, 80, 2e-3, None, 0.2),
        (foveabox, {}, 100, 2e-3, 10.0, 0.3),
        (fsaf, {}, 120, 3e-3, 10.0, 0.3),
        # Deformable convolution is slow on CPU: a narrower head keeps the test short.
        (reppoints, {"feat_channels": 16}, 120, 3e-3, 10.0, 0.3),
    ],
    ids=["fcos", "foveabox", "fsaf", "reppoints"],
)
def test_overfit_two_images(recipe, kwargs, iters, lr, max_norm, min_score):
    torch.manual_seed(0)
    model = recipe(5, backbone="tiny", **kwargs)
    first, last = overfit(model, iters, lr, max_norm)
    assert last < 0.35 * first, (first, last)
    assert_detects(model, min_score)
