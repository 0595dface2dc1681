"""Co-DETR's customized positive queries: each auxiliary head's positives become one query group.

An auxiliary head (ATSS, Faster R-CNN) labels many anchors / proposals positive per object.
Co-DETR feeds them to the decoder as extra queries whose targets are already known, so the
decoder sees many more positives per step without a second Hungarian matching:

1. :func:`pad_positives` turns one head's per-image positives (:class:`AuxPositives`, xyxy
   pixels) into a padded batch: normalized ``cxcywh`` reference boxes and targets, labels,
   ``label_weights`` / ``bbox_weights`` (1 on real positives, 0 on padding) and a
   self-attention mask that keeps the padding from disturbing real queries. Every image gets
   the batch maximum of positives, clipped to ``[min_coords, max_pos_coords]`` (Co-DETR:
   at least 9, at most 300); an image with more is subsampled at random.
2. :class:`PositiveQueryEmbedding` builds the queries: ``inverse_sigmoid(box)`` -> sine
   embedding -> per-head ``Linear + LayerNorm`` -> split into (positional, content) halves;
   the content half gets the positive's own feature (per-head ``Linear + LayerNorm``) and the
   positional half a per-head embedding. The reference boxes are the positives themselves.

Co-DETR's Deformable-DETR config pads with random *negative* anchors/proposals (weight 1,
background label); labkit pads with zeros and ``label_weights`` 0 (Co-DETR's
``use_zero_padding=True``), so padding never creates extra negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from labkit.boxes import normalize_bboxes
from labkit.codetr.positives import AuxPositives
from labkit.detr.positional_encoding import proposal_pos_embed
from labkit.detr.transformer import inverse_sigmoid

__all__ = ["AuxQueryTargets", "PositiveQueryEmbedding", "pad_positives"]


@dataclass
class AuxQueryTargets:
    """One auxiliary head's positives as a padded query group (``M`` queries per image).

    Attributes:
        coords: Tensor[B, M, 4] normalized cxcywh reference boxes (zeros on padding).
        labels: LongTensor[B, M] classes, ``num_classes`` (background) on padding.
        targets: Tensor[B, M, 4] normalized cxcywh target boxes (zeros on padding).
        label_weights: Tensor[B, M] 1 on real positives, 0 on padding.
        bbox_weights: Tensor[B, M, 4] the same, per coordinate.
        feats: Tensor[B, M, D] content feature of each positive, or ``None``.
        attn_mask: BoolTensor[B, M, M] decoder self-attention mask (True = blocked).
        num_pos: real positives per image (after subsampling).
    """

    coords: Tensor
    labels: Tensor
    targets: Tensor
    label_weights: Tensor
    bbox_weights: Tensor
    feats: Tensor | None
    attn_mask: Tensor
    num_pos: list[int]

    @property
    def num_queries(self) -> int:
        """``M``, the padded group size."""
        return int(self.coords.shape[1])


def group_size(num_pos: list[int], max_pos_coords: int = 300, min_coords: int = 9) -> int:
    """Co-DETR's group size: ``max(min_coords, min(max_pos_coords, max(num_pos)))``."""
    return max(min_coords, min(max_pos_coords, max(num_pos, default=0)))


def padding_attn_mask(num_pos: list[int], size: int, device: torch.device) -> Tensor:
    """Self-attention mask of a padded group: ``BoolTensor[B, size, size]`` (True = blocked).

    Nobody attends to padding, and padding does not attend to real queries (Co-DETR). A
    padded query still attends to itself: a fully blocked row makes the softmax NaN, and NaN
    times a zero loss weight is still NaN.
    """
    idx = torch.arange(size, device=device)
    masks = []
    for p in num_pos:
        padded = idx >= p
        mask = padded[None, :].expand(size, size) | (padded[:, None] & ~padded[None, :])
        masks.append(mask & ~torch.eye(size, dtype=torch.bool, device=device))
    return torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)


