"""Load an mmdetection 3.x checkpoint into the labkit recipe that computes the same function.

    model = from_mmdet("retinanet_r50_fpn_1x_coco.pth", "retinanet")   # eval mode

Every mmdetection key goes through the explicit map of ``labkit.convert.mmdet_keys`` to
exactly one labkit key of the same shape; anything left over on either side is an error
that lists the keys. What a state dict cannot show is checked from the checkpoint's
``meta`` config text when it is there (a caffe-style ResNet, FCOS's ``norm_on_bbox`` /
``centerness_on_reg``, Deformable-DETR's ``with_box_refine`` and two-stage ``num_queries``,
RepPoints' ``transform_method`` / ``center_init`` / ``use_grid_points``, an FPN GroupNorm's
group count), since those change the computed function without changing a key.

``co_deformable_detr`` reads Sense-X/Co-DETR's own checkpoints (mmdetection 2.x names); its
map is written from Co-DETR's source and proven, like the others, against Co-DETR's own code
(its mmdetection 2.25 on mmcv 1.7; ``benchmarks/codetr_fixtures.py``): the query head's
layers, proposals and detections, and the auxiliary heads' outputs.

Inputs: a converted model expects what mmdetection's pytorch-style configs feed: RGB images
normalised with ImageNet's mean and std (``labkit.data.transforms.Normalize``'s defaults).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from labkit.convert.mmdet_keys import MMDET_RECIPES, RESNET_LAYOUTS, mmdet_key_map
from labkit.recipes import RECIPES, build_model

__all__ = ["from_mmdet", "load_mmdet_state"]

# recipe -> (mmdetection classifier weight, outputs per class, extra outputs)
_CLASSIFIERS = {
    "retinanet": ("bbox_head.retina_cls.weight", 9, 0),
    "atss": ("bbox_head.atss_cls.weight", 1, 0),
    "fcos": ("bbox_head.conv_cls.weight", 1, 0),
    "paa": ("bbox_head.atss_cls.weight", 1, 0),
    "foveabox": ("bbox_head.conv_cls.weight", 1, 0),
    "fsaf": ("bbox_head.retina_cls.weight", 1, 0),
    "reppoints": ("bbox_head.reppoints_cls_out.weight", 1, 0),
    "faster_rcnn": ("roi_head.bbox_head.fc_cls.weight", 1, 1),  # + background
    "deformable_detr": ("bbox_head.cls_branches.0.weight", 1, 0),  # sigmoid, no background
    "co_deformable_detr": ("query_head.cls_branches.0.weight", 1, 0),
}
# Keys that name a feature labkit does not have, and what it is.
_UNSUPPORTED = {
    "conv_offset": "deformable convolutions (DCN)",
    "ema_": "an EMA copy of the weights (load the model's own keys only)",
    "data_preprocessor.": "a data preprocessor with parameters",
}
_LIST = 20  # keys shown per problem


def load_mmdet_state(checkpoint: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], dict]:
    """``(state_dict, meta)`` of an mmdetection checkpoint: a file path (read with
    ``torch.load(weights_only=True)``), a ``{"meta": ..., "state_dict": ...}`` dict or a
    plain state dict ``{key: Tensor}`` (``meta`` is then ``{}``)."""
    if isinstance(checkpoint, str | os.PathLike):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: no file at {path!r}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects beyond tensors (optimizer, message hub)
            raise ValueError(
                f"checkpoint: torch.load(weights_only=True) refused {path!r} ({err}); a full "
                f"training checkpoint holds more than weights: save its 'state_dict' (and "
                f"'meta') alone and pass that file"
            ) from err
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint: expected a path or a dict, got {type(checkpoint).__name__}")
    meta = {}
    if "state_dict" in checkpoint:
        meta = checkpoint.get("meta") or {}
        checkpoint = checkpoint["state_dict"]
    state = dict(checkpoint)
    wrong = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if wrong:
        raise TypeError(f"checkpoint: expected tensors, got other values for {wrong[:_LIST]}")
    if not state:
        raise ValueError("checkpoint: the state dict is empty")
    return state, dict(meta) if isinstance(meta, Mapping) else {}


def _infer_backbone(state: Mapping[str, Tensor]) -> str:
    """``"resnet18" | "resnet34" | "resnet50" | "resnet101"`` from the block count of layer3."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    for depth, (layout_kind, layout) in RESNET_LAYOUTS.items():
        if kind == layout_kind and len(blocks) == layout[2]:
            return f"resnet{depth}"
    raise ValueError(
        f"checkpoint: backbone is not a ResNet-18/34/50/101 ({kind} blocks, "
        f"{len(blocks)} in layer3); labkit has no other mmdetection backbone"
    )


