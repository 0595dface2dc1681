"""Multi-level RoIAlign: each RoI is pooled from one pyramid level chosen by its size (FPN's rule).

``rois`` are ``Tensor[K, 5]`` rows ``(batch_idx, x1, y1, x2, y2)`` in input-image pixels
(``bbox2roi`` builds them from per-image boxes). mmdetection's ``SingleRoIExtractor`` maps a
RoI of scale ``s = sqrt(w * h)`` to level ``floor(log2(s / finest_scale + 1e-6))`` clamped to
``0 .. L-1``, so with ``finest_scale = 56``: ``s < 112`` -> level 0, ``112 <= s < 224`` ->
level 1, ``224 <= s < 448`` -> level 2, larger -> level 3. Pooling is
``torchvision.ops.roi_align(feat, rois, output_size, 1 / stride, sampling_ratio, aligned=True)``
(mmcv's ``RoIAlign`` with ``aligned=True``, ``pool_mode="avg"``; ``sampling_ratio=0`` samples
``ceil(bin size)`` points per bin).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from labkit._validation import check_tensor


def bbox2roi(bbox_list: Sequence[Tensor]) -> Tensor:
    """Per-image boxes ``[N_i, 4]`` -> ``rois: Tensor[sum N_i, 5]`` with the image index first."""
    rois = []
    for img_id, bboxes in enumerate(bbox_list):
        img_inds = bboxes.new_full((bboxes.shape[0], 1), img_id)
        rois.append(torch.cat([img_inds, bboxes[:, :4]], dim=-1))
    return torch.cat(rois, 0)


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56) -> Tensor:
    """Level index ``LongTensor[K]`` of every RoI (see the module docstring for the rule)."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIExtractor(nn.Module):
    """Pool a fixed-size feature grid for every RoI from the level its size maps to.

    Args:
        featmap_strides: strides of the levels used, finest first (e.g. ``(4, 8, 16, 32)``);
            ``forward`` uses the first ``len(featmap_strides)`` maps it is given.
        output_size: side of the pooled grid (7 in Faster R-CNN).
        sampling_ratio: sampling points per bin side (``0``: adaptive).
        finest_scale: RoI scale mapped to level 0 (56 in Faster R-CNN, 112 in Co-DETR).
        aligned: half-pixel alignment of RoIAlign (``True`` as in mmdetection).
    """

    def __init__(
        self,
        featmap_strides: Sequence[int],
        output_size: int = 7,
        sampling_ratio: int = 0,
        finest_scale: float = 56,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        strides = [int(s) for s in featmap_strides]
        if not strides or min(strides) <= 0:
            raise ValueError(f"featmap_strides: expected positive strides, got {featmap_strides!r}")
        if finest_scale <= 0:
            raise ValueError(f"finest_scale: expected a positive number, got {finest_scale!r}")
        self.featmap_strides = strides
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.finest_scale = float(finest_scale)
        self.aligned = aligned

    @property
    def num_inputs(self) -> int:
        """Number of feature levels read."""
        return len(self.featmap_strides)

    def _pool(self, feat: Tensor, rois: Tensor, level: int) -> Tensor:
        # float32 like mmdetection's force_fp32: bf16 RoI coordinates would be off by pixels
        return roi_align(
            feat.float(),
            rois,
            self.output_size,
            spatial_scale=1.0 / self.featmap_strides[level],
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        ).to(feat.dtype)

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """``feats[l]: Tensor[B, C, H_l, W_l]``, ``rois: Tensor[K, 5]`` -> ``Tensor[K, C, S, S]``."""
        if len(feats) < self.num_inputs:
            raise ValueError(
                f"feats: expected at least {self.num_inputs} levels (featmap_strides), got {len(feats)}"
            )
        rois = check_tensor(rois, "rois")
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(
                f"rois: expected shape [K, 5] (batch_idx, x1, y1, x2, y2), got {tuple(rois.shape)}"
            )
        feats = list(feats[: self.num_inputs])
        size = self.output_size
        rois = rois.float()
        roi_feats = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
        if self.num_inputs == 1:
            return roi_feats if rois.shape[0] == 0 else self._pool(feats[0], rois, 0)
        levels = map_roi_levels(rois, self.num_inputs, self.finest_scale)
        for i, feat in enumerate(feats):
            inds = (levels == i).nonzero().squeeze(1)
            if inds.numel() > 0:
                roi_feats[inds] = self._pool(feat, rois[inds], i)
            else:
                # Keep every level in the graph (unused levels would stall DDP's gradient sync).
                roi_feats = roi_feats + feat.sum() * 0.0
        return roi_feats
