"""Co-DETR (Zong et al. 2023): Deformable-DETR trained with auxiliary one-to-many heads; recipe.

Training (``loss``), as Sense-X/Co-DETR's ``CoDETR.forward_train`` for Co-Deformable-DETR:

1. the query head -- two-stage Deformable-DETR with mixed query selection and box
   refinement -- runs as usual: Hungarian matching, focal + L1 + GIoU per decoder layer, plus
   the encoder proposal loss (keys ``loss_cls``, ``d0.loss_cls``, ``enc_loss_cls``, ...);
2. the encoder memory is cut back into its maps, one stride-2 level is added, and each
   auxiliary head (Faster R-CNN first, then ATSS, Co-DETR's order) computes its losses on
   them -- weighted by ``lambda_2 x num_decoder_layers`` through its loss weights -- and
   returns its positives (keys suffixed with the head's index: ``loss_cls0``, ``loss_cls1``;
   the RPN's ``loss_rpn_*`` keep their names);
3. each head's positives become a padded group of positive queries (``positive_queries``)
   decoded on the same memory WITHOUT Hungarian matching: their targets are the matched
   ground truths, weighted by ``lambda_1`` (keys ``loss_cls_aux0``, ``d0.loss_iou_aux1``...).

The decoder "looks forward twice" (Co-DETR's config): layer ``l``'s box prediction starts from
the *undetached* refined box of layer ``l - 1``, so each box head also learns from the next
layer's loss; the next layer's attention still samples at the detached box.

At inference (``predict``) only the query head runs: the auxiliary heads, the extra level and
the positive queries are skipped, so the cost equals Deformable-DETR's with the same settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from labkit._validation import check_boxes, check_labels
from labkit.boxes import bbox_cxcywh_to_xyxy
from labkit.codetr.aux_heads import ATSSAuxHead, FasterRCNNAuxHead, extra_level
from labkit.codetr.positive_queries import AuxQueryTargets, PositiveQueryEmbedding, pad_positives
from labkit.detr.deformable_detr import DeformableDETR
from labkit.detr.transformer import DeformableDetrDecoder, inverse_sigmoid
from labkit.heads.dense_head import reduce_mean

__all__ = ["AUX_HEADS", "CoDETR", "CoDeformableDetrDecoder", "co_deformable_detr", "train_config"]

AUX_HEADS = ("faster_rcnn", "atss")  # Co-DETR's order: RoI heads, then dense heads


class CoDeformableDetrDecoder(DeformableDetrDecoder):
    """Deformable-DETR decoder with Co-DETR's ``look_forward_twice`` option.

    Same layers and refinement as :class:`DeformableDetrDecoder`; with ``look_forward_twice``
    the returned references keep their gradient (the next layer's input stays detached).
    """

    def __init__(self, layers: nn.ModuleList, look_forward_twice: bool = True) -> None:
        nn.Module.__init__(self)
        self.num_layers = len(layers)
        self.layers = layers
        self.look_forward_twice = look_forward_twice

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reg_branches: nn.ModuleList | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`DeformableDetrDecoder.forward`: ``hidden_states`` Tensor[L, B, Q, C] and
        references Tensor[L, B, Q, 4] (``reference_points`` must be boxes, Tensor[B, Q, 4])."""
        if reference_points.shape[-1] != 4:
            raise ValueError("reference_points: Co-DETR's decoder expects boxes Tensor[B, Q, 4]")
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        states, refs = [], []
        for layer_id, layer in enumerate(self.layers):
            query = layer(
                query, query_pos, value, key_padding_mask, reference_points[:, :, None] * ratios,
                spatial_shapes, level_start_index, self_attn_mask,
            )  # fmt: skip
            new_refs = reference_points
            if reg_branches is not None:
                delta = reg_branches[layer_id](query)
                new_refs = (delta + inverse_sigmoid(reference_points)).sigmoid()
                reference_points = new_refs.detach()
            states.append(query)
            refs.append(new_refs if self.look_forward_twice else reference_points)
        return torch.stack(states), torch.stack(refs)


class CoDETR(DeformableDETR):
    """Co-Deformable-DETR (detector interface: ``loss(batch)``, ``predict(batch)``).

    Args:
        backbone, neck, num_classes: as :class:`DeformableDETR`.
        aux_heads: auxiliary heads (``ATSSAuxHead``, ``FasterRCNNAuxHead``), in query-group
            order; empty = plain Deformable-DETR training (with ``look_forward_twice``).
        lambda_1: weight of the positive queries' losses.
        max_pos_coords: most positive queries per head and image (Co-DETR: 300).
        look_forward_twice: see :class:`CoDeformableDetrDecoder`.
        with_coord_feat, scalar_head_embed: see :class:`PositiveQueryEmbedding`.
        **detr_kwargs: :class:`DeformableDETR` settings (``as_two_stage``, ``mixed_selection``...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        num_classes: int,
        aux_heads: Sequence[nn.Module] = (),
        *,
        lambda_1: float = 1.0,
        max_pos_coords: int = 300,
        look_forward_twice: bool = True,
        with_coord_feat: bool = True,
        scalar_head_embed: bool = True,
        **detr_kwargs,
    ) -> None:
        super().__init__(backbone, neck, num_classes, **detr_kwargs)
        if aux_heads and not (self.as_two_stage and self.with_box_refine):
            raise ValueError("aux_heads: Co-DETR's query head needs as_two_stage and box refine")
        self.decoder = CoDeformableDetrDecoder(self.decoder.layers, look_forward_twice)
        self.lambda_1 = float(lambda_1)
        self.max_pos_coords = int(max_pos_coords)
        self.num_heads = self.decoder.layers[0].self_attn.num_heads
        self.aux_heads = nn.ModuleList(aux_heads)
        if len(self.aux_heads):
            self.downsample = extra_level(self.embed_dims)
            self.aux_queries = PositiveQueryEmbedding(
                len(self.aux_heads), self.embed_dims, with_coord_feat, scalar_head_embed
            )

    # ------------------------------------------------------------------ auxiliary branch
    def memory_maps(self, out: dict) -> list[Tensor]:
        """The encoder memory as maps ``Tensor[B, C, H_l, W_l]`` plus the extra stride-2 level."""
        memory = out["memory"]
        bs, _, c = memory.shape
        maps = []
        for (h, w), start in zip(
            out["spatial_shapes"].tolist(), out["level_start_index"].tolist(), strict=True
        ):
            level = memory[:, start : start + h * w]  # [B, hw, C]
            maps.append(level.transpose(1, 2).reshape(bs, c, h, w))
        maps.append(self.downsample(maps[-1]))
        return maps

    def forward_aux(self, out: dict, aux: AuxQueryTargets, head_idx: int) -> tuple[Tensor, Tensor]:
        """Decode one positive-query group on the memory of ``out`` (:meth:`forward`'s dict).

        Returns ``cls_scores`` Tensor[L, B, M, C] and ``bbox_preds`` Tensor[L, B, M, 4].
        """
        query, query_pos, reference = self.aux_queries(aux.coords, head_idx, aux.feats)
        attn_mask = aux.attn_mask.repeat_interleave(self.num_heads, dim=0)  # [B*heads, M, M]
        hidden, inter_refs = self.decoder(
            query, query_pos, out["memory"], out["mask_flatten"], reference,
            out["spatial_shapes"], out["level_start_index"], out["valid_ratios"],
            reg_branches=self.reg_branches, self_attn_mask=attn_mask,
        )  # fmt: skip
        return self.head_outputs(hidden, [reference, *inter_refs[:-1]])

    def loss_aux_single(
        self, cls_scores: Tensor, bbox_preds: Tensor, aux: AuxQueryTargets, img_metas: list[dict]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``lambda_1 x (loss_cls, loss_bbox, loss_iou)`` of one layer on known targets.

        ``cls_scores: Tensor[B, M, C]``, ``bbox_preds: Tensor[B, M, 4]``. Both averages are the
        number of real positives (mean over processes, at least 1), as Co-DETR's
        ``loss_single_aux`` with a sigmoid classifier (no background weight).
        """
        crit = self.criterion
        labels = aux.labels.reshape(-1)
        num_pos = ((labels >= 0) & (labels < self.num_classes)).sum().float()
        avg = reduce_mean(num_pos).clamp(min=1.0).item()
        loss_cls = crit.loss_cls(
            cls_scores.reshape(-1, cls_scores.shape[-1]),
            labels,
            aux.label_weights.reshape(-1),
            avg_factor=avg,
        )
        factors = torch.stack(
            [bbox_preds.new_tensor([m["img_shape"][1], m["img_shape"][0]] * 2) for m in img_metas]
        )
        factors = factors.repeat_interleave(bbox_preds.shape[1], dim=0)  # [B*M, 4]
        preds, targets = bbox_preds.reshape(-1, 4), aux.targets.reshape(-1, 4)
        weights = aux.bbox_weights.reshape(-1, 4)
        loss_iou = crit.loss_iou(
            bbox_cxcywh_to_xyxy(preds) * factors,
            bbox_cxcywh_to_xyxy(targets) * factors,
            weights,
            avg_factor=avg,
        )
        loss_bbox = crit.loss_bbox(preds, targets, weights, avg_factor=avg)
        return loss_cls * self.lambda_1, loss_bbox * self.lambda_1, loss_iou * self.lambda_1

    def loss_aux(
        self, all_cls: Tensor, all_box: Tensor, aux: AuxQueryTargets, img_metas: list[dict], k: int
    ) -> dict[str, Tensor]:
        """Per-layer aux-query losses: ``loss_cls_aux{k}`` (last layer), ``d{i}.loss_cls_aux{k}``."""
        losses: dict[str, Tensor] = {}
        num_layers = all_cls.shape[0]
        for layer, (cls, box) in enumerate(zip(all_cls, all_box, strict=True)):
            prefix = "" if layer == num_layers - 1 else f"d{layer}."
            lc, lb, li = self.loss_aux_single(cls, box, aux, img_metas)
            losses[f"{prefix}loss_cls_aux{k}"] = lc
            losses[f"{prefix}loss_bbox_aux{k}"] = lb
            losses[f"{prefix}loss_iou_aux{k}"] = li
        return losses

    # ------------------------------------------------------------------ detector interface
    def loss(self, batch: dict, return_positives: bool = False) -> dict[str, Tensor]:
        """All training losses of a collated batch (see the module docstring for the keys).

        With ``return_positives`` the dict also holds ``"positives"``: per auxiliary head its
        :class:`AuxPositives` and :class:`AuxQueryTargets` (for notebooks; not a loss).
        """
        img, mask = self._inputs(batch)
        device = img.device
        gt_bboxes = [b.to(device) for b in batch["gt_bboxes"]]
        gt_labels = [lab.to(device) for lab in batch["gt_labels"]]
        for i, (b, lab) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
            check_boxes(b, f"gt_bboxes[{i}]")
            check_labels(lab, f"gt_labels[{i}]", len(b), self.num_classes)
        metas = batch["img_metas"]
        out = self(img, mask)
        losses = self.criterion(
            out["all_cls_scores"], out["all_bbox_preds"], gt_bboxes, gt_labels, metas,
            out["enc_outputs_class"], out["enc_outputs_coord"],
        )  # fmt: skip
        if not len(self.aux_heads):
            return losses
        maps = self.memory_maps(out)
        groups = []
        for k, head in enumerate(self.aux_heads):
            head_losses, positives = head(maps, gt_bboxes, gt_labels, metas)
            for key, value in head_losses.items():
                losses[key if "rpn" in key else f"{key}{k}"] = value
            groups.append(positives)
        kept = []
        for k, positives in enumerate(groups):
            aux = pad_positives(positives, metas, self.num_classes, self.max_pos_coords)
            all_cls, all_box = self.forward_aux(out, aux, k)
            losses.update(self.loss_aux(all_cls, all_box, aux, metas, k))
            kept.append((positives, aux))
        if return_positives:
            losses["positives"] = kept
        return losses


def co_deformable_detr(
    num_classes: int,
    aux: Sequence[str] = ("atss", "faster_rcnn"),
    backbone: str = "resnet50",
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
        A :class:`CoDETR` with ``model.recipe == ("co_deformable_detr", {...kwargs})`` and
        ``model.train_config`` (the fields of :func:`train_config`, used by ``labkit train``).
    """
    kwargs = dict(locals())
    kwargs["aux"] = list(aux)
    from labkit.nn.backbones import build_backbone
    from labkit.nn.fpn import ChannelMapper

    unknown = set(aux) - set(AUX_HEADS)
    if unknown or len(set(aux)) != len(tuple(aux)):
        raise ValueError(f"aux: expected distinct names from {AUX_HEADS}, got {tuple(aux)}")
    tiny = backbone == "tiny"
    embed_dims = embed_dims or (64 if tiny else 256)
    num_layers = num_layers or (2 if tiny else 6)
    feedforward_channels = feedforward_channels or (128 if tiny else 2048)
    rcnn_fc_channels = rcnn_fc_channels or (128 if tiny else 1024)
    net = build_backbone(
        backbone,
        out_indices=(1, 2, 3),
        frozen_stages=frozen_stages,
        **({} if tiny else {"norm_eval": False}),
    )
    neck = ChannelMapper(
        net.out_channels, embed_dims, kernel_size=1, num_outs=4, norm="gn", num_groups=32
    )
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
        num_queries=num_queries,
        embed_dims=embed_dims,
        num_heads=num_heads,
        num_points=num_points,
        num_feature_levels=4,
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers,
        feedforward_channels=feedforward_channels,
        dropout=dropout,
        with_box_refine=True,
        as_two_stage=True,
        mixed_selection=True,
        max_per_img=max_per_img,
    )
    model.recipe = ("co_deformable_detr", kwargs)
    # `labkit train` starts from this schedule (command-line flags override it)
    model.train_config = dataclasses.asdict(train_config())
    return model


def train_config(**overrides):
    """Co-DETR's 1x optimisation as a ``TrainConfig``: AdamW lr 2e-4, weight decay 1e-4, lr x0.1
    for backbone / sampling_offsets / reference_points, grad clip 0.1, no warm-up, 12 epochs
    with the step at epoch 11. ``find_unused_parameters`` stays off (every parameter gets a
    gradient each step); pass it for custom heads that can skip a branch."""
    from labkit.detr.deformable_detr import train_config as detr_train_config

    settings = dict(epochs=12, milestones=(11,))
    settings.update(overrides)
    return detr_train_config(**settings)
