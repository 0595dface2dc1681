"""One-stage detector = backbone + neck + dense head, and the builder every dense recipe shares.

Follow a batch: :meth:`SingleStageDetector.loss` -> ``Detector.inputs`` (validate, move) ->
``extract_feat`` (backbone, FPN: ``Tensor[B, C, H_l, W_l]`` per level, finest first) ->
``head.loss_and_targets(feats, batch)`` (priors, assignment, losses). ``predict`` runs the
head's decode -> top-k -> NMS instead.

Recipes (``labkit.recipes.retinanet``, ``atss``, ``paa``, ``fcos`` ...) call
``build_single_stage(head_factory, backbone=..., ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from labkit.detectors.base import Detector

# Defaults of the small CPU configuration (backbone="tiny"); ResNets use mmdetection's 256 / 4.
TINY_CHANNELS = 64
TINY_STACKED_CONVS = 2


class SingleStageDetector(Detector):
    """Backbone -> neck -> dense head.

    Args:
        backbone: ``Tensor[B, 3, H, W]`` -> tuple of feature maps.
        neck: tuple of maps -> tuple of pyramid levels (e.g. ``labkit.nn.FPN``); may be ``None``.
        head: a ``labkit.heads.dense_head.DenseHead``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @property
    def num_classes(self) -> int:
        """Foreground classes of the head."""
        return self.head.num_classes

    @property
    def supports_cpu_amp(self) -> bool:
        """Whether ``train(..., amp=True)`` may run this model under bf16 autocast on a CPU:
        dense heads (``DenseHead.loss_and_targets``) assign and compute losses in float32, and
        every layer has a bf16 CPU kernel except torchvision's deformable convolution
        (RepPoints)."""
        from labkit.heads.dense_head import DenseHead
        from labkit.heads.reppoints import RepPointsHead

        return isinstance(self.head, DenseHead) and not isinstance(self.head, RepPointsHead)

    def extract_feat(self, img: Tensor) -> list[Tensor]:
        """Pyramid features of ``img: Tensor[B, 3, H, W]``: list of ``Tensor[B, C, H_l, W_l]``."""
        feats = self.backbone(img)
        if self.neck is not None:
            feats = self.neck(feats)
        return list(feats)

    def forward(self, img: Tensor) -> tuple[list[Tensor], ...]:
        """Raw head outputs for ``img: Tensor[B, 3, H, W]`` (per level, see the head's ``forward``)."""
        return self.head(self.extract_feat(img))

    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses of a collated batch: ``{"loss_*": Tensor[]}``.

        Raises ``ValueError`` / ``TypeError`` naming the argument for malformed ground truth
        (wrong shape, NaN/inf, x2 < x1, labels out of range); images without boxes are fine.
        """
        return self.loss_and_targets(batch)[0]

    def loss_and_targets(self, batch: dict) -> tuple[dict[str, Tensor], object]:
        """The losses and the targets they were computed on (the head's assignment: e.g.
        ``AnchorTargets`` for RetinaNet/ATSS, ``FCOSTargets`` for FCOS; see each head)."""
        batch = self.inputs(batch)
        return self.head.loss_and_targets(self.extract_feat(batch["img"]), batch)

    @torch.no_grad()
    def predict(self, batch: dict, rescale: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image: ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": LongTensor[K]}``.

        Boxes are in original-image pixels when ``rescale`` (divided by ``scale_factor``),
        otherwise in the resized image's. Call ``model.eval()`` first (BatchNorm).
        """
        batch = self.inputs(batch, with_gt=False)
        feats = self.extract_feat(batch["img"])
        return self.head.predict(feats, batch["img_metas"], rescale=rescale)


def build_neck_backbone(
    backbone: str,
    *,
    backbone_weights: str | None = None,
    fpn_channels: int | None = None,
    add_extra_convs: str = "on_input",
    relu_before_extra_convs: bool = False,
    num_outs: int = 5,
    fpn_norm: str | None = None,
) -> tuple[nn.Module, nn.Module, int]:
    """Backbone (C3-C5) and FPN (P3-P7 by default), as in RetinaNet.

    Args:
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny"`` (see
            ``labkit.nn.build_backbone``).
        backbone_weights: ``None`` (from scratch: ResNets train their BatchNorm statistics),
            a torchvision ImageNet weights name (``"IMAGENET1K_V2"``) or a local file (BatchNorm
            statistics then stay frozen); see ``labkit.nn.backbones.detector_backbone_kwargs``.
        fpn_channels: FPN width; ``None`` = 256 for ResNets, ``TINY_CHANNELS`` for "tiny".
        add_extra_convs: where P6 comes from (``"on_input"`` RetinaNet, ``"on_output"`` ATSS/FCOS).
        relu_before_extra_convs: ReLU before the P7 conv (FCOS).
        num_outs: number of pyramid levels.
        fpn_norm: ``None`` or ``"gn"``: GroupNorm (32 groups) after every FPN conv, as
            mmdetection's "gn-neck" configs (see :class:`labkit.nn.fpn.FPN`).

    Returns:
        ``(backbone, neck, fpn_channels)``.
    """
    from labkit.nn.backbones import build_backbone, detector_backbone_kwargs
    from labkit.nn.fpn import FPN

    if fpn_channels is None:
        fpn_channels = TINY_CHANNELS if backbone == "tiny" else 256
    body = build_backbone(
        backbone, out_indices=(1, 2, 3), **detector_backbone_kwargs(backbone, backbone_weights)
    )
    neck = FPN(
        body.out_channels,
        fpn_channels,
        num_outs=num_outs,
        start_level=0,
        add_extra_convs=add_extra_convs,
        relu_before_extra_convs=relu_before_extra_convs,
        norm=fpn_norm,
    )
    return body, neck, fpn_channels


def build_single_stage(
    head_factory: Callable[[int, int, int], nn.Module],
    *,
    backbone: str,
    backbone_weights: str | None = None,
    fpn_channels: int | None = None,
    feat_channels: int | None = None,
    stacked_convs: int | None = None,
    add_extra_convs: str = "on_input",
    relu_before_extra_convs: bool = False,
    num_outs: int = 5,
    fpn_norm: str | None = None,
) -> SingleStageDetector:
    """Backbone + FPN + ``head_factory(in_channels, feat_channels, stacked_convs)``.

    ``feat_channels`` defaults to the FPN width and ``stacked_convs`` to 4 (``TINY_STACKED_CONVS``
    for the tiny backbone), mmdetection's head tower; the FPN settings are
    :func:`build_neck_backbone`'s.
    """
    body, neck, channels = build_neck_backbone(
        backbone,
        backbone_weights=backbone_weights,
        fpn_channels=fpn_channels,
        add_extra_convs=add_extra_convs,
        relu_before_extra_convs=relu_before_extra_convs,
        num_outs=num_outs,
        fpn_norm=fpn_norm,
    )
    if feat_channels is None:
        feat_channels = channels
    if stacked_convs is None:
        stacked_convs = TINY_STACKED_CONVS if backbone == "tiny" else 4
    return SingleStageDetector(body, neck, head_factory(channels, feat_channels, stacked_convs))
