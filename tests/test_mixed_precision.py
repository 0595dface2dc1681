"""bf16 autocast (``labkit train --amp``, CPU or CUDA): dense heads run their convolutions in
bf16 but assign, decode boxes and compute losses in float32, so the targets are the float32
targets and the losses stay within bf16's rounding of the float32 ones."""

from __future__ import annotations

import pytest
import torch

from labkit.recipes import build_model
from tests.toy_batches import two_images

torch.set_num_threads(1)


@pytest.mark.parametrize("recipe", ["fcos", "atss", "retinanet", "paa"])
def test_dense_losses_under_bf16_autocast_are_float32_on_float32_targets(recipe, monkeypatch):
    torch.manual_seed(0)
    model = build_model(recipe, num_classes=5, backbone="tiny")
    batch = two_images()
    losses, targets = model.loss_and_targets(batch)

    seen = {}
    by_feat = model.head.loss_and_targets_by_feat

    def spy(*outs, **kwargs):
        seen["dtypes"] = {t.dtype for level_maps in outs for t in level_maps}
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return by_feat(*outs, **kwargs)

    monkeypatch.setattr(model.head, "loss_and_targets_by_feat", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.extract_feat(batch["img"])
        raw = model.head(feats)
        bf16_losses, bf16_targets = model.loss_and_targets(batch)
    # the convolutions ran in bf16 ...
    assert feats[0].dtype == torch.bfloat16
    assert raw[0][0].dtype == torch.bfloat16
    # ... targets and losses saw float32 maps, with autocast off
    assert seen == {"dtypes": {torch.float32}, "autocast": False}
    assert set(bf16_losses) == set(losses)
    for key, value in bf16_losses.items():
        assert value.dtype == torch.float32, key
        # bf16 keeps 8 bits of mantissa (0.4 % per value); the losses average many values
        assert value.item() == pytest.approx(losses[key].item(), rel=5e-3), key
    if recipe != "paa":  # PAA re-assigns by the losses, whose inputs bf16 rounded
        assert torch.equal(bf16_targets.labels, targets.labels)


def test_float32_coordinates_matter_where_bf16_would_round_them():
    """Why the cast: bf16 spaces values 2 px apart between 256 and 512 px."""
    x = torch.tensor([300.5, 301.0, 301.5])
    assert torch.unique(x.bfloat16()).numel() < 3
    assert torch.unique(x).numel() == 3


def test_cpu_amp_is_declared_by_the_dense_one_stage_detectors_only():
    def declared(recipe, **kw):
        model = build_model(recipe, num_classes=5, backbone="tiny", **kw)
        return getattr(model, "supports_cpu_amp", False)

    for recipe in ("retinanet", "atss", "paa", "fcos", "foveabox", "fsaf"):
        assert declared(recipe), recipe
    # no bf16 CPU kernel for torchvision's deformable convolution; two-stage and DETR losses are
    # not cast to float32
    assert not declared("reppoints")
    assert not declared("faster_rcnn")
    assert not declared("co_deformable_detr", num_queries=10)
