"""Explicit mmdetection 3.x -> labkit state-dict key maps, one per architecture (no guessing).

Each map is written out from the two codebases' module layouts:

- ResNet: mmdetection's ``ResNet`` and torchvision's (which labkit wraps) use the same names
  (``conv1``, ``bn1``, ``layerK.B.convJ``, ``downsample.0/1``); only pytorch-style ResNets
  (stride on the 3x3 conv) compute the same function, see ``labkit.convert.mmdet``.
- FPN: mmcv's ``ConvModule`` adds a ``.conv`` level (``lateral_convs.0.conv.weight``), labkit
  uses plain convs (``lateral_convs.0.weight``); indices agree (both start at
  ``start_level``; the extra P6/P7 convs follow the used levels in ``fpn_convs``). A
  GroupNorm FPN (``fpn_norm="gn"``: ``lateral_convs.0.conv.weight``, ``lateral_convs.0.gn``,
  no conv bias) maps onto labkit's ``Sequential(conv, GN)`` (``lateral_convs.0.0``,
  ``lateral_convs.0.1``).
- heads: ``bbox_head.`` becomes ``head.``; ConvModule towers become labkit's
  ``Sequential``/``ModuleList`` layouts (see each ``_*_head`` function). RepPoints' two
  mmcv ``DeformConv2d`` (``reppoints_cls_conv``, ``reppoints_pts_refine_conv``) hold one
  bias-free ``weight [out, in, 3, 3]``, as labkit's torchvision ``DeformConv2d(bias=False)``.
- Deformable-DETR: the ChannelMapper's ``ConvModule`` (``convs.0.conv``, ``convs.0.gn``)
  becomes ``Sequential(conv, GN)`` (``convs.0.0``, ``convs.0.1``); mmcv's ``FFN``
  (``layers.0.0`` Linear in ``Sequential(Linear, ReLU, Dropout)``, ``layers.1`` Linear)
  becomes labkit's flat ``Sequential`` (``layers.0``, ``layers.3``); mmcv's
  ``MultiheadAttention`` wraps ``nn.MultiheadAttention`` as ``.attn``; the deformable
  attention and the norms keep their names; ``bbox_head.cls_branches`` / ``reg_branches``
  move to the detector (``cls_branches``, ``reg_branches``).
- Co-Deformable-DETR (Sense-X/Co-DETR, mmdetection 2.x / mmcv 1.x): the transformer sits in
  ``query_head.transformer`` with mmcv 1.x layers (``attentions.0/1``, ``ffns.0``);
  ``enc_output`` / ``pos_trans`` are labkit's ``memory_trans_fc`` / ``pos_trans_fc``; the
  auxiliary ``rpn_head`` + ``roi_head.0`` (Faster R-CNN) and ``bbox_head.0`` (ATSS) become
  ``aux_heads.K.head`` and their positive-query layers (``aux_pos_trans``, ``pos_feats_trans``,
  ``head_pos_embed``) ``aux_queries``, in the same head order.
"""

from __future__ import annotations

from collections.abc import Sequence

from labkit.detectors.co_detr import AUX_HEADS
from labkit.heads.reppoints import TRANSFORMS as _TRANSFORMS

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
    "reppoints": (3, 2),
    "faster_rcnn": (4, 0),
}
# the Deformable-DETR family (ChannelMapper neck, transformer, per-layer prediction branches)
_DETRS = ("deformable_detr", "co_deformable_detr")
MMDET_RECIPES = (*_NECKS, *_DETRS)


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


def _fpn(num_ins: int, num_extra: int, norm: str | None = None) -> dict[str, str]:
    # labkit: a plain Conv2d per ConvModule, or Sequential(conv without bias, GN) with a norm
    pairs = {}
    for kind, count in (("lateral_convs", num_ins), ("fpn_convs", num_ins + num_extra)):
        for i in range(count):
            mm, lk = f"neck.{kind}.{i}", f"neck.{kind}.{i}"
            if norm is None:
                pairs |= _conv(f"{mm}.conv", lk)
            else:
                pairs |= _conv(f"{mm}.conv", f"{lk}.0", bias=False) | _conv(f"{mm}.gn", f"{lk}.1")
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


