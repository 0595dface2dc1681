"""Multi-scale deformable attention: fused Triton kernel vs the PyTorch reference.

Shapes from Deformable-DETR at batch 2, 800 x 1333 input: the encoder (every pixel of the
four levels 100x167, 50x84, 25x42, 13x21 is a query: 22,223 queries) and the decoder (300
queries); 8 heads x 32 dims, 4 levels, 4 points; float32 and bfloat16; forward and
forward + backward. The HBM floor is the time to move every input and output once at the
GPU's bandwidth (H100 SXM 3.35 TB/s). Without CUDA only the reference is measured.

    .venv/bin/python -m benchmarks.bench_deform_attn            # full
    .venv/bin/python -m benchmarks.bench_deform_attn --quick    # batch 1, 400 x 667 input
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import describe_device, print_table
from labkit.lessons.attention_cost import (
    ENCODER_SHAPES,
    deformable_call,
    deformable_problem,
    hbm_floor_us,
    measure,
    working_set_mib,
)

QUICK_SHAPES = ((50, 84), (25, 42), (13, 21), (7, 11))


def _cell_ms(seconds: float | None) -> float | str:
    return "needs CUDA" if seconds is None else seconds * 1e3


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 at 400 x 667, one timed run")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    device = (
        torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    cuda = device.type == "cuda"
    bs, shapes = (1, QUICK_SHAPES) if args.quick else (2, ENCODER_SHAPES)
    repeat = 1 if args.quick and not cuda else (3 if not cuda else 20)
    num_keys = sum(h * w for h, w in shapes)
    bandwidth = 4.8 if cuda and "H200" in torch.cuda.get_device_name(device) else 3.35
    rows = []
    for name, nq in (("encoder", None), ("decoder", 300)):
        queries = num_keys if nq is None else nq
        for dtype in (torch.float32, torch.bfloat16):
            nbytes = torch.finfo(dtype).bits // 8
            for backward in (False, True):
                results = {}
                for backend in ("pytorch", "triton"):
                    if backend == "triton" and not cuda:
                        results[backend] = (None, None)
                        continue
                    problem = deformable_problem(
                        bs, shapes, nq, dtype=dtype, device=device, requires_grad=backward
                    )
                    results[backend] = measure(
                        deformable_call(problem, backend, backward), device, repeat=repeat
                    )
                    del problem
                (ref_s, ref_mem), (ker_s, ker_mem) = results["pytorch"], results["triton"]
                floor = hbm_floor_us(
                    bs,
                    queries,
                    num_keys,
                    dtype_bytes=nbytes,
                    bandwidth_tb_s=bandwidth,
                    backward=backward,
                )
                rows.append([
                    name, queries, str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd",
                    _cell_ms(ref_s), _cell_ms(ker_s),
                    None if ker_s is None else ref_s / ker_s,
                    ref_mem if cuda else working_set_mib("reference", bs, queries, num_keys, dtype_bytes=nbytes),
                    ker_mem if cuda else working_set_mib("kernel", bs, queries, num_keys, dtype_bytes=nbytes),
                    floor,
                    None if ker_s is None else ker_s * 1e6 / floor,
                ])  # fmt: skip
    mem_note = "peak allocated (measured)" if cuda else "analytic working set (CPU: not measured)"
    header = [
        "shape", "queries", "dtype", "pass", "reference ms", "kernel ms", "speedup",
        f"reference MiB ({mem_note})", "kernel MiB", f"HBM floor us ({bandwidth} TB/s)", "kernel / floor",
    ]  # fmt: skip
    title = f"Deformable attention, batch {bs}, levels {list(shapes)}, 8x32, 4 levels x 4 points - {describe_device(device)}"
    text = print_table(title, header, rows)
    enc_floor = hbm_floor_us(
        2, sum(h * w for h, w in ENCODER_SHAPES), sum(h * w for h, w in ENCODER_SHAPES)
    )
    print(
        "HBM floor, encoder forward at batch 2 fp32: bytes = value (bs*keys*256*4) + locations "
        "(bs*nq*8*4*4*2*4) + weights (bs*nq*8*4*4*4) + output (bs*nq*256*4) = "
        f"{enc_floor * 3.35e-6 * 1e12 / 2**20:.0f} MiB -> {enc_floor:.1f} us at 3.35 TB/s"
    )
    return text


if __name__ == "__main__":
    main()