def _infer_num_classes(state: Mapping[str, Tensor], recipe: str) -> int:
    key, per_class, extra = _CLASSIFIERS[recipe]
    if key not in state:
        raise ValueError(f"checkpoint: no {key!r}, so not an mmdetection {recipe} checkpoint")
    outputs = state[key].shape[0] - extra
    if outputs < per_class or outputs % per_class:
        raise ValueError(
            f"checkpoint: {key} has {state[key].shape[0]} outputs, expected "
            f"{per_class} x num_classes + {extra}"
        )
    return outputs // per_class


def _recipe_value(recipe: str, kwargs: Mapping, name: str) -> object:
    if name in kwargs:
        return kwargs[name]
    return inspect.signature(RECIPES[recipe].build).parameters[name].default


def _check_config(meta: Mapping, recipe: str, kwargs: Mapping) -> None:
    """Refuse what the keys cannot show but the checkpoint's config text does."""
    text = meta.get("cfg") or meta.get("config")
    if not isinstance(text, str):
        return
    if re.search(r"style\s*=\s*['\"]caffe['\"]", text):
        raise ValueError(
            "checkpoint: its config uses a caffe-style ResNet (stride 2 on each stage's first "
            "1x1 conv, BGR input without std); labkit's ResNet is pytorch-style (stride on the "
            "3x3 conv), so the same weights would compute a different function"
        )
    if recipe == "fcos" and "FCOSHead" in text:
        for name in ("norm_on_bbox", "centerness_on_reg"):
            found = re.search(rf"{name}\s*=\s*(True|False)", text)
            in_config = found is not None and found.group(1) == "True"  # FCOSHead's default
            if _recipe_value(recipe, kwargs, name) != in_config:
                raise ValueError(
                    f"{name}: the checkpoint's config has {name}={in_config}; pass "
                    f"{name}={in_config} to from_mmdet"
                )


def _config_flag(meta: Mapping, pattern: str) -> str | None:
    """The first group of ``pattern`` in the checkpoint's config text, if both are there."""
    text = meta.get("cfg") or meta.get("config")
    found = re.search(pattern, text) if isinstance(text, str) else None
    return None if found is None else found.group(1)


def _branches_shared(state: Mapping[str, Tensor], prefix: str) -> bool:
    """Whether every copy of the per-layer prediction branches holds the same tensors, as
    mmdetection saves them when the layers share one branch (no box refinement)."""
    copies: dict[str, list[Tensor]] = {}
    for key, value in state.items():
        if m := re.match(rf"{re.escape(prefix)}(cls|reg)_branches\.\d+\.(.+)$", key):
            copies.setdefault(f"{m.group(1)}.{m.group(2)}", []).append(value)
    return all(torch.equal(v[0], other) for v in copies.values() for other in v[1:])


# recipe -> (prefix of the transformer keys, of the prediction branches, FFN's first Linear,
# the learned queries)
_DETR_LAYOUTS = {
    "deformable_detr": ("", "bbox_head.", "ffn.layers.0.0", "query_embedding.weight"),
    "co_deformable_detr": (
        "query_head.transformer.",
        "query_head.",
        "ffns.0.layers.0.0",
        "query_head.query_embedding.weight",
    ),
}