def pad_positives(
    positives: AuxPositives,
    img_metas: list[dict],
    num_classes: int,
    max_pos_coords: int = 300,
    min_coords: int = 9,
) -> AuxQueryTargets:
    """Pad one head's per-image positives to a batch of ``M`` queries (see the module docstring).

    Args:
        positives: per image ``coords[P_i, 4]`` / ``targets[P_i, 4]`` xyxy pixels of the resized
            image, ``labels[P_i]`` (entries outside ``0..C-1`` are dropped), optional ``feats[P_i, D]``.
        img_metas: per image dict with ``img_shape`` (normalization frame).
        num_classes: foreground classes ``C`` (the padding label).
        max_pos_coords, min_coords: bounds of the group size ``M``.

    Returns:
        :class:`AuxQueryTargets`.
    """
    if len(img_metas) != positives.num_images:
        raise ValueError(
            f"img_metas: expected {positives.num_images} entries, got {len(img_metas)}"
        )
    coords_n, targets_n = positives.normalized(img_metas)
    keep = [((lab >= 0) & (lab < num_classes)).nonzero().view(-1) for lab in positives.labels]
    size = group_size([len(k) for k in keep], max_pos_coords, min_coords)
    ref = positives.coords[0] if positives.num_images else torch.zeros(0, 4)
    device, dtype = ref.device, ref.dtype
    bs = positives.num_images
    coords = torch.zeros(bs, size, 4, device=device, dtype=dtype)
    targets = torch.zeros_like(coords)
    labels = torch.full((bs, size), num_classes, dtype=torch.long, device=device)
    label_weights = torch.zeros(bs, size, device=device, dtype=dtype)
    feats = None
    if positives.feats is not None:
        dim = positives.feats[0].shape[-1]
        feats = positives.feats[0].new_zeros(bs, size, dim)
    num_pos = []
    for i, k in enumerate(keep):
        if len(k) > size:  # Co-DETR subsamples images with too many positives at random
            k = k[torch.randperm(len(k))[:size].to(k.device)]
        p = len(k)
        coords[i, :p] = coords_n[i][k]
        targets[i, :p] = targets_n[i][k]
        labels[i, :p] = positives.labels[i][k]
        label_weights[i, :p] = 1.0
        if feats is not None:
            feats[i, :p] = positives.feats[i][k]
        num_pos.append(p)
    return AuxQueryTargets(
        coords=coords,
        labels=labels,
        targets=targets,
        label_weights=label_weights,
        bbox_weights=label_weights[..., None].expand(-1, -1, 4).clone(),
        feats=feats,
        attn_mask=padding_attn_mask(num_pos, size, device),
        num_pos=num_pos,
    )


class PositiveQueryEmbedding(nn.Module):
    """Per-head projections that turn positive boxes (and features) into decoder queries.

    Args:
        num_heads: number of auxiliary heads (query groups).
        embed_dims: decoder width ``C``.
        with_coord_feat: add the positive's feature to the content query (Co-DETR default).
        scalar_head_embed: reproduce Co-DETR's released ``nn.Embedding(num_co_heads, 1, 1,
            embed_dims)``, i.e. ONE scalar per head added to every channel of the positional
            query (the authors kept this bug for their ResNet-50 results); ``False`` gives a
            full ``C``-dim embedding per head.
    """

    def __init__(
        self,
        num_heads: int,
        embed_dims: int,
        with_coord_feat: bool = True,
        scalar_head_embed: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.embed_dims = embed_dims
        self.with_coord_feat = with_coord_feat
        self.pos_trans = nn.ModuleList(
            nn.Linear(2 * embed_dims, 2 * embed_dims) for _ in range(num_heads)
        )
        self.pos_trans_norm = nn.ModuleList(nn.LayerNorm(2 * embed_dims) for _ in range(num_heads))
        if with_coord_feat:
            self.feat_trans = nn.ModuleList(
                nn.Linear(embed_dims, embed_dims) for _ in range(num_heads)
            )
            self.feat_norm = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(num_heads))
        self.head_pos_embed = nn.Parameter(
            torch.empty(num_heads, 1 if scalar_head_embed else embed_dims)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform on every matrix (Co-DETR's transformer init covers these layers too)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, coords: Tensor, head_idx: int, feats: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of head ``head_idx``.

        Args:
            coords: Tensor[B, M, 4] normalized cxcywh positive boxes.
            feats: Tensor[B, M, C] their features (required when ``with_coord_feat``).

        Returns:
            ``query`` Tensor[B, M, C] (content), ``query_pos`` Tensor[B, M, C] (positional) and
            ``reference_points`` Tensor[B, M, 4] (= ``coords``: decoding starts at the positive).
        """
        if not 0 <= head_idx < self.num_heads:
            raise ValueError(f"head_idx: expected 0..{self.num_heads - 1}, got {head_idx}")
        c = self.embed_dims
        embed = proposal_pos_embed(inverse_sigmoid(coords), c // 2)  # [B, M, 2C]
        out = self.pos_trans_norm[head_idx](self.pos_trans[head_idx](embed))
        query_pos, query = torch.split(out, c, dim=2)
        if self.with_coord_feat:
            if feats is None:
                raise ValueError("feats: required when with_coord_feat=True")
            query = query + self.feat_norm[head_idx](self.feat_trans[head_idx](feats))
            query_pos = query_pos + self.head_pos_embed[head_idx]
        return query, query_pos, coords


def hand_reference(box_xyxy: tuple[float, float, float, float], img_hw: tuple[int, int]) -> Tensor:
    """``inverse_sigmoid`` of a pixel box in normalized cxcywh: ``Tensor[4]`` (a worked example).

    ``(10, 20, 30, 60)`` in a 100 x 200 (h, w) image -> cxcywh ``(0.1, 0.4, 0.1, 0.4)`` ->
    ``(log(1/9), log(2/3), log(1/9), log(2/3))``.
    """
    box = normalize_bboxes(torch.tensor([box_xyxy], dtype=torch.float32), img_hw)[0]
    return torch.tensor([math.log(v / (1 - v)) for v in box.tolist()])
