"""Co-DETR (Zong et al. 2023): Deformable-DETR trained with auxiliary one-to-many heads.

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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from labkit.boxes import bbox_cxcywh_to_xyxy
from labkit.codetr.aux_heads import extra_level
from labkit.codetr.positive_queries import AuxQueryTargets, PositiveQueryEmbedding, pad_positives
from labkit.codetr.positives import AuxPositives
from labkit.detectors.deformable_detr import DeformableDETR
from labkit.nn.distributed import reduce_mean

__all__ = ["AUX_HEADS", "CoDETR"]

AUX_HEADS = ("faster_rcnn", "atss")  # Co-DETR's order: RoI heads, then dense heads


class CoDETR(DeformableDETR):
    """Co-Deformable-DETR (detector interface: ``loss(batch)``, ``predict(batch)``).

    Args:
        backbone, neck, num_classes: as :class:`DeformableDETR`.
        aux_heads: auxiliary heads (``ATSSAuxHead``, ``FasterRCNNAuxHead``), in query-group
            order; empty = plain Deformable-DETR training (with ``look_forward_twice``).
        lambda_1: weight of the positive queries' losses.
        max_pos_coords: most positive queries per head and image (Co-DETR: 300).
        look_forward_twice: see :class:`labkit.detr.transformer.DeformableDetrDecoder`.
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
        self.decoder.look_forward_twice = look_forward_twice
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
    def loss(self, batch: dict) -> dict[str, Tensor]:
        """All training losses of a collated batch (see the module docstring for the keys)."""
        return self.loss_and_targets(batch)[0]

    def loss_and_targets(
        self, batch: dict
    ) -> tuple[dict[str, Tensor], list[tuple[AuxPositives, AuxQueryTargets]]]:
        """The losses and, per auxiliary head in query-group order, its positives
        (:class:`AuxPositives`, xyxy pixels) and the positive queries made from them
        (:class:`AuxQueryTargets`, padded per image); an empty list without auxiliary heads."""
        batch = self.inputs(batch)
        gt_bboxes, gt_labels, metas = batch["gt_bboxes"], batch["gt_labels"], batch["img_metas"]
        out = self(batch["img"], batch["padding_mask"])
        losses = self.criterion(
            out["all_cls_scores"], out["all_bbox_preds"], gt_bboxes, gt_labels, metas,
            out["enc_outputs_class"], out["enc_outputs_coord"],
        )  # fmt: skip
        if not len(self.aux_heads):
            return losses, []
        maps = self.memory_maps(out)
        groups = []
        for k, head in enumerate(self.aux_heads):
            head_losses, positives = head(maps, gt_bboxes, gt_labels, metas)
            for key, value in head_losses.items():
                losses[key if "rpn" in key else f"{key}{k}"] = value
            groups.append(positives)
        targets = []
        for k, positives in enumerate(groups):
            aux = pad_positives(positives, metas, self.num_classes, self.max_pos_coords)
            all_cls, all_box = self.forward_aux(out, aux, k)
            losses.update(self.loss_aux(all_cls, all_box, aux, metas, k))
            targets.append((positives, aux))
        return losses, targets