def _detr_settings(state: Mapping[str, Tensor], meta: Mapping, kwargs: dict, recipe: str) -> dict:
    """Deformable-DETR / Co-DETR recipe settings read off the keys and shapes (and the config
    text for what no key shows: the two-stage query count, box refinement); a given setting
    must agree. ``kwargs`` is updated in place and returned."""
    mm, branches, ffn, query_key = _DETR_LAYOUTS[recipe]
    layers = {}
    for part in ("encoder", "decoder"):
        pattern = rf"{re.escape(mm)}{part}\.layers\.(\d+)\."
        layers[part] = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if len(layers["encoder"]) != len(layers["decoder"]):
        raise ValueError(
            f"checkpoint: {len(layers['encoder'])} encoder and {len(layers['decoder'])} decoder "
            f"layers; labkit's Deformable-DETR has as many of each"
        )
    level_embed = state.get(f"{mm}level_embed" + ("s" if mm else ""))
    first_ffn = state.get(f"{mm}encoder.layers.0.{ffn}.weight")
    found = {
        "num_layers": len(layers["encoder"]),
        "embed_dims": None if level_embed is None else level_embed.shape[1],
        "feedforward_channels": None if first_ffn is None else first_ffn.shape[0],
    }
    shared = _branches_shared(state, branches)
    queries = state.get(query_key)
    if recipe == "co_deformable_detr":
        if shared:
            raise ValueError(
                "checkpoint: its query head shares one prediction branch across decoder "
                "layers (no box refinement); labkit's co_deformable_detr refines boxes"
            )
        # mixed selection: one learned content query per decoder query
        found["num_queries"] = None if queries is None else queries.shape[0]
        aux = [
            name
            for name, key in (
                ("atss", "bbox_head.0.atss_cls.weight"),
                ("faster_rcnn", "rpn_head.rpn_cls.weight"),
            )
            if key in state
        ]
        found["aux"] = aux
        fc = state.get("roi_head.0.bbox_head.shared_fcs.0.weight")
        found["rcnn_fc_channels"] = None if fc is None else fc.shape[0]
    else:
        two_stage = "memory_trans_fc.weight" in state
        found["two_stage"] = two_stage
        if not two_stage and queries is not None:
            found["num_queries"] = queries.shape[0]
        elif (count := _config_flag(meta, r"num_queries\s*=\s*(\d+)")) is not None:
            found["num_queries"] = int(count)
        refine = _config_flag(meta, r"with_box_refine\s*=\s*(True|False)")
        if refine is not None:
            found["with_box_refine"] = refine == "True"
    for name, value in found.items():
        if value is None:
            continue
        given = kwargs.setdefault(name, value)
        if (sorted(given) if name == "aux" else given) != (
            sorted(value) if name == "aux" else value
        ):
            raise ValueError(f"{name}: the checkpoint has {name}={value}, got {given}")
    if recipe == "deformable_detr":
        # without the config: one branch saved for all layers means no refinement
        kwargs.setdefault("with_box_refine", not shared)
        if not kwargs["with_box_refine"] and not shared:
            raise ValueError(
                "with_box_refine: the checkpoint's per-layer cls/reg branches differ, but "
                "without box refinement mmdetection shares one branch across layers (and "
                "would keep only the last copy)"
            )
    return kwargs


# `key=value` (a config file's text, as checkpoints store it) or `'key': value` (a dict's repr)
_SET = r"['\"]?\s*[=:]\s*"


def _fpn_settings(state: Mapping[str, Tensor], meta: Mapping, recipe: str, kwargs: dict) -> dict:
    """``fpn_norm`` read off the FPN's keys: ``"gn"`` when every ConvModule of the FPN has a
    ``.gn`` after its conv (mmdetection's "gn-neck" configs), else ``None``; a given setting
    must agree. Refuses what labkit's FPN does not compute: other norms (``.bn``), a norm on
    some convs only (``no_norm_on_lateral=True``), GroupNorm with other than 32 groups in the
    config text, and a GroupNorm FPN for a recipe without ``fpn_norm`` (all but reppoints).
    ``kwargs`` is updated in place and returned."""
    convs, norms = set(), {}
    for key in state:
        if m := re.match(r"(neck\.(?:lateral|fpn)_convs\.\d+)\.(\w+)\.weight$", key):
            if m.group(2) == "conv":
                convs.add(m.group(1))
            else:
                norms[m.group(1)] = m.group(2)
    found = "gn" if norms else None
    problems = []
    other = sorted(f"{conv}.{kind}" for conv, kind in norms.items() if kind != "gn")
    if other:
        problems.append(f"norm layers other than GroupNorm ({_listed('modules', other)})")
    bare = sorted(convs - set(norms))
    if norms and bare:
        problems.append(
            f"a norm after some convs only ({_listed('convs without one', bare)}; "
            f"no_norm_on_lateral=True?)"
        )
    text = meta.get("cfg") or meta.get("config")
    if norms and isinstance(text, str):
        groups = {int(g) for g in re.findall(rf"num_groups{_SET}(\d+)", text)}
        if groups - {32}:
            problems.append(f"GroupNorm with num_groups={sorted(groups)} in its config")
    if problems:
        raise ValueError(
            f"checkpoint: its FPN has {'; '.join(problems)}; labkit's FPN has no norm or a "
            f"32-group GroupNorm after every conv"
        )
    has_setting = "fpn_norm" in inspect.signature(RECIPES[recipe].build).parameters
    if not has_setting:
        if found is not None:
            raise ValueError(
                f"checkpoint: its FPN has GroupNorm layers ({_listed('modules', sorted(norms))}; "
                f"mmdetection's 'gn-neck' configs); labkit's {recipe} recipe has a plain FPN "
                f"(fpn_norm='gn' is a reppoints setting), so it cannot compute the same function"
            )
        return kwargs
    given = kwargs.setdefault("fpn_norm", found)
    if given != found:
        raise ValueError(f"fpn_norm: the checkpoint has fpn_norm={found!r}, got {given!r}")
    return kwargs


