"""Fused multi-scale deformable attention in Triton: forward and backward, float32 math inside.

One program handles ``BLOCK_Q`` queries of one (image, head) pair and all ``head_dims``
channels of that head: for every level and point it computes the four bilinear corners,
gathers the four ``[BLOCK_Q, head_dims]`` value rows (a head's channels are contiguous, so
each row is one coalesced 128-byte read for 32 float32 dims) and accumulates the weighted
sum in registers. Nothing of size ``[bs, nq, heads, L, P, dims]`` is ever materialised, which
is where the reference's memory goes.

Backward recomputes the corners, writes the gradients of the sampling locations and the
attention weights directly (each belongs to exactly one program) and scatters the value
gradient with ``atomic_add`` into a float32 buffer, because many queries sample the same
pixel. Any input dtype is loaded and converted to float32; outputs are cast back to the
dtype of their input, so bf16/fp16 autocast works even when value, locations and weights
arrive in different dtypes (the official CUDA op rejects that).

Launch configuration: the grid is ``(cdiv(nq, BLOCK_Q), bs * heads)``; ``BLOCK_D`` is
``head_dims`` rounded up to a power of two (Triton block sizes must be). ``BLOCK_Q``,
``num_warps`` and ``num_stages`` come from :data:`LAUNCH_TABLE` (keyed by pass, ``BLOCK_D`` and
the value dtype), else from the rule it was filled with (chosen by reasoning, not autotuned:
no GPU was available when this was written): ``BLOCK_Q`` keeps the tile at about 2048
elements in the forward (4 warps, 16 fp32 values per thread per tile) and 1024 in the
backward, which keeps five tiles live (grad_output and four corners), with Triton's default
``num_stages``. ``python -m benchmarks.gpu_check`` times candidate launches on a GPU and
prints a measured table ready to paste over :data:`LAUNCH_TABLE`. Levels and points
are ``constexpr`` loops, unrolled at JIT time. Triton compiles on first use, so there is no
build step at install time. ``TRITON_INTERPRET=1`` (set before triton is imported) runs the
same kernels on CPU tensors; the tests use that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["LAUNCH_TABLE", "ms_deform_attn_triton", "launch_config"]

# (pass, BLOCK_D, value dtype) -> (BLOCK_Q, num_warps, num_stages); num_stages None is Triton's
# default. Read at every launch by launch_config; keys not listed fall back to the rule in the
# module docstring. The entries are that rule's values for 32 dims per head (Deformable-DETR's
# 256 channels over 8 heads) until `python -m benchmarks.gpu_check` measures better ones on a
# GPU: it writes a replacement for this dict into its results file (gpu_check.md).
LAUNCH_TABLE: dict[tuple[str, int, str], tuple[int, int, int | None]] = {
    ("fwd", 32, "float32"): (64, 4, None),
    ("fwd", 32, "bfloat16"): (64, 4, None),
    ("fwd", 32, "float16"): (64, 4, None),
    ("bwd", 32, "float32"): (32, 4, None),
    ("bwd", 32, "bfloat16"): (32, 4, None),
    ("bwd", 32, "float16"): (32, 4, None),
}


def launch_config(
    head_dims: int, backward: bool = False, dtype: torch.dtype | None = None
) -> tuple[int, int, int, int | None]:
    """``(BLOCK_Q, BLOCK_D, num_warps, num_stages)`` for a head size and value dtype.

    :data:`LAUNCH_TABLE` first (``dtype`` None reads the float32 entry), else the rule of the
    module docstring; ``num_stages`` None leaves Triton's default.
    """
    block_d = triton.next_power_of_2(max(head_dims, 1))
    name = str(dtype or torch.float32).removeprefix("torch.")
    entry = LAUNCH_TABLE.get(("bwd" if backward else "fwd", block_d, name))
    if entry is not None:
        block_q, num_warps, num_stages = entry
        return block_q, block_d, num_warps, num_stages
    tile = 1024 if backward else 2048
    block_q = max(16, min(128, tile // block_d))
    return block_q, block_d, 4, None


def _stages(num_stages: int | None) -> dict:
    return {} if num_stages is None else {"num_stages": num_stages}


@triton.jit
def _corner_offsets(x, y, height, width, start, q_mask):
    # grid_sample's align_corners=False: location 0 is the left edge of pixel 0, so the
    # pixel-centre coordinate is loc * size - 0.5.
    px = x * width - 0.5
    py = y * height - 0.5
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    lx = px - x0f
    ly = py - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    # zeros padding: a corner outside the map contributes nothing.
    vx0 = (x0 >= 0) & (x0 < width)
    vx1 = (x1 >= 0) & (x1 < width)
    vy0 = (y0 >= 0) & (y0 < height) & q_mask
    vy1 = (y1 >= 0) & (y1 < height) & q_mask
    k00 = start + y0 * width + x0
    k01 = k00 + 1
    k10 = k00 + width
    k11 = k10 + 1
    return lx, ly, k00, k01, k10, k11, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def _ms_deform_attn_fwd(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_keys,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIMS: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIMS
    row_stride = NUM_HEADS * HEAD_DIMS
    value_base = value_ptr + b * num_keys * row_stride + h * HEAD_DIMS + d[None, :]
    qh = (b * num_queries + q) * NUM_HEADS + h  # [BLOCK_Q] index of (b, q, h)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(NUM_POINTS):
            lp = (qh * NUM_LEVELS + lvl) * NUM_POINTS + pt
            x = tl.load(loc_ptr + 2 * lp, mask=q_mask, other=-2.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * lp + 1, mask=q_mask, other=-2.0).to(tl.float32)
            w = tl.load(attn_ptr + lp, mask=q_mask, other=0.0).to(tl.float32)
            lx, ly, k00, k01, k10, k11, m00, m01, m10, m11 = _corner_offsets(
                x, y, height, width, start, q_mask
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            v00 = tl.load(
                value_base + k00[:, None] * row_stride,
                mask=m00[:, None] & d_mask[None, :],
                other=0.0,
            )
            v01 = tl.load(
                value_base + k01[:, None] * row_stride,
                mask=m01[:, None] & d_mask[None, :],
                other=0.0,
            )
            v10 = tl.load(
                value_base + k10[:, None] * row_stride,
                mask=m10[:, None] & d_mask[None, :],
                other=0.0,
            )
            v11 = tl.load(
                value_base + k11[:, None] * row_stride,
                mask=m11[:, None] & d_mask[None, :],
                other=0.0,
            )
            sampled = (
                (hy * hx)[:, None] * v00.to(tl.float32)
                + (hy * lx)[:, None] * v01.to(tl.float32)
                + (ly * hx)[:, None] * v10.to(tl.float32)
                + (ly * lx)[:, None] * v11.to(tl.float32)
            )
            acc += w[:, None] * sampled
    out_ptrs = out_ptr + qh[:, None] * HEAD_DIMS + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _ms_deform_attn_bwd(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_keys,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIMS: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIMS
    row_stride = NUM_HEADS * HEAD_DIMS
    base = b * num_keys * row_stride + h * HEAD_DIMS + d[None, :]
    value_base = value_ptr + base
    grad_value_base = grad_value_ptr + base  # float32 buffer, same layout as value
    qh = (b * num_queries + q) * NUM_HEADS + h
    go = tl.load(
        grad_out_ptr + qh[:, None] * HEAD_DIMS + d[None, :],
        mask=q_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    for lvl in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(NUM_POINTS):
            lp = (qh * NUM_LEVELS + lvl) * NUM_POINTS + pt
            x = tl.load(loc_ptr + 2 * lp, mask=q_mask, other=-2.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * lp + 1, mask=q_mask, other=-2.0).to(tl.float32)
            w = tl.load(attn_ptr + lp, mask=q_mask, other=0.0).to(tl.float32)
            lx, ly, k00, k01, k10, k11, m00, m01, m10, m11 = _corner_offsets(
                x, y, height, width, start, q_mask
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            mk00 = m00[:, None] & d_mask[None, :]
            mk01 = m01[:, None] & d_mask[None, :]
            mk10 = m10[:, None] & d_mask[None, :]
            mk11 = m11[:, None] & d_mask[None, :]
            v00 = tl.load(value_base + k00[:, None] * row_stride, mask=mk00, other=0.0).to(
                tl.float32
            )
            v01 = tl.load(value_base + k01[:, None] * row_stride, mask=mk01, other=0.0).to(
                tl.float32
            )
            v10 = tl.load(value_base + k10[:, None] * row_stride, mask=mk10, other=0.0).to(
                tl.float32
            )
            v11 = tl.load(value_base + k11[:, None] * row_stride, mask=mk11, other=0.0).to(
                tl.float32
            )
            sampled = (
                (hy * hx)[:, None] * v00
                + (hy * lx)[:, None] * v01
                + (ly * hx)[:, None] * v10
                + (ly * lx)[:, None] * v11
            )
            tl.store(grad_attn_ptr + lp, tl.sum(go * sampled, axis=1), mask=q_mask)
            gw = go * w[:, None]
            # d sampled / d lx and d ly, then the chain rule through px = x * width - 0.5.
            d_lx = hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)
            d_ly = hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)
            grad_x = tl.sum(gw * d_lx, axis=1) * width
            grad_y = tl.sum(gw * d_ly, axis=1) * height
            tl.store(grad_loc_ptr + 2 * lp, grad_x, mask=q_mask)
            tl.store(grad_loc_ptr + 2 * lp + 1, grad_y, mask=q_mask)
            # Several queries may hit the same pixel: scatter with atomics.
            tl.atomic_add(
                grad_value_base + k00[:, None] * row_stride, gw * (hy * hx)[:, None], mask=mk00
            )
            tl.atomic_add(
                grad_value_base + k01[:, None] * row_stride, gw * (hy * lx)[:, None], mask=mk01
            )
            tl.atomic_add(
                grad_value_base + k10[:, None] * row_stride, gw * (ly * hx)[:, None], mask=mk10
            )
            tl.atomic_add(
                grad_value_base + k11[:, None] * row_stride, gw * (ly * lx)[:, None], mask=mk11
            )


def _launch_args(value: Tensor, sampling_locations: Tensor) -> dict:
    bs, num_keys, num_heads, head_dims = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if max(value.numel(), sampling_locations.numel()) >= 2**31:
        raise ValueError(
            "ms_deform_attn_triton: inputs larger than 2**31 elements are not supported"
        )
    return dict(
        num_keys=num_keys,
        num_queries=num_queries,
        NUM_HEADS=num_heads,
        HEAD_DIMS=head_dims,
        NUM_LEVELS=num_levels,
        NUM_POINTS=num_points,
    )


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        shapes = spatial_shapes.to(device=value.device, dtype=torch.int32).contiguous()
        starts = level_start_index.to(device=value.device, dtype=torch.int32).contiguous()
        args = _launch_args(value, sampling_locations)
        bs, _, num_heads, head_dims = value.shape
        num_queries = args["num_queries"]
        output = value.new_empty(bs, num_queries, num_heads * head_dims)
        block_q, block_d, num_warps, num_stages = launch_config(head_dims, dtype=value.dtype)
        grid = (triton.cdiv(num_queries, block_q), bs * num_heads)
        _ms_deform_attn_fwd[grid](
            value, shapes, starts, sampling_locations, attention_weights, output,
            **args, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps, **_stages(num_stages),
        )  # fmt: skip
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        return output

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output):
        value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        args = _launch_args(value, sampling_locations)
        bs, _, num_heads, head_dims = value.shape
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty(sampling_locations.shape, dtype=torch.float32, device=value.device)
        grad_attn = torch.empty(attention_weights.shape, dtype=torch.float32, device=value.device)
        block_q, block_d, num_warps, num_stages = launch_config(
            head_dims, backward=True, dtype=value.dtype
        )
        grid = (triton.cdiv(args["num_queries"], block_q), bs * num_heads)
        _ms_deform_attn_bwd[grid](
            value, shapes, starts, sampling_locations, attention_weights, grad_output,
            grad_value, grad_loc, grad_attn,
            **args, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps, **_stages(num_stages),
        )  # fmt: skip
        return (
            grad_value.to(value.dtype),
            None,
            None,
            grad_loc.to(sampling_locations.dtype),
            grad_attn.to(attention_weights.dtype),
        )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused deformable attention (same contract as ``multi_scale_deformable_attn_pytorch``).

    Args:
        value: Tensor[bs, num_keys, heads, dims] (any float dtype).
        spatial_shapes: LongTensor[L, 2] ``(h, w)``.
        level_start_index: LongTensor[L].
        sampling_locations: Tensor[bs, nq, heads, L, P, 2] in [0, 1].
        attention_weights: Tensor[bs, nq, heads, L, P].

    Returns:
        Tensor[bs, nq, heads * dims] in ``value``'s dtype, computed in float32.
        Differentiable in ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    return _MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
