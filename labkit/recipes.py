"""Every detector labkit ships, by name: its build function, its paper's schedule, its backbone.

    from labkit.recipes import RECIPES, build_model
    model = build_model("atss", num_classes=5, backbone="tiny")
    config = RECIPES["atss"].schedule            # a labkit.engine.train.TrainConfig

A recipe function (``retinanet``, ``atss``, ... below) calls constructors only: backbone, neck
and head, wired into a ``labkit.detectors`` class, and records ``model.recipe = (name,
kwargs)`` so a checkpoint rebuilds the model with ``RECIPES[name].build(**kwargs)``.

The table is what the CLI (``labkit train --model NAME``), the benchmarks, checkpoints and
the zoo read. Schedules live here, never on model objects, so ``labkit train --model
deformable_detr`` gets Deformable-DETR's AdamW schedule; command-line flags override fields.

Backbone policy (one for every recipe): the default is the paper's ResNet-50
(``DEFAULT_BACKBONE``), built without pretrained weights; ``backbone="tiny"`` is the small CPU
configuration the notebooks, tests and zoo use (64-channel necks, shorter towers).
``backbone_weights="IMAGENET1K_V2"`` (or ``"IMAGENET1K_V1"``, ``"DEFAULT"``, or a local
torchvision state-dict file) starts a ResNet from torchvision's ImageNet weights, with its
BatchNorm statistics frozen as in mmdetection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from labkit.assigners import ATSSAssigner
from labkit.codetr.aux_heads import ATSSAuxHead, FasterRCNNAuxHead
from labkit.detectors.co_detr import AUX_HEADS, CoDETR
from labkit.detectors.deformable_detr import DeformableDETR
from labkit.detectors.single_stage import SingleStageDetector, build_single_stage
from labkit.detectors.two_stage import TwoStageDetector
from labkit.engine.train import TrainConfig
from labkit.heads.atss import ATSSHead
from labkit.heads.dense_head import make_test_cfg
from labkit.heads.faster_rcnn import faster_rcnn_head
from labkit.heads.fcos import FCOSHead
from labkit.heads.fovea import FoveaHead
from labkit.heads.fsaf import FSAFHead
from labkit.heads.paa import PAAHead
from labkit.heads.reppoints import RepPointsHead
from labkit.heads.retina import RetinaNetHead
from labkit.nn.backbones import build_backbone, detector_backbone_kwargs
from labkit.nn.fpn import FPN, ChannelMapper

__all__ = [
    "DEFAULT_BACKBONE",
    "RECIPES",
    "Recipe",
    "atss",
    "build_model",
    "co_deformable_detr",
    "deformable_detr",
    "faster_rcnn",
    "fcos",
    "foveabox",
    "fsaf",
    "paa",
    "reppoints",
    "retinanet",
    "schedule",
]

DEFAULT_BACKBONE = "resnet50"

# Widths of the CPU configuration (backbone="tiny") of Faster R-CNN.
TINY_FPN_CHANNELS = 64
TINY_FC_CHANNELS = 256

# ----------------------------------------------------------------------------- recipes


def _single_stage(
    name: str,
    kwargs: dict,
    make_head: Callable[[int, int, int], nn.Module],
    **neck: object,
) -> SingleStageDetector:
    """Backbone + FPN + ``make_head(in_channels, feat_channels, stacked_convs)`` for the dense
    recipe ``name`` called with ``kwargs``, recorded as ``model.recipe = (name, kwargs)``.
    ``neck`` overrides ``stacked_convs`` and sets the FPN's extra levels."""
    names = ("backbone", "backbone_weights", "fpn_channels", "feat_channels", "stacked_convs")
    settings = {k: kwargs[k] for k in names}
    model = build_single_stage(make_head, **{**settings, **neck})
    model.recipe = (name, kwargs)
    return model


