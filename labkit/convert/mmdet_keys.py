"""Explicit mmdetection 3.x -> labkit state-dict key maps, one per architecture (no guessing).

Each map is written out from the two codebases' module layouts:

- ResNet: mmdetection's ``ResNet`` and torchvision's (which labkit wraps) use the same names
  (``conv1``, ``bn1``, ``layerK.B.convJ``, ``downsample.0/1``); only pytorch-style ResNets
  (stride on the 3x3 conv) compute the same function, see ``labkit.convert.mmdet``.
- FPN: mmcv's ``ConvModule`` adds a ``.conv`` level (``lateral_convs.0.conv.weight``), labkit
  uses plain convs (``lateral_convs.0.weight``); indices agree (both start at
  ``start_level``; the extra P6/P7 convs follow the used levels in ``fpn_convs``).
- heads: ``bbox_head.`` becomes ``head.``; ConvModule towers become labkit's
  ``Sequential``/``ModuleList`` layouts (see each ``_*_head`` function).
"""

from __future__ import annotations

__all__ = ["MMDET_RECIPES", "RESNET_LAYOUTS", "mmdet_key_map"]

# depth -> (block kind, blocks per stage), as mmdetection's ResNet.arch_settings.
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# recipe -> (FPN inputs used, extra stride-2 FPN convs)
_NECKS = {
    "retinanet": (3, 2),
    "atss": (3, 2),
    "fcos": (3, 2),
    "paa": (3, 2),
    "foveabox": (3, 2),
    "fsaf": (3, 2),
    "faster_rcnn": (4, 0),
}
MMDET_RECIPES = tuple(_NECKS)


def _resnet(depth: int) -> dict[str, str]:
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"depth: expected one of {tuple(RESNET_LAYOUTS)}, got {depth!r}")
    kind, blocks = RESNET_LAYOUTS[depth]
    convs = 3 if kind == "bottleneck" else 2
    names = ["conv1.weight"] + [f"bn1.{p}" for p in _BN]
    for stage, num_blocks in enumerate(blocks, start=1):
        for block in range(num_blocks):
            prefix = f"layer{stage}.{block}"
            for j in range(1, convs + 1):
                names.append(f"{prefix}.conv{j}.weight")
                names += [f"{prefix}.bn{j}.{p}" for p in _BN]
            # the first block of a stage changes width or stride, except ResNet-18/34's layer1
            if block == 0 and (kind == "bottleneck" or stage > 1):
                names.append(f"{prefix}.downsample.0.weight")
                names += [f"{prefix}.downsample.1.{p}" for p in _BN]
    return {f"backbone.{n}": f"backbone.{n}" for n in names}


def _fpn(num_ins: int, num_extra: int) -> dict[str, str]:
    pairs = {}
    for kind, count in (("lateral_convs", num_ins), ("fpn_convs", num_ins + num_extra)):
        for i in range(count):
            for p in ("weight", "bias"):
                pairs[f"neck.{kind}.{i}.conv.{p}"] = f"neck.{kind}.{i}.{p}"
    return pairs


def _conv(mm: str, lk: str, bias: bool = True) -> dict[str, str]:
    params = ("weight", "bias") if bias else ("weight",)
    return {f"{mm}.{p}": f"{lk}.{p}" for p in params}


def _retinanet_head(stacked_convs: int) -> dict[str, str]:
    # labkit: Sequential(conv, ReLU, conv, ReLU, ...) -> conv i is entry 2i
    pairs = {}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            pairs |= _conv(f"bbox_head.{tower}.{i}.conv", f"head.{tower}.{2 * i}")
    for name in ("retina_cls", "retina_reg"):
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}")
    return pairs


def _scales(num_levels: int) -> dict[str, str]:
    return {f"bbox_head.scales.{i}.scale": f"head.scales.{i}.scale" for i in range(num_levels)}


