"""Geometry speed: pairwise IoU against torchvision, and RetinaNet anchor generation for one batch.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_geometry [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import describe_device, peak_memory_mb, print_table, time_call
from labkit.anchors import AnchorGenerator, featmap_sizes_from_shape
from labkit.boxes import bbox_overlaps, bbox_overlaps_reference

RETINANET_STRIDES = [8, 16, 32, 64, 128]


def random_boxes(n: int, size: float, generator: torch.Generator, device: torch.device):
    """``n`` valid xyxy boxes inside a ``size`` x ``size`` image."""
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 4 + 1
    return torch.cat([xy, xy + wh], dim=1).to(device)


def bench_iou(num_anchors: int, num_gts: int, device: torch.device, repeat: int) -> list[list]:
    import torchvision

    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(num_anchors, 1333, g, device)
    gts = random_boxes(num_gts, 1333, g, device)
    ours = bbox_overlaps(anchors, gts)
    theirs = torchvision.ops.box_iou(anchors, gts)
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff < 1e-5, f"labkit and torchvision disagree by {max_diff}"

    calls = {
        "labkit bbox_overlaps": lambda: bbox_overlaps(anchors, gts),
        "labkit bbox_overlaps (check=False)": lambda: bbox_overlaps(anchors, gts, check=False),
        "labkit reference ([M, N, 2] broadcast)": lambda: bbox_overlaps_reference(anchors, gts),
        "torchvision.ops.box_iou": lambda: torchvision.ops.box_iou(anchors, gts),
    }
    times = {k: time_call(f, device=device, warmup=1, repeat=repeat) for k, f in calls.items()}
    base = times["torchvision.ops.box_iou"]
    rows = []
    for name, t in times.items():
        mem = peak_memory_mb(calls[name], device)
        rows.append([name, f"{num_anchors}x{num_gts}", t * 1e3, base / t, mem, max_diff])
    return rows


def bench_anchors(device: torch.device, repeat: int) -> list[list]:
    gen = AnchorGenerator(
        strides=RETINANET_STRIDES, ratios=[0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3
    )
    # an 800x1333 image padded to a multiple of 32, as the test pipeline does
    pad_shape = (800, 1344)
    sizes = featmap_sizes_from_shape(pad_shape, RETINANET_STRIDES)
    num = sum(a.shape[0] for a in gen.grid_priors(sizes, device=device))
    t_grid = time_call(lambda: gen.grid_priors(sizes, device=device), device=device, repeat=repeat)
    t_valid = time_call(
        lambda: gen.valid_flags(sizes, (800, 1333), device=device), device=device, repeat=repeat
    )
    return [
        ["grid_priors (5 levels)", f"{pad_shape[0]}x{pad_shape[1]}", num, t_grid * 1e3],
        ["valid_flags (5 levels)", f"{pad_shape[0]}x{pad_shape[1]}", num, t_valid * 1e3],
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    num_anchors = 20_000 if args.quick else 200_000
    repeat = 3 if args.quick else 5

    print(f"device: {describe_device(device)}\n")
    print_table(
        "Pairwise IoU (anchors x ground truths)",
        [
            "implementation",
            "size",
            "time (ms)",
            "speed vs torchvision",
            "peak MiB",
            "max abs diff vs torchvision",
        ],
        bench_iou(num_anchors, 100, device, repeat),
    )
    print_table(
        "RetinaNet anchors for one 800x1333 image (9 anchors per cell)",
        ["call", "padded input", "anchors", "time (ms)"],
        bench_anchors(device, repeat),
    )


if __name__ == "__main__":
    main()
