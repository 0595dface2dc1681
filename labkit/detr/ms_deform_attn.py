"""Multi-scale deformable attention: the PyTorch reference and the mmcv-compatible module."""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit._validation import check_tensor

__all__ = [
    "MultiScaleDeformableAttention",
    "level_start_index_from_shapes",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
    "sampling_locations_from_offsets",
]


def level_start_index_from_shapes(spatial_shapes: Tensor) -> Tensor:
    """Offsets of each level in the flattened key sequence.

    Args:
        spatial_shapes: LongTensor[L, 2] of ``(h, w)`` per level.

    Returns:
        LongTensor[L]: ``[0, h0*w0, h0*w0 + h1*w1, ...]``.
    """
    _check_spatial_shapes(spatial_shapes)
    sizes = spatial_shapes.prod(1)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def _check_spatial_shapes(spatial_shapes: object) -> Tensor:
    """Raise naming ``spatial_shapes`` unless it is a ``[L, 2]`` tensor of ``(h, w)`` per level."""
    check_tensor(spatial_shapes, "spatial_shapes")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes: expected shape [L, 2] (h, w), got {tuple(spatial_shapes.shape)}"
            + (" (one level? use [[h, w]])" if spatial_shapes.dim() == 1 else "")
        )
    return spatial_shapes


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    for tensor, name in (
        (value, "value"),
        (spatial_shapes, "spatial_shapes"),
        (sampling_locations, "sampling_locations"),
        (attention_weights, "attention_weights"),
    ):
        check_tensor(tensor, name)
    if value.dim() != 4:
        raise ValueError(
            f"value: expected shape [bs, num_keys, num_heads, head_dims], got {tuple(value.shape)}"
        )
    _check_spatial_shapes(spatial_shapes)
    bs, num_keys, num_heads, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations: expected shape [bs, num_queries, num_heads, num_levels, "
            f"num_points, 2], got {tuple(sampling_locations.shape)}"
        )
    b, nq, h, lv, p, _ = sampling_locations.shape
    if (b, h, lv) != (bs, num_heads, num_levels):
        raise ValueError(
            f"sampling_locations: shape {tuple(sampling_locations.shape)} does not match "
            f"bs={bs}, num_heads={num_heads} (from value) and num_levels={num_levels} "
            "(from spatial_shapes)"
        )
    if tuple(attention_weights.shape) != (b, nq, h, lv, p):
        raise ValueError(
            f"attention_weights: expected shape {(b, nq, h, lv, p)}, got "
            f"{tuple(attention_weights.shape)}"
        )
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if total != num_keys:
        raise ValueError(
            f"spatial_shapes: levels {spatial_shapes.tolist()} hold {total} keys but value has "
            f"{num_keys} (dim 1)"
        )
    if level_start_index is not None:
        check_tensor(level_start_index, "level_start_index")
        expected = level_start_index_from_shapes(spatial_shapes.to(level_start_index.device))
        if level_start_index.shape != expected.shape or not torch.equal(
            level_start_index.long(), expected
        ):
            raise ValueError(
                f"level_start_index: expected {expected.tolist()} for spatial_shapes "
                f"{spatial_shapes.tolist()}, got {level_start_index.tolist()}"
            )