def _reppoints_head(stacked_convs: int, norm: str | None, transform: str) -> dict[str, str]:
    # labkit: ModuleList of Sequential(conv, [GN,] ReLU) -> conv i is "i.0", its GN "i.1"; a
    # tower conv has a bias only without GN (ConvModule's bias="auto"), in both codebases
    pairs = {}
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            conv, lk = f"bbox_head.{tower}.{i}", f"head.{tower}.{i}"
            pairs |= _conv(f"{conv}.conv", f"{lk}.0", bias=norm is None)
            if norm == "gn":
                pairs |= _conv(f"{conv}.gn", f"{lk}.1")
    for name in ("reppoints_cls_conv", "reppoints_pts_refine_conv"):  # deformable, no bias
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}", bias=False)
    for name in (
        "reppoints_cls_out",
        "reppoints_pts_init_conv",
        "reppoints_pts_init_out",
        "reppoints_pts_refine_out",
    ):
        pairs |= _conv(f"bbox_head.{name}", f"head.{name}")
    if transform == "moment":  # the learned log-scale of the moment transform, a Parameter[2]
        pairs["bbox_head.moment_transfer"] = "head.moment_transfer"
    return pairs


def _faster_rcnn_head() -> dict[str, str]:
    rpn, roi = "head.rpn_head", "head.roi_head.bbox_head"
    pairs = _conv("rpn_head.rpn_conv", f"{rpn}.rpn_conv.0")  # labkit: Sequential(conv, ReLU)
    for name in ("rpn_cls", "rpn_reg"):
        pairs |= _conv(f"rpn_head.{name}", f"{rpn}.{name}")
    for name in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg"):
        pairs |= _conv(f"roi_head.bbox_head.{name}", f"{roi}.{name}")
    return pairs


def _channel_mapper(num_ins: int, num_extra: int) -> dict[str, str]:
    # labkit: Sequential(conv, GN); the convs have no bias (ConvModule's bias="auto" with GN)
    pairs = {}
    for kind, count in (("convs", num_ins), ("extra_convs", num_extra)):
        for i in range(count):
            pairs[f"neck.{kind}.{i}.conv.weight"] = f"neck.{kind}.{i}.0.weight"
            pairs |= _conv(f"neck.{kind}.{i}.gn", f"neck.{kind}.{i}.1")
    return pairs


def _ffn(mm: str, lk: str) -> dict[str, str]:
    # mmcv: layers = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout)
    # labkit: layers = Sequential(Linear, ReLU, Dropout, Linear, Dropout)
    return _conv(f"{mm}.layers.0.0", f"{lk}.layers.0") | _conv(f"{mm}.layers.1", f"{lk}.layers.3")


def _deform_attn(mm: str, lk: str) -> dict[str, str]:
    pairs = {}
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        pairs |= _conv(f"{mm}.{name}", f"{lk}.{name}")
    return pairs


def _norms(mm: str, lk: str, count: int) -> dict[str, str]:
    pairs = {}
    for i in range(count):
        pairs |= _conv(f"{mm}.norms.{i}", f"{lk}.norms.{i}")
    return pairs


def _self_attn(mm: str, lk: str) -> dict[str, str]:
    # mmcv's MultiheadAttention holds an nn.MultiheadAttention as .attn
    params = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    return {f"{mm}.attn.{p}": f"{lk}.{p}" for p in params}


def _deformable_transformer(num_layers: int) -> dict[str, str]:
    # mmdetection 3.x layers: self_attn / cross_attn / ffn / norms, as labkit's
    pairs = {"level_embed": "level_embed"}
    for i in range(num_layers):
        enc = f"encoder.layers.{i}"
        pairs |= _deform_attn(f"{enc}.self_attn", f"{enc}.self_attn")
        pairs |= _ffn(f"{enc}.ffn", f"{enc}.ffn") | _norms(enc, enc, 2)
        dec = f"decoder.layers.{i}"
        pairs |= _self_attn(f"{dec}.self_attn", f"{dec}.self_attn")
        pairs |= _deform_attn(f"{dec}.cross_attn", f"{dec}.cross_attn")
        pairs |= _ffn(f"{dec}.ffn", f"{dec}.ffn") | _norms(dec, dec, 3)
    return pairs