def _reppoints_settings(state: Mapping[str, Tensor], meta: Mapping, kwargs: dict) -> dict:
    """RepPoints recipe settings read off the keys (``norm``, ``stacked_convs``, ``transform``
    when ``moment_transfer`` is there) and the config text (``transform_method``); a given
    setting must agree. Refuses heads labkit's ``RepPointsHead`` does not compute: grid points,
    ``center_init=False``, another point count, another GroupNorm group count (labkit's:
    ``min(32, channels)``). ``kwargs`` is updated in place and returned."""
    pts_out = state.get("bbox_head.reppoints_pts_init_out.weight")
    gn = state.get("bbox_head.cls_convs.0.gn.weight")
    unsupported = []
    text = meta.get("cfg") or meta.get("config")
    if gn is not None and isinstance(text, str):
        groups = {int(g) for g in re.findall(rf"num_groups{_SET}(\d+)", text)}
        if groups - {min(32, gn.shape[0])}:
            unsupported.append(
                f"GroupNorm with num_groups={sorted(groups)} in its config; labkit's towers "
                f"use {min(32, gn.shape[0])} groups for {gn.shape[0]} channels"
            )
    grid = _config_flag(meta, rf"use_grid_points{_SET}(True|False)") == "True"
    if grid or (pts_out is not None and pts_out.shape[0] == 4):
        unsupported.append(
            "use_grid_points=True (the 'reppoints-bbox-...-grid' configs: each stage regresses "
            "a box and samples a 3x3 grid in it); labkit's head predicts the 9 points directly"
        )
    elif pts_out is not None and pts_out.shape[0] != 18:
        unsupported.append(f"num_points={pts_out.shape[0] // 2}; labkit's head has 9 points")
    if _config_flag(meta, rf"center_init{_SET}(True|False)") == "False":
        unsupported.append(
            "center_init=False (the initial points start on a fixed grid around each "
            "location); labkit's start at the location"
        )
    if unsupported:
        raise ValueError(f"checkpoint: its RepPoints head has {'; '.join(unsupported)}")
    towers = {
        int(m.group(1)) for k in state if (m := re.match(r"bbox_head\.cls_convs\.(\d+)\.", k))
    }
    found: dict[str, object] = {
        "norm": None if gn is None else "gn",
        "stacked_convs": len(towers),
    }
    moment = "bbox_head.moment_transfer" in state
    method = _config_flag(meta, rf"transform_method{_SET}['\"](\w+)['\"]")
    if method is not None and (method == "moment") != moment:
        raise ValueError(
            f"checkpoint: its config has transform_method='{method}' but its state dict "
            f"{'has' if moment else 'has no'} bbox_head.moment_transfer"
        )
    if moment or method is not None:
        found["transform"] = "moment" if moment else method
    elif "transform" not in kwargs:
        raise ValueError(
            "transform: the checkpoint has no bbox_head.moment_transfer, so its "
            "transform_method is 'minmax' or 'partial_minmax', which no key shows (and it has "
            "no config text); pass transform='minmax' or transform='partial_minmax'"
        )
    elif kwargs["transform"] == "moment":
        raise ValueError(
            "transform: the checkpoint has no bbox_head.moment_transfer, so it is not 'moment'; "
            "pass transform='minmax' or transform='partial_minmax'"
        )
    for name, value in found.items():
        given = kwargs.setdefault(name, value)
        if given != value:
            raise ValueError(f"{name}: the checkpoint has {name}={value!r}, got {given!r}")
    return kwargs


