"""Cost of attention: problem builders, dense vs deformable timing, memory and the HBM floor.

Used by ``benchmarks/bench_deform_attn.py`` and notebook 04. CUDA memory is measured (peak
allocated); on CPU torch does not track allocations, so :func:`working_set_mib` gives the
analytic size of the tensors each method materialises instead.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from labkit.detr.ms_deform_attn import level_start_index_from_shapes, multi_scale_deformable_attn

__all__ = [
    "ENCODER_SHAPES",
    "attention_cost_sweep",
    "dense_attention",
    "deformable_call",
    "deformable_problem",
    "encoder_cost_sweep",
    "encoder_shapes",
    "peak_rss_mib",
    "hbm_floor_us",
    "measure",
    "working_set_mib",
]

# Deformable-DETR levels (strides 8..64) of a batch padded to 800 x 1333.
ENCODER_SHAPES = ((100, 167), (50, 84), (25, 42), (13, 21))


def deformable_problem(
    bs: int = 2,
    spatial_shapes: Sequence[tuple[int, int]] = ENCODER_SHAPES,
    num_queries: int | None = None,
    num_heads: int = 8,
    head_dims: int = 32,
    num_points: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
    seed: int = 0,
) -> dict:
    """Random inputs of :func:`multi_scale_deformable_attn` (``num_queries=None``: one query
    per key, the encoder). Locations are uniform in [0, 1], weights softmax-normalized."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.long)
    num_keys = int(shapes.prod(1).sum())
    nq = num_keys if num_queries is None else num_queries
    levels = len(spatial_shapes)
    value = torch.randn(bs, num_keys, num_heads, head_dims, generator=gen)
    locations = torch.rand(bs, nq, num_heads, levels, num_points, 2, generator=gen)
    weights = torch.randn(bs, nq, num_heads, levels * num_points, generator=gen).softmax(-1)
    weights = weights.view(bs, nq, num_heads, levels, num_points)
    tensors = [
        t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for t in (value, locations, weights)
    ]
    shapes = shapes.to(device)
    return {
        "value": tensors[0],
        "spatial_shapes": shapes,
        "level_start_index": level_start_index_from_shapes(shapes),
        "sampling_locations": tensors[1],
        "attention_weights": tensors[2],
    }


def dense_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int) -> Tensor:
    """Plain multi-head attention ``softmax(q k^T / sqrt(d)) v`` that materialises the
    ``[bs, heads, nq, nk]`` matrix (what DETR's encoder pays for every pixel pair).

    ``query: Tensor[bs, nq, C]``, ``key, value: Tensor[bs, nk, C]`` -> ``Tensor[bs, nq, C]``.
    """
    bs, nq, c = query.shape
    d = c // num_heads
    q = query.view(bs, nq, num_heads, d).transpose(1, 2)
    k = key.view(bs, -1, num_heads, d).transpose(1, 2)
    v = value.view(bs, -1, num_heads, d).transpose(1, 2)
    attn = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)  # [bs, heads, nq, nk]
    return (attn @ v).transpose(1, 2).reshape(bs, nq, c)