def _mmcv1_transformer(mm: str, num_layers: int) -> dict[str, str]:
    # mmcv 1.x BaseTransformerLayer (Co-DETR, mmdetection 2.x): attentions.0 (.1), ffns.0,
    # norms, in operation order; level_embeds
    pairs = {f"{mm}level_embeds": "level_embed"}
    for i in range(num_layers):
        enc, lk = f"{mm}encoder.layers.{i}", f"encoder.layers.{i}"
        pairs |= _deform_attn(f"{enc}.attentions.0", f"{lk}.self_attn")
        pairs |= _ffn(f"{enc}.ffns.0", f"{lk}.ffn") | _norms(enc, lk, 2)
        dec, lk = f"{mm}decoder.layers.{i}", f"decoder.layers.{i}"
        pairs |= _self_attn(f"{dec}.attentions.0", f"{lk}.self_attn")
        pairs |= _deform_attn(f"{dec}.attentions.1", f"{lk}.cross_attn")
        pairs |= _ffn(f"{dec}.ffns.0", f"{lk}.ffn") | _norms(dec, lk, 3)
    return pairs


def _detr_branches(mm: str, num_pred: int) -> dict[str, str]:
    # one (cls, reg) pair per decoder layer, plus the encoder proposal pair when two-stage;
    # labkit's reg branch: Sequential(Linear, ReLU, Linear, ReLU, Linear) as mmdetection's
    pairs = {}
    for i in range(num_pred):
        pairs |= _conv(f"{mm}cls_branches.{i}", f"cls_branches.{i}")
        for j in (0, 2, 4):
            pairs |= _conv(f"{mm}reg_branches.{i}.{j}", f"reg_branches.{i}.{j}")
    return pairs


def _query_selection(two_stage: bool) -> dict[str, str]:
    if not two_stage:  # learned queries and their reference points
        return {"query_embedding.weight": "query_embedding.weight"} | _conv(
            "reference_points_fc", "reference_points_fc"
        )
    pairs = {}
    for name in ("memory_trans_fc", "memory_trans_norm", "pos_trans_fc", "pos_trans_norm"):
        pairs |= _conv(name, name)
    return pairs


def _deformable_detr(num_layers: int, two_stage: bool) -> dict[str, str]:
    pairs = _channel_mapper(3, 1) | _deformable_transformer(num_layers)
    pairs |= _detr_branches("bbox_head.", num_layers + 1 if two_stage else num_layers)
    return pairs | _query_selection(two_stage)


def _codetr_aux(aux: tuple[str, ...]) -> dict[str, str]:
    """Co-DETR's auxiliary heads (``rpn_head``, ``roi_head.0``; ``bbox_head.0`` = CoATSSHead)
    and the positive-query embeddings, one per head in labkit's order (Faster R-CNN first,
    as Co-DETR's ``roi_head`` before ``bbox_head``)."""
    mm = "query_head.transformer."
    pairs = {f"{mm}head_pos_embed.weight": "aux_queries.head_pos_embed"}  # nn.Embedding(k, 1)
    pairs |= _conv("query_head.downsample.0", "downsample.0")
    pairs |= _conv("query_head.downsample.1", "downsample.1")
    for k, name in enumerate(aux):
        for mm_name, lk_name in (
            ("aux_pos_trans", "pos_trans"),
            ("aux_pos_trans_norm", "pos_trans_norm"),
            ("pos_feats_trans", "feat_trans"),
            ("pos_feats_norm", "feat_norm"),
        ):
            pairs |= _conv(f"{mm}{mm_name}.{k}", f"aux_queries.{lk_name}.{k}")
        head = f"aux_heads.{k}.head"
        if name == "faster_rcnn":  # labkit's RPN conv: Sequential(conv, ReLU)
            pairs |= _conv("rpn_head.rpn_conv", f"{head}.rpn_head.rpn_conv.0")
            for conv in ("rpn_cls", "rpn_reg"):
                pairs |= _conv(f"rpn_head.{conv}", f"{head}.rpn_head.{conv}")
            for fc in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg"):
                pairs |= _conv(f"roi_head.0.bbox_head.{fc}", f"{head}.roi_head.bbox_head.{fc}")
        else:  # ATSS with one conv per tower (Co-DETR's config), mmdetection's layout
            for mm_key, lk_key in _atss_head(1).items():
                mm_key = "bbox_head.0." + mm_key.removeprefix("bbox_head.")
                pairs[mm_key] = f"{head}.{lk_key.removeprefix('head.')}"
    return pairs


