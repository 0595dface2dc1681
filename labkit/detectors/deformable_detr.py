"""Deformable-DETR: backbone, ChannelMapper, deformable encoder/decoder, heads, loss, predict.

Follows mmdetection 3.x (``DeformableDETR`` + ``DeformableDETRHead``): one-stage or
two-stage (encoder proposals, top-k), optional iterative box refinement, optional mixed
query selection (Co-DETR / DINO: learned content queries, positions from the proposals).

    model = labkit.recipes.deformable_detr(num_classes=5, backbone="tiny", num_queries=50)
    losses = model.loss(batch)           # {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", ...}
    dets = model.eval().predict(batch)   # [{"boxes", "scores", "labels"}] per image
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.detectors.base import Detector
from labkit.detr.criterion import DETRCriterion
from labkit.detr.ms_deform_attn import MultiScaleDeformableAttention, level_start_index_from_shapes
from labkit.detr.positional_encoding import SinePositionalEncoding, proposal_pos_embed
from labkit.detr.transformer import (
    DeformableDetrDecoder,
    DeformableDetrEncoder,
    inverse_sigmoid,
    valid_ratios_from_mask,
)

__all__ = ["DeformableDETR", "gen_encoder_output_proposals"]


def gen_encoder_output_proposals(
    memory: Tensor, memory_mask: Tensor | None, spatial_shapes: Tensor
) -> tuple[Tensor, Tensor]:
    """One proposal per encoder pixel (two-stage Deformable-DETR), before the proposal head.

    Pixel ``(x, y)`` of level ``l`` proposes the box centred on it, ``0.05 * 2**l`` wide and
    high (normalized by the valid image). Proposals with any coordinate outside
    ``(0.01, 0.99)``, or on padding, are invalid: their logits become ``+inf`` and their
    memory 0 (so they cannot be refined into anything finite).

    Args:
        memory: Tensor[B, sum(hw), C] encoder output.
        memory_mask: BoolTensor[B, sum(hw)] (True = padding) or ``None``.
        spatial_shapes: LongTensor[L, 2].

    Returns:
        ``output_memory`` Tensor[B, sum(hw), C] (masked memory, not yet transformed) and
        ``output_proposals`` Tensor[B, sum(hw), 4]: ``log(p / (1 - p))`` of normalized
        cxcywh, ``inf`` where invalid.
    """
    bs = memory.size(0)
    proposals = []
    cur = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        if memory_mask is not None:
            mask = memory_mask[:, cur : cur + h * w].view(bs, h, w, 1)
            valid_h = torch.sum(~mask[:, :, 0, 0], 1).unsqueeze(-1)
            valid_w = torch.sum(~mask[:, 0, :, 0], 1).unsqueeze(-1)
            scale = torch.cat([valid_w, valid_h], 1).view(bs, 1, 1, 2)
        else:
            scale = memory.new_tensor([w, h]).view(1, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        grid = (grid.unsqueeze(0).expand(bs, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        cur += h * w
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_memory = memory
    if memory_mask is not None:
        output_proposals = output_proposals.masked_fill(memory_mask.unsqueeze(-1), float("inf"))
        output_memory = output_memory.masked_fill(memory_mask.unsqueeze(-1), 0.0)
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = output_memory.masked_fill(~valid, 0.0)
    return output_memory, output_proposals


def _reg_branch(embed_dims: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(),
        nn.Linear(embed_dims, embed_dims),
        nn.ReLU(),
        nn.Linear(embed_dims, 4),
    )


class DeformableDETR(Detector):
    """Deformable-DETR detector (detector interface: ``loss(batch)``, ``predict(batch)``).

    Args:
        backbone: image -> tuple of maps (``labkit.nn`` ResNet / tiny net).
        neck: maps -> ``num_feature_levels`` maps of ``embed_dims`` channels (ChannelMapper).
        num_classes: foreground classes C (sigmoid classifier, no background logit).
        num_queries: decoder queries (and proposals kept in two-stage mode).
        embed_dims, num_heads, num_points, num_feature_levels: attention sizes.
        num_encoder_layers, num_decoder_layers, feedforward_channels, dropout: transformer.
        with_box_refine: each decoder layer refines the previous layer's boxes (own heads).
        as_two_stage: decoder queries start from the top-k encoder proposals.
        mixed_selection: (two-stage) content queries are learned embeddings; only the
            positional queries come from the proposals (Co-DETR, DINO).
        max_per_img: detections kept per image at inference (top-k over queries x classes).
        criterion: the loss (default :class:`DETRCriterion`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        num_classes: int,
        num_queries: int = 300,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_points: int = 4,
        num_feature_levels: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        feedforward_channels: int = 1024,
        dropout: float = 0.1,
        with_box_refine: bool = False,
        as_two_stage: bool = False,
        mixed_selection: bool = False,
        max_per_img: int = 100,
        criterion: DETRCriterion | None = None,
    ) -> None:
        super().__init__()
        if mixed_selection and not as_two_stage:
            raise ValueError(
                "mixed_selection: needs as_two_stage=True (positions come from proposals)"
            )
        if num_classes < 1 or num_queries < 1:
            raise ValueError(
                f"num_classes, num_queries: expected >= 1, got {num_classes}, {num_queries}"
            )
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.embed_dims = embed_dims
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.mixed_selection = mixed_selection
        self.max_per_img = max_per_img

        layer = dict(
            embed_dims=embed_dims,
            num_heads=num_heads,
            num_levels=num_feature_levels,
            num_points=num_points,
            feedforward_channels=feedforward_channels,
            dropout=dropout,
        )
        self.positional_encoding = SinePositionalEncoding(
            embed_dims // 2, normalize=True, offset=-0.5
        )
        self.encoder = DeformableDetrEncoder(num_encoder_layers, **layer)
        self.decoder = DeformableDetrDecoder(num_decoder_layers, **layer)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, embed_dims))
        if not as_two_stage:
            # first half: positional query (-> reference point), second half: content
            self.query_embedding = nn.Embedding(num_queries, embed_dims * 2)
            self.reference_points_fc = nn.Linear(embed_dims, 2)
        else:
            if mixed_selection:
                self.query_embedding = nn.Embedding(num_queries, embed_dims)
            self.memory_trans_fc = nn.Linear(embed_dims, embed_dims)
            self.memory_trans_norm = nn.LayerNorm(embed_dims)
            self.pos_trans_fc = nn.Linear(embed_dims * 2, embed_dims * 2)
            self.pos_trans_norm = nn.LayerNorm(embed_dims * 2)

        # One head per decoder layer, plus the encoder proposal head in two-stage mode.
        num_pred = num_decoder_layers + 1 if as_two_stage else num_decoder_layers
        fc_cls, reg = nn.Linear(embed_dims, num_classes), _reg_branch(embed_dims)
        if with_box_refine:
            self.cls_branches = nn.ModuleList(copy.deepcopy(fc_cls) for _ in range(num_pred))
            self.reg_branches = nn.ModuleList(copy.deepcopy(reg) for _ in range(num_pred))
        else:  # shared heads, as mmdetection's share_pred_layer
            self.cls_branches = nn.ModuleList(fc_cls for _ in range(num_pred))
            self.reg_branches = nn.ModuleList(reg for _ in range(num_pred))
        self.criterion = DETRCriterion(num_classes) if criterion is None else criterion
        self.init_weights()

    def init_weights(self) -> None:
        """mmdetection's initialisation of the transformer and the heads."""
        for coder in (self.encoder, self.decoder):
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        if self.as_two_stage:
            nn.init.xavier_uniform_(self.memory_trans_fc.weight)
            nn.init.xavier_uniform_(self.pos_trans_fc.weight)
        else:
            nn.init.xavier_uniform_(self.reference_points_fc.weight)
            nn.init.constant_(self.reference_points_fc.bias, 0.0)
        nn.init.normal_(self.level_embed)
        prior_bias = -math.log((1 - 0.01) / 0.01)  # sigmoid = 0.01 at the start
        for m in self.cls_branches:
            nn.init.constant_(m.bias, prior_bias)
        for m in self.reg_branches:
            nn.init.constant_(m[-1].weight, 0.0)
            nn.init.constant_(m[-1].bias, 0.0)
        # One-stage references are points: start the boxes small (sigmoid(-2) = 0.12).
        nn.init.constant_(self.reg_branches[0][-1].bias.data[2:], -2.0)
        if self.as_two_stage:
            for m in self.reg_branches:
                nn.init.constant_(m[-1].bias.data[2:], 0.0)

    # ------------------------------------------------------------------ features and masks
    def extract_feat(self, img: Tensor) -> list[Tensor]:
        """``img: Tensor[B, 3, H, W]`` -> ``num_feature_levels`` maps ``Tensor[B, C, H_l, W_l]``."""
        feats = list(self.neck(self.backbone(img)))
        if len(feats) != self.num_feature_levels:
            raise ValueError(
                f"neck: produced {len(feats)} levels, the model expects {self.num_feature_levels}"
            )
        return feats

    @staticmethod
    def level_masks(padding_mask: Tensor, feats: Sequence[Tensor]) -> list[Tensor]:
        """Padding masks per level: nearest-neighbour resize of the image mask (mmdetection).

        ``padding_mask: BoolTensor[B, H, W]`` -> list of ``BoolTensor[B, H_l, W_l]``.
        """
        masks = padding_mask[None].float()
        return [F.interpolate(masks, size=f.shape[-2:]).to(torch.bool)[0] for f in feats]

    # ------------------------------------------------------------------ transformer
    def forward_transformer(
        self, mlvl_feats: Sequence[Tensor], mlvl_masks: Sequence[Tensor]
    ) -> dict:
        """Encoder, query selection and decoder on given features.

        Args:
            mlvl_feats: L maps Tensor[B, C, H_l, W_l]; mlvl_masks: L BoolTensor[B, H_l, W_l].

        Returns:
            dict with ``hidden_states`` Tensor[num_dec, B, Q, C], ``references`` list of
            ``num_dec`` Tensor[B, Q, 2|4] (the reference each layer's head adds to),
            ``memory`` Tensor[B, sum(hw), C], ``spatial_shapes``, ``level_start_index``,
            ``valid_ratios``, ``mask_flatten``, and ``enc_outputs_class`` Tensor[B, sum(hw), C_cls]
            / ``enc_outputs_coord`` Tensor[B, sum(hw), 4] (two-stage, else ``None``).
        """
        feat_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (feat, mask) in enumerate(zip(mlvl_feats, mlvl_masks, strict=True)):
            shapes.append(feat.shape[-2:])
            pos = self.positional_encoding(mask).to(feat.dtype)
            feat_flat.append(feat.flatten(2).transpose(1, 2))  # [B, hw, C]
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        feat_flat = torch.cat(feat_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=feat_flat.device)
        level_start_index = level_start_index_from_shapes(spatial_shapes)
        valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in mlvl_masks], 1)  # [B, L, 2]

        memory = self.encoder(
            feat_flat, pos_flat, mask_flat, spatial_shapes, level_start_index, valid_ratios
        )
        query, query_pos, reference_points, enc_class, enc_coord = self.pre_decoder(
            memory, mask_flat, spatial_shapes
        )
        hidden_states, inter_refs = self.decoder(
            query, query_pos, memory, mask_flat, reference_points, spatial_shapes,
            level_start_index, valid_ratios,
            reg_branches=self.reg_branches if self.with_box_refine else None,
        )  # fmt: skip
        references = [reference_points, *inter_refs[:-1]]
        return dict(
            hidden_states=hidden_states,
            references=references,
            memory=memory,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            mask_flatten=mask_flat,
            enc_outputs_class=enc_class,
            enc_outputs_coord=enc_coord,
        )

    def pre_decoder(
        self, memory: Tensor, memory_mask: Tensor, spatial_shapes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Decoder inputs: ``query, query_pos`` Tensor[B, Q, C], ``reference_points``
        Tensor[B, Q, 2] (one-stage) or Tensor[B, Q, 4] (two-stage), and the encoder proposal
        outputs (two-stage: class logits Tensor[B, sum(hw), C_cls], sigmoid boxes [B, sum(hw), 4])."""
        bs, _, c = memory.shape
        if not self.as_two_stage:
            query_pos, query = torch.split(self.query_embedding.weight, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            query = query.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points_fc(query_pos).sigmoid()
            return query, query_pos, reference_points, None, None
        output_memory, output_proposals = gen_encoder_output_proposals(
            memory, memory_mask, spatial_shapes
        )
        output_memory = self.memory_trans_norm(self.memory_trans_fc(output_memory))
        num_dec = self.decoder.num_layers
        enc_outputs_class = self.cls_branches[num_dec](output_memory)
        enc_outputs_coord_unact = self.reg_branches[num_dec](output_memory) + output_proposals
        # Only channel 0 is trained on proposals (all ground truths relabelled 0), so rank by it.
        topk = min(self.num_queries, enc_outputs_class.shape[1])
        topk_index = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
        topk_coords_unact = torch.gather(
            enc_outputs_coord_unact, 1, topk_index.unsqueeze(-1).repeat(1, 1, 4)
        )
        topk_coords_unact = topk_coords_unact.detach()
        reference_points = topk_coords_unact.sigmoid()
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans_fc(proposal_pos_embed(topk_coords_unact, c // 2))
        )
        if self.mixed_selection:
            query = self.query_embedding.weight[:topk].unsqueeze(0).expand(bs, -1, -1)
            query_pos, _ = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, query = torch.split(pos_trans_out, c, dim=2)
        return (
            query,
            query_pos,
            reference_points,
            enc_outputs_class,
            enc_outputs_coord_unact.sigmoid(),
        )

    # ------------------------------------------------------------------ heads
    def head_outputs(
        self, hidden_states: Tensor, references: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Per decoder layer: ``cls_scores`` Tensor[num_dec, B, Q, C] logits and ``bbox_preds``
        Tensor[num_dec, B, Q, 4] sigmoid normalized cxcywh (offsets added to the reference logit)."""
        classes, coords = [], []
        for layer_id in range(hidden_states.shape[0]):
            reference = inverse_sigmoid(references[layer_id])
            hidden = hidden_states[layer_id]
            delta = self.reg_branches[layer_id](hidden)
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            classes.append(self.cls_branches[layer_id](hidden))
            coords.append(delta.sigmoid())
        return torch.stack(classes), torch.stack(coords)

    def forward(self, img: Tensor, padding_mask: Tensor | None = None) -> dict:
        """Raw outputs for ``img: Tensor[B, 3, H, W]`` and ``padding_mask: BoolTensor[B, H, W]``.

        Returns the :meth:`forward_transformer` dict plus ``all_cls_scores``,
        ``all_bbox_preds`` (see :meth:`head_outputs`) and ``mlvl_feats``.
        """
        feats = self.extract_feat(img)
        if padding_mask is None:
            padding_mask = torch.zeros(
                img.shape[0], *img.shape[-2:], dtype=torch.bool, device=img.device
            )
        out = self.forward_transformer(feats, self.level_masks(padding_mask, feats))
        out["all_cls_scores"], out["all_bbox_preds"] = self.head_outputs(
            out["hidden_states"], out["references"]
        )
        out["mlvl_feats"] = feats
        return out

    # ------------------------------------------------------------------ detector interface
    def loss(self, batch: dict) -> dict[str, Tensor]:
        """Training losses of a collated batch (see :class:`DETRCriterion` for the keys)."""
        batch = self.inputs(batch)
        out = self(batch["img"], batch["padding_mask"])
        return self.criterion(
            out["all_cls_scores"], out["all_bbox_preds"], batch["gt_bboxes"], batch["gt_labels"],
            batch["img_metas"], out["enc_outputs_class"], out["enc_outputs_coord"],
        )  # fmt: skip

    @torch.no_grad()
    def predict(self, batch: dict, rescale: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image without NMS: the top ``max_per_img`` (query, class) pairs by
        sigmoid score of the last decoder layer.

        Returns:
            per image ``{"boxes": Tensor[K, 4] xyxy, "scores": Tensor[K], "labels": LongTensor[K]}``,
            boxes clamped to the image and divided by ``scale_factor`` when ``rescale``.
        """
        batch = self.inputs(batch, with_gt=False)
        out = self(batch["img"], batch["padding_mask"])
        cls_scores, bbox_preds = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
        return [
            self._predict_single(cls_scores[i], bbox_preds[i], meta, rescale)
            for i, meta in enumerate(batch["img_metas"])
        ]

    def _predict_single(
        self, cls_score: Tensor, bbox_pred: Tensor, meta: dict, rescale: bool
    ) -> dict:
        img_h, img_w = tuple(meta["img_shape"])[:2]
        k = min(self.max_per_img, cls_score.numel())
        scores, indexes = cls_score.sigmoid().view(-1).topk(k)
        labels = indexes % self.num_classes
        boxes = bbox_pred[indexes // self.num_classes]
        boxes = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], -1)
        boxes[:, 0::2] = (boxes[:, 0::2] * img_w).clamp(min=0, max=img_w)
        boxes[:, 1::2] = (boxes[:, 1::2] * img_h).clamp(min=0, max=img_h)
        if rescale:
            factor = boxes.new_tensor(meta["scale_factor"]).flatten()
            boxes = boxes / (factor.repeat(2) if factor.numel() == 2 else factor)
        return {"boxes": boxes, "scores": scores, "labels": labels}