def retinanet(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """RetinaNet: ResNet/tiny backbone (C3-C5) + FPN P3-P7 (P6 from C5) + ``RetinaNetHead``.

    Defaults are mmdetection's ``retinanet_r50_fpn_1x`` settings (anchors 32-813 px, 9 per
    location, suit the 512 px shapes images), without pretrained weights. ``backbone="tiny"``
    is the CPU quick-mode configuration: 64-channel FPN and towers, 2 convs per tower.

    Args:
        num_classes: foreground classes (5 for shapes).
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        fpn_channels, feat_channels, stacked_convs: widths/depth (``None`` = backbone default).
        test_cfg: dict of ``TestConfig`` fields to change (default: nms_pre 1000, score_thr 0.05,
            NMS IoU 0.5, 100 detections, min_bbox_size 0).

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("retinanet", {...kwargs})``.
    """
    kwargs = dict(locals())
    return _single_stage(
        "retinanet",
        kwargs,
        lambda c_in, c_feat, n: RetinaNetHead(num_classes, c_in, c_feat, n, test_cfg=test_cfg),
        add_extra_convs="on_input",
    )


def atss(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    topk: int = 9,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """ATSS: backbone (C3-C5) + FPN P3-P7 (P6 from P5, ``"on_output"``) + ``ATSSHead``.

    mmdetection's ``atss_r50_fpn_1x`` settings without pretrained weights; ``backbone="tiny"``
    is the CPU configuration (64 channels, 2 convs per tower, GroupNorm with 32 groups).

    Args:
        num_classes: foreground classes.
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        fpn_channels, feat_channels, stacked_convs: widths/depth (``None`` = backbone default).
        topk: ATSS candidates per level and GT.
        test_cfg: dict of ``TestConfig`` fields to change (default NMS IoU 0.6).

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("atss", {...kwargs})``.
    """
    kwargs = dict(locals())
    return _single_stage(
        "atss",
        kwargs,
        lambda c_in, c_feat, n: ATSSHead(
            num_classes, c_in, c_feat, n, assigner=ATSSAssigner(topk=topk), test_cfg=test_cfg
        ),
        add_extra_convs="on_output",
    )


def paa(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    topk: int = 9,
    covariance_type: str = "diag",
    score_voting: bool = True,
    reassign_backend: str = "torch",
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """PAA: backbone (C3-C5) + FPN P3-P7 (``"on_output"``) + ``PAAHead``.

    mmdetection's ``paa_r50_fpn_1x`` settings without pretrained weights; ``backbone="tiny"``
    is the CPU configuration (64 channels, 2 convs per tower).

    Args:
        num_classes: foreground classes.
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        fpn_channels, feat_channels, stacked_convs: widths/depth (``None`` = backbone default).
        topk, covariance_type, score_voting, reassign_backend: see ``PAAHead``.
        test_cfg: dict of ``TestConfig`` fields to change (default NMS IoU 0.6).

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("paa", {...kwargs})``.
    """
    kwargs = dict(locals())
    return _single_stage(
        "paa",
        kwargs,
        lambda c_in, c_feat, n: PAAHead(
            num_classes,
            c_in,
            c_feat,
            n,
            topk=topk,
            covariance_type=covariance_type,
            score_voting=score_voting,
            reassign_backend=reassign_backend,
            test_cfg=test_cfg,
        ),
        add_extra_convs="on_output",
    )


def fcos(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    center_sampling: bool = True,
    centerness: bool = True,
    norm_on_bbox: bool = True,
    centerness_on_reg: bool = True,
    bbox_loss_weight: str = "centerness",
    point_offset: float = 0.5,
    learnable_scale: bool = True,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """FCOS detector: backbone (C3-C5) + FPN P3-P7 (P6 from P5, ReLU before P7) + ``FCOSHead``.

    The defaults are mmdetection's "tricks" configuration
    (``fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou``): center sampling,
    norm_on_bbox, centerness on the regression tower, GIoU loss, GroupNorm towers with conv
    bias, test NMS IoU 0.6 (nms_pre 1000, score_thr 0.05, 100 per image, min_bbox_size 0).
    ``backbone="tiny"`` is the CPU configuration (64 channels, 2 tower convs).

    Args:
        num_classes: foreground classes.
        backbone: ``"tiny" | "resnet18" | "resnet34" | "resnet50" | "resnet101"``.
        center_sampling, centerness, norm_on_bbox, centerness_on_reg: see ``FCOSHead``.
        bbox_loss_weight, point_offset, learnable_scale: the three places where mmdetection's
            FCOS (the defaults) and torchvision's (``"uniform"``, ``0.0``, ``False``) differ.
        fpn_channels, feat_channels, stacked_convs: widths/depth (``None`` = backbone default).
        test_cfg: dict of ``TestConfig`` fields to change.

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("fcos", {...kwargs})``.
    """
    kwargs = dict(locals())
    cfg = make_test_cfg(test_cfg, iou_threshold=0.6)
    return _single_stage(
        "fcos",
        kwargs,
        lambda c_in, c_feat, n: FCOSHead(
            num_classes,
            c_in,
            feat_channels=c_feat,
            stacked_convs=n,
            center_sampling=center_sampling,
            norm_on_bbox=norm_on_bbox,
            centerness_on_reg=centerness_on_reg,
            centerness=centerness,
            bbox_loss_weight=bbox_loss_weight,
            point_offset=point_offset,
            learnable_scale=learnable_scale,
            conv_bias=True,
            test_cfg=cfg,
        ),
        add_extra_convs="on_output",
        relu_before_extra_convs=True,
    )


def foveabox(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    sigma: float = 0.4,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """FoveaBox detector: backbone (C3-C5) + FPN P3-P7 (P6 from C5) + ``FoveaHead``.

    mmdetection's ``fovea_r50_fpn_4x4_1x`` settings: strides 8-128, base edges 16-256,
    scale ranges ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048)), sigma 0.4,
    focal (1.5, 0.4) + smooth L1 (0.11); test nms_pre 1000, score_thr 0.05, NMS 0.5, 100.

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("foveabox", {...kwargs})``.
    """
    kwargs = dict(locals())
    cfg = make_test_cfg(test_cfg, min_bbox_size=-1)
    return _single_stage(
        "foveabox",
        kwargs,
        lambda c_in, c_feat, n: FoveaHead(
            num_classes, c_in, feat_channels=c_feat, stacked_convs=n, sigma=sigma, test_cfg=cfg
        ),
        add_extra_convs="on_input",
    )


def fsaf(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """FSAF detector (anchor-free branch only, as mmdetection's ``fsaf_r50_fpn_1x``):
    backbone (C3-C5) + FPN P3-P7 (P6 from C5) + ``FSAFHead``.

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("fsaf", {...kwargs})``.
    """
    kwargs = dict(locals())
    cfg = make_test_cfg(test_cfg, iou_threshold=0.5)
    return _single_stage(
        "fsaf",
        kwargs,
        lambda c_in, c_feat, n: FSAFHead(num_classes, c_in, c_feat, n, test_cfg=cfg),
        add_extra_convs="on_input",
    )


def reppoints(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    transform: str = "moment",
    norm: str | None = None,
    fpn_norm: str | None = None,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    test_cfg: dict | None = None,
) -> SingleStageDetector:
    """RepPoints detector (mmdetection's ``reppoints-moment_r50_fpn_1x``): backbone (C3-C5) +
    FPN P3-P7 (P6 from C5) + ``RepPointsHead`` (3 tower convs for ResNets, 2 for "tiny").

    Args:
        transform: points -> pseudo box, ``"moment"``, ``"minmax"`` or ``"partial_minmax"``.
        norm: ``"gn"``: GroupNorm in the head towers (the "gn-head" configs), else ``None``.
        fpn_norm: ``"gn"``: GroupNorm (32 groups) after every FPN conv, whose bias goes (the
            "gn-neck" configs, e.g. ``reppoints-moment_r50_fpn-gn_head-gn_1x`` with
            ``norm="gn"``); ``None`` (default): a plain FPN.
        fpn_channels, feat_channels, stacked_convs, test_cfg: as :func:`retinanet`.

    Returns:
        A ``SingleStageDetector`` with ``model.recipe == ("reppoints", {...kwargs})``.
    """
    kwargs = dict(locals())
    cfg = make_test_cfg(test_cfg, iou_threshold=0.5)
    if stacked_convs is None and backbone != "tiny":
        stacked_convs = 3
    return _single_stage(
        "reppoints",
        kwargs,
        lambda c_in, c_feat, n: RepPointsHead(
            num_classes,
            c_in,
            feat_channels=c_feat,
            stacked_convs=n,
            point_feat_channels=c_feat,
            transform=transform,
            norm=norm,
            test_cfg=cfg,
        ),
        stacked_convs=stacked_convs,  # ResNets: 3 tower convs
        add_extra_convs="on_input",
        fpn_norm=fpn_norm,
    )


def faster_rcnn(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    *,
    fpn_channels: int | None = None,
    fc_out_channels: int | None = None,
    rpn_test_cfg: dict | None = None,
    rcnn_test_cfg: dict | None = None,
) -> TwoStageDetector:
    """Faster R-CNN with FPN (mmdetection's ``faster-rcnn_r50_fpn_1x``), no pretrained weights.

    Backbone C2-C5 -> FPN P2-P6 (P6 by stride-2 max-pooling) -> ``faster_rcnn_head``.
    The default ResNet-50 is mmdetection's configuration; ``backbone="tiny"`` is the CPU configuration: 64-channel FPN
    and 256-wide FCs.

    Args:
        num_classes: foreground classes (5 for shapes).
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        fpn_channels: FPN width (``None``: 256, tiny 64). fc_out_channels: FC width
            (``None``: 1024, tiny 256).
        rpn_test_cfg: dict of ``TestConfig`` fields for test-time proposals (nms_pre 1000,
            NMS 0.7, 1000 per image).
        rcnn_test_cfg: dict for detections (score_thr 0.05, NMS 0.5, 100 per image).

    Returns:
        A ``TwoStageDetector`` with ``model.recipe == ("faster_rcnn", {...kwargs})``.
    """
    kwargs = dict(locals())
    tiny = backbone == "tiny"
    if fpn_channels is None:
        fpn_channels = TINY_FPN_CHANNELS if tiny else 256
    if fc_out_channels is None:
        fc_out_channels = TINY_FC_CHANNELS if tiny else 1024
    body = build_backbone(
        backbone, out_indices=(0, 1, 2, 3), **detector_backbone_kwargs(backbone, backbone_weights)
    )
    neck = FPN(body.out_channels, fpn_channels, num_outs=5, add_extra_convs=False)
    head = faster_rcnn_head(
        num_classes,
        fpn_channels,
        fc_out_channels=fc_out_channels,
        rpn_test_cfg=rpn_test_cfg,
        rcnn_test_cfg=rcnn_test_cfg,
    )
    model = TwoStageDetector(body, neck, head)
    model.recipe = ("faster_rcnn", kwargs)
    return model


def _detr_parts(
    kwargs: dict, full_ffn: int, frozen_stages: int = -1
) -> tuple[nn.Module, nn.Module, dict]:
    """ResNet C3-C5 -> ChannelMapper (1x1 conv + GN 32 per level, one extra stride-2 level) and
    the transformer settings Deformable-DETR and Co-DETR share: 256 dims, 6+6 layers, FFN
    ``full_ffn``; "tiny": 64 dims, 2+2 layers, FFN 128. ``kwargs``: the recipe's arguments."""
    tiny = kwargs["backbone"] == "tiny"
    embed_dims = kwargs["embed_dims"] or (64 if tiny else 256)
    num_layers = kwargs["num_layers"] or (2 if tiny else 6)
    net = build_backbone(
        kwargs["backbone"],
        out_indices=(1, 2, 3),
        frozen_stages=frozen_stages,
        **detector_backbone_kwargs(kwargs["backbone"], kwargs["backbone_weights"]),
    )
    neck = ChannelMapper(
        net.out_channels, embed_dims, kernel_size=1, num_outs=4, norm="gn", num_groups=32
    )
    settings = {
        "num_queries": kwargs["num_queries"],
        "embed_dims": embed_dims,
        "num_heads": kwargs["num_heads"],
        "num_points": kwargs["num_points"],
        "num_feature_levels": 4,
        "num_encoder_layers": num_layers,
        "num_decoder_layers": num_layers,
        "feedforward_channels": kwargs["feedforward_channels"] or (128 if tiny else full_ffn),
        "dropout": kwargs["dropout"],
        "max_per_img": kwargs["max_per_img"],
    }
    return net, neck, settings


def deformable_detr(
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    num_queries: int = 300,
    two_stage: bool = True,
    with_box_refine: bool = True,
    mixed_selection: bool = False,
    embed_dims: int | None = None,
    num_layers: int | None = None,
    num_points: int = 4,
    num_heads: int = 8,
    feedforward_channels: int | None = None,
    dropout: float = 0.1,
    max_per_img: int = 100,
) -> DeformableDETR:
    """Deformable-DETR (two-stage + box refinement by default, i.e. "Deformable DETR++").

    ResNet C3-C5 (no pretrained weights, BatchNorm trained) -> ChannelMapper (1x1 conv + GN
    32 per level, one extra stride-2 3x3 conv level) -> 6+6 layers, 256 dims, FFN 1024.
    ``backbone="tiny"`` is the CPU quick-mode model: 64 dims, 2+2 layers, FFN 128.

    Args:
        num_classes: foreground classes.
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        num_queries, two_stage, with_box_refine, mixed_selection, num_points, num_heads,
        dropout, max_per_img: see :class:`DeformableDETR`.
        embed_dims, num_layers (encoder and decoder each), feedforward_channels: ``None`` =
            the backbone's default above.

    Returns:
        A :class:`DeformableDETR` with ``model.recipe == ("deformable_detr", {...kwargs})``.
    """
    kwargs = dict(locals())
    net, neck, settings = _detr_parts(kwargs, full_ffn=1024)
    model = DeformableDETR(
        net,
        neck,
        num_classes,
        **settings,
        with_box_refine=with_box_refine,
        as_two_stage=two_stage,
        mixed_selection=mixed_selection,
    )
    model.recipe = ("deformable_detr", kwargs)
    return model


def co_deformable_detr(
    num_classes: int,
    aux: Sequence[str] = ("atss", "faster_rcnn"),
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | None = None,
    num_queries: int = 300,
    lambda_1: float = 1.0,
    lambda_2: float = 2.0,
    frozen_stages: int = -1,
    embed_dims: int | None = None,
    num_layers: int | None = None,
    feedforward_channels: int | None = None,
    dropout: float = 0.0,
    num_points: int = 4,
    num_heads: int = 8,
    max_pos_coords: int = 300,
    max_per_img: int = 100,
    rcnn_fc_channels: int | None = None,
) -> CoDETR:
    """Co-Deformable-DETR as Co-DETR's ``co_deformable_detr_r50_1x_coco`` (no pretrained weights).

    ResNet C3-C5 -> ChannelMapper (4 levels, GN) -> 6+6 layers, 256 dims, FFN 2048, no
    dropout; two-stage, mixed selection, box refinement, look-forward-twice; 300 queries.
    Auxiliary heads on the encoder memory, losses weighted ``lambda_2 x num_layers``.
    ``backbone="tiny"``: the CPU quick-mode model (64 dims, 2+2 layers, FFN 128, RoI FC 128).

    Args:
        num_classes: foreground classes.
        aux: any of ``"atss"``, ``"faster_rcnn"`` (``()`` trains the query head alone); the
            query groups always follow Co-DETR's order (Faster R-CNN, then ATSS).
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"``.
        num_queries: decoder queries (memory knob, with ``frozen_stages`` and the image size).
        lambda_1, lambda_2: positive-query and auxiliary-head loss weights.
        frozen_stages: backbone stages without gradient (-1: none; Co-DETR with ImageNet
            weights: 1).
        embed_dims, num_layers, feedforward_channels: ``None`` = the backbone's default above.
        dropout, num_points, num_heads, max_pos_coords, max_per_img: see :class:`CoDETR`.
        rcnn_fc_channels: the RoI head's FC width (``None``: 1024, tiny 128).

    Returns:
        A :class:`CoDETR` with ``model.recipe == ("co_deformable_detr", {...kwargs})``.
    """
    kwargs = dict(locals())
    kwargs["aux"] = list(aux)
    unknown = set(aux) - set(AUX_HEADS)
    if unknown or len(set(aux)) != len(tuple(aux)):
        raise ValueError(f"aux: expected distinct names from {AUX_HEADS}, got {tuple(aux)}")
    net, neck, settings = _detr_parts(kwargs, full_ffn=2048, frozen_stages=frozen_stages)
    embed_dims, num_layers = settings["embed_dims"], settings["num_encoder_layers"]
    rcnn_fc_channels = rcnn_fc_channels or (128 if backbone == "tiny" else 1024)
    loss_scale = num_layers * lambda_2
    heads = []
    for name in AUX_HEADS:
        if name in aux and name == "faster_rcnn":
            heads.append(FasterRCNNAuxHead(num_classes, embed_dims, loss_scale, rcnn_fc_channels))
        elif name in aux:
            heads.append(ATSSAuxHead(num_classes, embed_dims, loss_scale))
    model = CoDETR(
        net,
        neck,
        num_classes,
        heads,
        lambda_1=lambda_1,
        max_pos_coords=max_pos_coords,
        **settings,
        with_box_refine=True,
        as_two_stage=True,
        mixed_selection=True,
    )
    model.recipe = ("co_deformable_detr", kwargs)
    return model


# ----------------------------------------------------------------------------- schedules

# mmdetection's 1x schedule for dense detectors and Faster R-CNN: SGD 0.01 (batch 16),
# momentum 0.9, weight decay 1e-4, linear warm-up over 500 steps from 0.001, steps at 8 and 11.
DENSE_1X = TrainConfig()

# Deformable-DETR (mmdetection's deformable-detr_r50_16xb2-50e): AdamW 2e-4, lr x0.1 for the
# backbone and the deformable sampling (offsets, reference points), clip 0.1, no warm-up,
# 50 epochs with the step at 40.
DETR_LR_MULT = {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
DETR_50E = TrainConfig(
    optimizer="adamw",
    lr=2e-4,
    weight_decay=1e-4,
    lr_mult=DETR_LR_MULT,
    max_norm=0.1,
    warmup_iters=0,
    epochs=50,
    milestones=(40,),
)


@dataclass(frozen=True)
class Recipe:
    """One row of :data:`RECIPES`.

    Attributes:
        name: the key (``--model NAME``).
        build: ``build(num_classes, backbone=..., **kwargs) -> Detector``.
        schedule: the paper's optimisation as a ``TrainConfig`` (flags override fields).
        paper: the paper and mmdetection config the defaults follow.
    """

    name: str
    build: Callable[..., nn.Module]
    schedule: TrainConfig
    paper: str

    @property
    def backbone(self) -> str:
        """The default backbone (read from ``build``'s signature: one source of truth)."""
        return inspect.signature(self.build).parameters["backbone"].default


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("retinanet", retinanet, DENSE_1X, "Lin et al. 2017; retinanet_r50_fpn_1x"),
        Recipe("atss", atss, DENSE_1X, "Zhang et al. 2020; atss_r50_fpn_1x"),
        Recipe("paa", paa, DENSE_1X, "Kim & Lee 2020; paa_r50_fpn_1x"),
        # FCOS and FSAF clip gradients in mmdetection's configs (35 and 10).
        Recipe("fcos", fcos, replace(DENSE_1X, max_norm=35.0), "Tian et al. 2019; fcos tricks"),
        Recipe("foveabox", foveabox, DENSE_1X, "Kong et al. 2020; fovea_r50_fpn_4x4_1x"),
        Recipe("fsaf", fsaf, replace(DENSE_1X, max_norm=10.0), "Zhu et al. 2019; fsaf_r50_fpn_1x"),
        Recipe("reppoints", reppoints, DENSE_1X, "Yang et al. 2019; reppoints-moment_r50_fpn_1x"),
        Recipe("faster_rcnn", faster_rcnn, DENSE_1X, "Ren et al. 2015; faster-rcnn_r50_fpn_1x"),
        Recipe("deformable_detr", deformable_detr, DETR_50E, "Zhu et al. 2021; deformable-detr"),
        # Co-DETR's 1x: the DETR optimisation over 12 epochs, step at 11.
        Recipe(
            "co_deformable_detr",
            co_deformable_detr,
            replace(DETR_50E, epochs=12, milestones=(11,)),
            "Zong et al. 2023; co_deformable_detr_r50_1x_coco",
        ),
    )
}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the recipe called ``name`` (a key of :data:`RECIPES`) for ``num_classes`` classes."""
    if name not in RECIPES:
        raise ValueError(f"name: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name].build(num_classes, **kwargs)


def schedule(name: str, **overrides) -> TrainConfig:
    """A copy of recipe ``name``'s paper schedule with some fields changed, e.g.
    ``schedule("deformable_detr", epochs=2)`` (AdamW 2e-4, clip 0.1, lr_mult, 2 epochs)."""
    if name not in RECIPES:
        raise ValueError(f"name: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    base = RECIPES[name].schedule
    return replace(base, **{"lr_mult": dict(base.lr_mult), **overrides})