def measure(
    fn: Callable[[], object], device: torch.device | str = "cpu", repeat: int = 3, warmup: int = 1
) -> tuple[float, float | None]:
    """Median seconds of ``fn()`` and its CUDA peak memory in MiB (``None`` on CPU)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def working_set_mib(
    method: str, bs: int, num_queries: int, num_keys: int, num_heads: int = 8, head_dims: int = 32,
    num_levels: int = 4, num_points: int = 4, dtype_bytes: int = 4,
) -> float:  # fmt: skip
    """Analytic MiB of the tensors a forward pass creates beyond its inputs.

    ``"dense"``: the attention matrix ``bs*heads*nq*nk`` (twice: logits and softmax) + output.
    ``"reference"``: grid_sample's sampled values ``bs*heads*dims*nq*L*P`` (twice: the stack and
    its product with the weights) + grids + output. ``"kernel"``: the output only.
    """
    out = bs * num_queries * num_heads * head_dims
    if method == "dense":
        elems = 2 * bs * num_heads * num_queries * num_keys + out
    elif method == "reference":
        samples = bs * num_heads * head_dims * num_queries * num_levels * num_points
        elems = 2 * samples + bs * num_queries * num_heads * num_levels * num_points * 2 + out
    elif method == "kernel":
        elems = out
    else:
        raise ValueError(f"method: expected 'dense', 'reference' or 'kernel', got {method!r}")
    return elems * dtype_bytes / 2**20


def hbm_floor_us(
    bs: int, num_queries: int, num_keys: int, num_heads: int = 8, head_dims: int = 32,
    num_levels: int = 4, num_points: int = 4, dtype_bytes: int = 4, bandwidth_tb_s: float = 3.35,
    backward: bool = False,
) -> float:  # fmt: skip
    """Lower bound in microseconds from memory traffic alone: every input read once, every
    output written once (gathers assumed to hit cache). Forward reads value, locations (fp32)
    and weights (fp32) and writes the output; backward also reads grad_output and writes the
    three gradients (grad_value accumulated in fp32). ``bandwidth_tb_s``: 3.35 for H100 SXM,
    4.8 for H200."""
    value = bs * num_keys * num_heads * head_dims * dtype_bytes
    samples = bs * num_queries * num_heads * num_levels * num_points
    locations, weights = samples * 2 * 4, samples * 4
    out = bs * num_queries * num_heads * head_dims * dtype_bytes
    total = value + locations + weights + out
    if backward:
        total += out + bs * num_keys * num_heads * head_dims * 4 + locations + weights
    return total / (bandwidth_tb_s * 1e12) * 1e6


def deformable_call(
    problem: dict, backend: str = "auto", backward: bool = False
) -> Callable[[], object]:
    """A closure running deformable attention on ``problem`` (forward, or forward + backward).

    ``backend``: ``"pytorch"`` (the reference), ``"triton"`` (the kernel, unchecked) or ``"auto"``.
    """

    def run() -> object:
        if backend == "triton":  # the kernel itself: no argument checks (they sync the GPU)
            from labkit.detr.ms_deform_attn_triton import ms_deform_attn_triton

            out = ms_deform_attn_triton(**problem)
        else:
            out = multi_scale_deformable_attn(**problem, backend=backend)
        if backward:
            out.float().sum().backward()
        return out

    if not backward:
        return lambda: _no_grad(run)
    return run


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


def attention_cost_sweep(
    num_queries: Sequence[int],
    spatial_shapes: Sequence[tuple[int, int]] = ((25, 42), (13, 21), (7, 11), (4, 6)),
    device: torch.device | str = "cpu",
    embed_dims: int = 256,
    num_heads: int = 8,
    repeat: int = 3,
) -> list[dict]:
    """Forward time and memory of dense attention, the deformable reference and (on CUDA) the
    kernel, for each number of queries attending to the keys of ``spatial_shapes`` (batch 1).

    Returns:
        ``[{"method", "num_queries", "ms", "mib", "measured_memory"}]``; ``mib`` is the CUDA
        peak when measured, else :func:`working_set_mib`.
    """
    device = torch.device(device)
    num_keys = sum(h * w for h, w in spatial_shapes)
    head_dims = embed_dims // num_heads
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, num_keys, embed_dims, generator=gen).to(device)
    rows = []
    methods = ["dense", "reference"] + (["kernel"] if device.type == "cuda" else [])
    for nq in num_queries:
        query = torch.randn(1, nq, embed_dims, generator=gen).to(device)
        problem = deformable_problem(1, spatial_shapes, nq, num_heads, head_dims, device=device)
        for method in methods:
            if method == "dense":
                fn = functools.partial(dense_attention, query, keys, keys, num_heads)
            else:
                fn = deformable_call(problem, "pytorch" if method == "reference" else "triton")
            with torch.no_grad():
                seconds, peak = measure(fn, device, repeat=repeat)
            mib = (
                peak
                if peak is not None
                else working_set_mib(method, 1, nq, num_keys, num_heads, head_dims)
            )
            rows.append(
                {
                    "method": method,
                    "num_queries": nq,
                    "ms": seconds * 1e3,
                    "mib": mib,
                    "measured_memory": peak is not None,
                }
            )
    return rows


def encoder_shapes(height: int, width: int, strides: Sequence[int] = (8, 16, 32, 64)) -> list:
    """The encoder's ``(h, w)`` levels for an ``height x width`` input: ``ceil(side / stride)``."""
    return [(-(-height // s), -(-width // s)) for s in strides]


def peak_rss_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory ``fn()`` adds to this process, in MiB, measured by Linux: freed heap
    pages are handed back first (glibc's ``malloc_trim``, so reused memory counts again), then
    the high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``. ``None`` where
    that interface is missing (not Linux)."""
    status, clear = "/proc/self/status", "/proc/self/clear_refs"
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

    def read_kib(field: str) -> int:
        with open(status) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    try:
        with open(clear, "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = read_kib("VmRSS:")
    except OSError:
        return None
    fn()
    return max(read_kib("VmHWM:") - before, 0) / 1024


def encoder_cost_sweep(
    image_sizes: Sequence[int],
    device: torch.device | str = "cpu",
    embed_dims: int = 256,
    num_heads: int = 8,
    repeat: int = 3,
) -> list[dict]:
    """Encoder self-attention (every token a query, every token a key) on square inputs of
    ``image_sizes`` pixels: forward time and memory of dense attention and of deformable
    attention (the reference; on CUDA also the kernel), batch 1.

    Memory is measured: the CUDA peak allocated on a GPU, the peak resident memory the call
    adds (:func:`peak_rss_mib`) on a Linux CPU; elsewhere the analytic :func:`working_set_mib`.

    Returns:
        ``[{"method", "image_size", "num_tokens", "ms", "mib", "memory"}]`` where ``memory``
        says how ``mib`` was obtained (``"cuda peak"``, ``"peak RSS"`` or ``"analytic"``).
    """
    device = torch.device(device)
    head_dims = embed_dims // num_heads
    methods = ["dense", "reference"] + (["kernel"] if device.type == "cuda" else [])
    gen = torch.Generator().manual_seed(0)
    rows = []
    for size in image_sizes:
        shapes = encoder_shapes(size, size)
        tokens = sum(h * w for h, w in shapes)
        x = torch.randn(1, tokens, embed_dims, generator=gen).to(device)
        problem = deformable_problem(1, shapes, None, num_heads, head_dims, device=device)
        for method in methods:
            if method == "dense":
                fn = functools.partial(
                    _no_grad, functools.partial(dense_attention, x, x, x, num_heads)
                )
            else:
                fn = deformable_call(problem, "pytorch" if method == "reference" else "triton")
            seconds, peak = measure(fn, device, repeat=repeat)
            memory = "cuda peak"
            if peak is None:
                peak, memory = peak_rss_mib(fn), "peak RSS"
            if peak is None:
                peak = working_set_mib(method, 1, tokens, tokens, num_heads, head_dims)
                memory = "analytic"
            rows.append(
                {
                    "method": method,
                    "image_size": size,
                    "num_tokens": tokens,
                    "ms": seconds * 1e3,
                    "mib": peak,
                    "memory": memory,
                }
            )
    return rows