def _co_deformable_detr(num_layers: int, aux: tuple[str, ...]) -> dict[str, str]:
    mm = "query_head.transformer."
    pairs = _channel_mapper(3, 1) | _mmcv1_transformer(mm, num_layers)
    pairs |= _detr_branches("query_head.", num_layers + 1)  # two-stage, box refinement
    pairs["query_head.query_embedding.weight"] = "query_embedding.weight"  # mixed selection
    for mm_name, lk_name in (
        ("enc_output", "memory_trans_fc"),
        ("enc_output_norm", "memory_trans_norm"),
        ("pos_trans", "pos_trans_fc"),
        ("pos_trans_norm", "pos_trans_norm"),
    ):
        pairs |= _conv(f"{mm}{mm_name}", lk_name)
    return pairs | (_codetr_aux(aux) if aux else {})


def mmdet_key_map(
    recipe: str,
    *,
    depth: int = 50,
    stacked_convs: int = 4,
    num_layers: int = 6,
    two_stage: bool = True,
    aux: Sequence[str] = AUX_HEADS,
    norm: str | None = None,
    transform: str = "moment",
    fpn_norm: str | None = None,
) -> dict[str, str]:
    """The key map of labkit recipe ``recipe`` with a ResNet-``depth`` backbone.

    Args:
        recipe: one of :data:`MMDET_RECIPES` (``"retinanet"``, ``"atss"``, ``"fcos"``,
            ``"paa"``, ``"foveabox"``, ``"fsaf"``, ``"reppoints"``, ``"faster_rcnn"``,
            ``"deformable_detr"``,
            ``"co_deformable_detr"``: Sense-X/Co-DETR's checkpoints, mmdetection 2.x names).
        depth: ResNet depth, 18, 34, 50 or 101.
        stacked_convs: convs per head tower (dense recipes; mmdetection's configs use 4).
        num_layers: encoder and decoder layers each (DETRs; mmdetection's configs use 6).
        two_stage: (``deformable_detr``) encoder proposals instead of learned queries; box
            refinement changes no key name (shared branches are listed once per layer too).
        aux: (``co_deformable_detr``) the auxiliary heads, some of ``"faster_rcnn"``,
            ``"atss"``; the map follows labkit's head order (Faster R-CNN first, Co-DETR's).
        norm: (``reppoints``) ``"gn"`` when the head towers have GroupNorm, else ``None``.
        transform: (``reppoints``) ``"moment"`` (has ``moment_transfer``), ``"minmax"`` or
            ``"partial_minmax"``.
        fpn_norm: (recipes with an FPN) ``"gn"`` when every FPN conv is followed by a
            GroupNorm (mmdetection's "gn-neck" configs), else ``None``.

    Returns:
        ``{mmdet_key: labkit_key}``, one entry per mmdetection state-dict key (BatchNorm
        buffers included), e.g. ``"neck.fpn_convs.3.conv.weight" -> "neck.fpn_convs.3.weight"``.
    """
    if recipe not in MMDET_RECIPES:
        raise ValueError(f"recipe: no mmdetection key map for {recipe!r}; have {MMDET_RECIPES}")
    if not isinstance(stacked_convs, int) or stacked_convs < 0:
        raise ValueError(f"stacked_convs: expected an int >= 0, got {stacked_convs!r}")
    if norm not in (None, "gn"):
        raise ValueError(f"norm: expected None or 'gn', got {norm!r}")
    if fpn_norm not in (None, "gn"):
        raise ValueError(f"fpn_norm: expected None or 'gn', got {fpn_norm!r}")
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform: expected one of {_TRANSFORMS}, got {transform!r}")
    if recipe in _DETRS:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        if recipe == "deformable_detr":
            return _resnet(depth) | _deformable_detr(num_layers, two_stage)
        unknown = set(aux) - set(AUX_HEADS)
        if unknown:
            raise ValueError(f"aux: expected names from {AUX_HEADS}, got {tuple(aux)}")
        ordered = tuple(name for name in AUX_HEADS if name in aux)
        return _resnet(depth) | _co_deformable_detr(num_layers, ordered)
    pairs = _resnet(depth) | _fpn(*_NECKS[recipe], fpn_norm)
    if recipe in ("retinanet", "fsaf"):  # FSAF: RetinaNet's layers, one prior per location
        return pairs | _retinanet_head(stacked_convs)
    if recipe in ("atss", "paa"):  # PAA: ATSS's layers, the IoU branch is atss_centerness
        return pairs | _atss_head(stacked_convs)
    if recipe == "fcos":
        return pairs | _fcos_head(stacked_convs)
    if recipe == "foveabox":
        return pairs | _fovea_head(stacked_convs)
    if recipe == "reppoints":
        return pairs | _reppoints_head(stacked_convs, norm, transform)
    return pairs | _faster_rcnn_head()