def _hint(recipe: str, keys: list[str]) -> str:
    notes = [why for part, why in _UNSUPPORTED.items() if any(part in k for k in keys)]
    if recipe == "fcos" and any(re.search(r"_convs\.\d+\.0\.bias$", k) for k in keys):
        notes.append(
            "labkit's fcos recipe has conv_bias=True towers (mmdetection's "
            "'center-normbbox-centeronreg-giou' configs); a plain gn-head FCOS has none"
        )
    return f" ({'; '.join(notes)})" if notes else ""


def _listed(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST]) + (
        f", ... {len(keys) - _LIST} more" if len(keys) > _LIST else ""
    )
    return f"{len(keys)} {what.replace('keys', 'key') if len(keys) == 1 else what}: {shown}"


def _convert(
    state: Mapping[str, Tensor], own: Mapping[str, Tensor], key_map: Mapping[str, str], recipe: str
) -> dict[str, Tensor]:
    """``state`` renamed through ``key_map`` onto ``own``'s keys; every problem raises at once."""
    unmapped = [k for k in state if k not in key_map]
    renamed = {key_map[k]: k for k in state if k in key_map}
    no_target = [f"{mm} -> {lk}" for lk, mm in renamed.items() if lk not in own]
    source = {lk: mm for mm, lk in key_map.items()}
    unfilled = [f"{k} (mmdet {source[k]})" if k in source else k for k in own if k not in renamed]
    shapes = [
        f"{mm} {tuple(state[mm].shape)} -> {lk} {tuple(own[lk].shape)}"
        for lk, mm in renamed.items()
        if lk in own and state[mm].shape != own[lk].shape
    ]
    problems = []
    if unmapped:
        problems.append(_listed("keys not mapped", unmapped) + _hint(recipe, unmapped))
    if no_target:
        problems.append(_listed("keys mapped to no labkit key", no_target))
    if unfilled:
        problems.append(_listed("labkit keys left unfilled", unfilled) + _hint(recipe, unfilled))
    if shapes:
        problems.append(_listed("keys of another shape", shapes))
    if problems:
        raise ValueError(f"checkpoint: {'; '.join(problems)}")
    return {lk: state[mm].to(own[lk].dtype) for lk, mm in renamed.items()}


def _tower_convs(model: nn.Module) -> int:
    tower = getattr(getattr(model, "head", None), "cls_convs", None)
    return 0 if tower is None else sum(isinstance(m, nn.Conv2d) for m in tower.modules())


def from_mmdet(
    checkpoint: str | os.PathLike | Mapping, recipe: str, **recipe_kwargs: object
) -> nn.Module:
    """Build labkit recipe ``recipe`` and load an mmdetection 3.x checkpoint into it.

    Args:
        checkpoint: a path to an mmdetection ``.pth`` (``{"meta": ..., "state_dict": ...}``),
            such a dict, or a bare state dict ``{key: Tensor}``.
        recipe: ``"retinanet"``, ``"atss"``, ``"fcos"``, ``"paa"``, ``"foveabox"``, ``"fsaf"``,
            ``"reppoints"`` or ``"faster_rcnn"`` (ResNet + FPN without norm layers),
            ``"deformable_detr"`` (ResNet + ChannelMapper; plain, ``with_box_refine`` or
            refine + two-stage), or ``"co_deformable_detr"`` (Sense-X/Co-DETR's
            ``co_deformable_detr_r50_1x_coco``; auxiliary heads taken from the keys).
        **recipe_kwargs: passed to ``labkit.recipes.build_model``. ``num_classes`` comes from
            the classifier's shape (``retina_cls``: ``9 * C`` outputs, ``fc_cls``: ``C + 1``)
            and ``backbone`` from the ResNet's depth unless given. For FCOS, ``norm_on_bbox``
            and ``centerness_on_reg`` must match the mmdetection config (labkit's defaults are
            the "center-normbbox-centeronreg-giou" configs; ``center_sampling`` and the GIoU
            loss only matter for training). For RepPoints, ``norm`` (GroupNorm towers or
            none), ``fpn_norm`` (a GroupNorm FPN or a plain one) and ``stacked_convs`` come
            from the keys, ``transform`` from
            ``moment_transfer`` (``"moment"``) or else the config's ``transform_method``;
            without config text a ``"minmax"`` / ``"partial_minmax"`` checkpoint needs
            ``transform`` passed (their keys are the same). For Deformable-DETR, ``two_stage``,
            ``num_layers``, ``embed_dims``, ``feedforward_channels`` and (one-stage)
            ``num_queries`` come from the keys and shapes, ``with_box_refine`` from the config
            text or else from whether the per-layer branches differ; a two-stage model's
            ``num_queries`` (proposals kept, no key shows it) from the config text, else pass
            it (mmdetection's configs: 300, labkit's default); ``max_per_img`` is the
            config's ``test_cfg`` (100 by default).

    Returns:
        The labkit model in eval mode, e.g. a ``SingleStageDetector`` whose ``forward(img:
        Tensor[B, 3, H, W])`` gives mmdetection's head outputs per level (RepPoints: those of
        training mode, ``cls_out [B, C, H, W]``, init and refined points ``[B, 18, H, W]``), or a
        ``DeformableDETR`` whose ``forward(img, padding_mask)`` gives ``all_cls_scores``
        ``Tensor[num_layers, B, Q, C]`` and ``all_bbox_preds`` ``Tensor[num_layers, B, Q, 4]``.

    Raises:
        ValueError: naming the argument, when a key is not mapped, a labkit key is left
            unfilled, a shape differs, or the keys or config show a function labkit cannot
            compute (caffe-style ResNet, deformable convs in the backbone, an FPN with a norm
            other than RepPoints' 32-group GroupNorm after every conv, a different FCOS
            setting, RepPoints' grid points or ``center_init=False``).
    """
    if recipe not in MMDET_RECIPES:
        raise ValueError(f"recipe: no mmdetection conversion for {recipe!r}; have {MMDET_RECIPES}")
    state, meta = load_mmdet_state(checkpoint)
    num_classes = _infer_num_classes(state, recipe)
    given = recipe_kwargs.pop("num_classes", num_classes)
    if given != num_classes:
        raise ValueError(
            f"num_classes: the checkpoint's classifier has {num_classes} classes, got {given}"
        )
    _check_config(meta, recipe, recipe_kwargs)
    recipe_kwargs = _fpn_settings(state, meta, recipe, recipe_kwargs)
    if recipe == "reppoints":
        recipe_kwargs = _reppoints_settings(state, meta, recipe_kwargs)
    if recipe in _DETR_LAYOUTS:
        recipe_kwargs = _detr_settings(state, meta, recipe_kwargs, recipe)
    recipe_kwargs.setdefault("backbone", _infer_backbone(state))
    model = build_model(recipe, num_classes, **recipe_kwargs)
    depth = getattr(model.backbone, "depth", None)
    if depth is None:
        raise ValueError(
            f"backbone: mmdetection checkpoints hold ResNets, got {recipe_kwargs['backbone']!r}"
        )
    head = getattr(model, "head", None)
    if recipe == "reppoints":  # the tower norm and the transform decide keys
        head_keys = {"norm": head.norm, "transform": head.transform}
    else:
        head_keys = {}
    key_map = mmdet_key_map(
        recipe,
        depth=depth,
        stacked_convs=_tower_convs(model),
        num_layers=getattr(getattr(model, "decoder", None), "num_layers", 6),
        two_stage=getattr(model, "as_two_stage", False),
        aux=[head.name for head in getattr(model, "aux_heads", ())],
        fpn_norm=getattr(model.neck, "norm", None),  # an FPN's; ChannelMapper has none
        **head_keys,
    )
    model.load_state_dict(_convert(state, model.state_dict(), key_map, recipe))
    return model.eval()