def _atss_head(stacked_convs: int) -> dict[str, str]:
    # labkit: Sequential(conv, GN, ReLU, ...) -> conv i is entry 3i, its GN 3i + 1; the
    # convs have no bias (ConvModule's bias="auto" with a norm), as in mmdetection
    pairs = {}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            pairs |= _conv(f"bbox_head.{tower}.{i}.conv", f"head.{tower}.{3 * i}", bias=False)
            pairs |= _conv(f"bbox_head.{tower}.{i}.gn", f"head.{tower}.{3 * i + 1}")
    for name in ("atss_cls", "atss_reg", "atss_centerness"):
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}")
    return pairs | _scales(5)


def _fcos_head(stacked_convs: int) -> dict[str, str]:
    # labkit: ModuleList of Sequential(conv, GN, ReLU); the recipe's towers keep the conv
    # bias (mmdetection's conv_bias=True of the "tricks" configs)
    pairs = {}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            pairs |= _conv(f"bbox_head.{tower}.{i}.conv", f"head.{tower}.{i}.0")
            pairs |= _conv(f"bbox_head.{tower}.{i}.gn", f"head.{tower}.{i}.1")
    for name in ("conv_cls", "conv_reg", "conv_centerness"):
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}")
    return pairs | _scales(5)


def _fovea_head(stacked_convs: int) -> dict[str, str]:
    # labkit: ModuleList of Sequential(conv, ReLU); no norm, so the convs have a bias
    pairs = {}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            pairs |= _conv(f"bbox_head.{tower}.{i}.conv", f"head.{tower}.{i}.0")
    for name in ("conv_cls", "conv_reg"):
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}")
    return pairs


def _faster_rcnn_head() -> dict[str, str]:
    rpn, roi = "head.rpn_head", "head.roi_head.bbox_head"
    pairs = _conv("rpn_head.rpn_conv", f"{rpn}.rpn_conv.0")  # labkit: Sequential(conv, ReLU)
    for name in ("rpn_cls", "rpn_reg"):
        pairs |= _conv(f"rpn_head.{name}", f"{rpn}.{name}")
    for name in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg"):
        pairs |= _conv(f"roi_head.bbox_head.{name}", f"{roi}.{name}")
    return pairs


def mmdet_key_map(recipe: str, *, depth: int = 50, stacked_convs: int = 4) -> dict[str, str]:
    """The key map of labkit recipe ``recipe`` with a ResNet-``depth`` backbone.

    Args:
        recipe: one of :data:`MMDET_RECIPES` (``"retinanet"``, ``"atss"``, ``"fcos"``,
            ``"paa"``, ``"foveabox"``, ``"fsaf"``, ``"faster_rcnn"``).
        depth: ResNet depth, 18, 34, 50 or 101.
        stacked_convs: convs per head tower (dense recipes; mmdetection's configs use 4).

    Returns:
        ``{mmdet_key: labkit_key}``, one entry per mmdetection state-dict key (BatchNorm
        buffers included), e.g. ``"neck.fpn_convs.3.conv.weight" -> "neck.fpn_convs.3.weight"``.
    """
    if recipe not in _NECKS:
        raise ValueError(f"recipe: no mmdetection key map for {recipe!r}; have {MMDET_RECIPES}")
    if not isinstance(stacked_convs, int) or stacked_convs < 0:
        raise ValueError(f"stacked_convs: expected an int >= 0, got {stacked_convs!r}")
    pairs = _resnet(depth) | _fpn(*_NECKS[recipe])
    if recipe in ("retinanet", "fsaf"):  # FSAF: RetinaNet's layers, one prior per location
        return pairs | _retinanet_head(stacked_convs)
    if recipe in ("atss", "paa"):  # PAA: ATSS's layers, the IoU branch is atss_centerness
        return pairs | _atss_head(stacked_convs)
    if recipe == "fcos":
        return pairs | _fcos_head(stacked_convs)
    if recipe == "foveabox":
        return pairs | _fovea_head(stacked_convs)
    return pairs | _faster_rcnn_head()