def multi_scale_deformable_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor | None = None,
) -> Tensor:
    """Reference multi-scale deformable attention (bilinear sampling with ``grid_sample``).

    Each query gathers ``num_points`` bilinearly-sampled value vectors per level and head and
    sums them with its attention weights. Locations are normalized to ``[0, 1]`` over the
    (padded) feature map, ``(0, 0)`` the top-left corner of the top-left pixel: the pixel
    centre of column ``j`` is at ``(j + 0.5) / w`` (``grid_sample`` with
    ``align_corners=False``); samples outside the map read zeros (``padding_mode="zeros"``).

    Args:
        value: Tensor[bs, num_keys, num_heads, head_dims], all levels flattened (row-major
            per level, levels concatenated in order).
        spatial_shapes: LongTensor[L, 2], ``(h, w)`` of each level.
        level_start_index: LongTensor[L] offsets of each level in ``num_keys`` (only checked;
            the split follows ``spatial_shapes``). ``None`` skips the check.
        sampling_locations: Tensor[bs, num_queries, num_heads, L, P, 2], ``(x, y)`` in [0, 1].
        attention_weights: Tensor[bs, num_queries, num_heads, L, P].

    mmcv's 4-argument order ``(value, spatial_shapes, sampling_locations,
    attention_weights)`` is accepted too (detected when ``attention_weights`` is missing).

    Returns:
        Tensor[bs, num_queries, num_heads * head_dims].
    """
    if attention_weights is None:  # mmcv / official Deformable-DETR argument order
        level_start_index, sampling_locations, attention_weights = (
            None,
            level_start_index,
            sampling_locations,
        )
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, _, num_heads, head_dims = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1]; -1 is the left edge of the first pixel (align_corners=False).
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [bs, h*w, heads, dims] -> [bs*heads, dims, h, w]
        value_l = (
            value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, head_dims, h, w)
        )
        # [bs, nq, heads, P, 2] -> [bs*heads, nq, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [bs*heads, dims, nq, P]
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [bs, nq, heads, L, P] -> [bs*heads, 1, nq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(
        bs * num_heads, 1, num_queries, num_levels * num_points
    )
    # [bs*heads, dims, nq, L*P] -> [bs, heads*dims, nq]
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(bs, num_heads * head_dims, num_queries)
    return output.transpose(1, 2).contiguous()


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """Deformable attention through the fastest available path (same shapes as the reference).

    Args:
        backend: ``"auto"`` (the fused Triton kernel for CUDA tensors, the PyTorch reference
            otherwise), ``"pytorch"`` or ``"triton"``.

    Returns:
        Tensor[bs, num_queries, num_heads * head_dims] in ``value``'s dtype.
    """
    if backend not in ("auto", "pytorch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'pytorch' or 'triton', got {backend!r}")
    check_tensor(value, "value")
    use_triton = backend == "triton" or (backend == "auto" and value.is_cuda)
    if use_triton and not value.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors, got value on {value.device}; use "
            "backend='pytorch' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before "
            "importing triton to run the kernel in Triton's (slow) CPU interpreter"
        )
    if not use_triton:
        return multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    # Imported lazily: triton is only needed (and JIT-compiles) on first CUDA use.
    from labkit.detr.ms_deform_attn_triton import ms_deform_attn_triton

    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_triton(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def sampling_locations_from_offsets(
    reference_points: Tensor, sampling_offsets: Tensor, spatial_shapes: Tensor
) -> Tensor:
    """Turn predicted offsets into normalized sampling locations (mmcv's rule).

    Args:
        reference_points: Tensor[bs, nq, L, 2] points ``(x, y)`` or Tensor[bs, nq, L, 4]
            boxes ``(cx, cy, w, h)``, normalized to [0, 1].
        sampling_offsets: Tensor[bs, nq, heads, L, P, 2] raw offsets ``(dx, dy)``.
        spatial_shapes: LongTensor[L, 2] ``(h, w)``.

    Returns:
        Tensor[bs, nq, heads, L, P, 2]. Points: ``ref + offset / (w, h)`` (offsets in pixels
        of each level). Boxes: ``ref_xy + offset / P * ref_wh * 0.5`` (offsets in half-box
        units, shrunk by the number of points).
    """
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        return (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / normalizer[None, None, None, :, None, :]
        )
    if reference_points.shape[-1] == 4:
        num_points = sampling_offsets.shape[4]
        return (
            reference_points[:, :, None, :, None, :2]
            + sampling_offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    raise ValueError(
        "reference_points: last dim must be 2 (points) or 4 (boxes), got "
        f"{reference_points.shape[-1]}"
    )


def _check_value(value: object, bs: int, channels: int, layout: str, batch_dim: int = 0) -> None:
    """Raise naming ``value`` unless it is 3-d with ``query``'s batch size and ``channels``."""
    check_tensor(value, "value")
    if value.dim() != 3:
        raise ValueError(f"value: expected shape {layout}, got {tuple(value.shape)}")
    if value.shape[batch_dim] != bs:
        raise ValueError(
            f"value: expected batch size {bs} (query's) in dim {batch_dim} of {layout}, got "
            f"shape {tuple(value.shape)}"
        )
    if value.shape[2] != channels:
        raise ValueError(
            f"value: expected {channels} channels (embed_dims) in dim 2 of {layout}, got shape "
            f"{tuple(value.shape)}"
        )


class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR's attention module, parameter-compatible with mmcv's.

    Each query predicts ``num_points`` offsets per head and level around its reference point
    (or box) and a softmax over the ``num_levels * num_points`` samples of each head.

    Args:
        embed_dims: channels of query and value.
        num_heads: attention heads; must divide ``embed_dims``.
        num_levels: feature levels the keys come from.
        num_points: samples per head and level.
        im2col_step: accepted for mmcv compatibility; the fused kernel needs no batching step.
        dropout: dropout on the output before the residual is added.
        batch_first: inputs are ``[bs, n, c]`` (else ``[n, bs, c]``, mmcv's default).
        value_proj_ratio: ``value_proj`` maps to ``int(embed_dims * value_proj_ratio)``
            channels (split over the heads); ``output_proj`` maps back (mmcv 2.x).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        value_proj_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        for name, val in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("num_levels", num_levels),
            ("num_points", num_points),
        ):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if embed_dims % num_heads != 0:
            raise ValueError(
                f"embed_dims must be divisible by num_heads, but got {embed_dims} and {num_heads}"
            )
        head_dims = embed_dims // num_heads
        if head_dims & (head_dims - 1):
            warnings.warn(
                f"MultiScaleDeformableAttention: {head_dims} dims per head is not a power of 2; "
                "the Triton kernel pads it to the next power of 2 (slower).",
                stacklevel=2,
            )
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size <= 0 or value_proj_size % num_heads:
            raise ValueError(
                f"value_proj_ratio: embed_dims * value_proj_ratio = {value_proj_size} must be a "
                f"positive multiple of num_heads={num_heads}"
            )
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation: offsets start on a ring of directions, weights uniform.

        Head ``k`` points at angle ``2*pi*k/num_heads``; the direction is scaled so its larger
        component is 1 (a square ring), and point ``i`` sits ``i + 1`` steps out, so at step 0
        the heads fan out over a growing neighbourhood. Zero attention weights give a uniform
        softmax; the projections are xavier-uniform with zero bias.
        """
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(
            self.num_heads, 1, 1, 2
        )
        grid_init = grid_init.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def sample(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected value, sampling locations and attention weights (batch-first inputs).

        Args:
            query: Tensor[bs, nq, c] (positional encoding already added).
            value: Tensor[bs, num_keys, c].
            reference_points: Tensor[bs, nq, L, 2 or 4].
            spatial_shapes: LongTensor[L, 2].
            key_padding_mask: BoolTensor[bs, num_keys], True = padding (value zeroed there).

        Returns:
            ``value`` Tensor[bs, num_keys, heads, c/heads], ``sampling_locations``
            Tensor[bs, nq, heads, L, P, 2] and ``attention_weights`` Tensor[bs, nq, heads, L, P].
        """
        bs, num_query, _ = query.shape
        _check_value(value, bs, self.embed_dims, "[bs, num_keys, c]")
        _, num_value, _ = value.shape
        _check_spatial_shapes(spatial_shapes)
        total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if total != num_value:
            raise ValueError(
                f"spatial_shapes: levels {spatial_shapes.tolist()} hold {total} keys but value "
                f"has {num_value}"
            )
        if spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(
                f"spatial_shapes: expected {self.num_levels} levels, got {spatial_shapes.shape[0]}"
            )
        if reference_points.dim() != 4 or reference_points.shape[:3] != (
            bs,
            num_query,
            self.num_levels,
        ):
            raise ValueError(
                f"reference_points: expected shape [{bs}, {num_query}, {self.num_levels}, 2 or 4], "
                f"got {tuple(reference_points.shape)}"
            )
        value = self.value_proj(value)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bs, num_value):
                raise ValueError(
                    f"key_padding_mask: expected shape {(bs, num_value)}, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points, 2
        )
        # Softmax over levels and points jointly: a head may favour one level entirely.
        weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points
        )
        locations = sampling_locations_from_offsets(reference_points, offsets, spatial_shapes)
        return value, locations, weights

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        """Attend from queries to multi-level values; adds the residual like mmcv.

        Args:
            query: Tensor[nq, bs, c] (``[bs, nq, c]`` if ``batch_first``).
            key: unused (deformable attention has no keys); accepted for interface parity.
            value: Tensor[num_keys, bs, c] (or batch first); ``None`` uses ``query``.
            identity: residual added to the output; ``None`` uses ``query`` (before
                ``query_pos`` is added).
            query_pos: positional encoding added to ``query`` before predicting offsets
                and weights.
            key_padding_mask: BoolTensor[bs, num_keys], True = padding.
            reference_points: Tensor[bs, nq, L, 2] or Tensor[bs, nq, L, 4] in [0, 1].
            spatial_shapes: LongTensor[L, 2] ``(h, w)``.
            level_start_index: LongTensor[L].

        Returns:
            Tensor shaped like ``query``: ``dropout(output_proj(attn)) + identity``.
        """
        check_tensor(query, "query")
        if reference_points is None or spatial_shapes is None:
            raise ValueError("reference_points and spatial_shapes are required")
        if query.dim() != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(
                f"query: expected shape [n, bs, {self.embed_dims}] (or batch first), got "
                f"{tuple(query.shape)}"
            )
        if value is None:
            value = query
        batch_dim = 0 if self.batch_first else 1
        layout = "[bs, num_keys, c]" if self.batch_first else "[num_keys, bs, c]"
        _check_value(value, query.shape[batch_dim], self.embed_dims, layout, batch_dim)
        _check_spatial_shapes(spatial_shapes)
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        if level_start_index is None:
            level_start_index = level_start_index_from_shapes(spatial_shapes)
        value, locations, weights = self.sample(
            query, value, reference_points, spatial_shapes, key_padding_mask
        )
        output = multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights
        )
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity
